r"""
Which parameters train? For a checkpoint or a preset and any freeze / 4-bit / LoRA setting, the trainable and
total parameters of every area of the model, and the modules a LoRA or quantization pattern matches: the check
that the vision tower is (or is not) being trained before a long run starts.

    python -m scripts.trainables --model=d20 --quant=nf4 --lora_r=16
    python -m scripts.trainables --model_tag=vis_tok --lora_targets="transformer\.h\.\d+\.attn\.c_(q|v)|qkv"

Nothing is loaded but the configs: the model is built on the meta device, so d20 costs no memory.
"""

import os

import torch

from configurator import configure
from nanovlm.checkpoint import configs_from_meta, det_config_of, find_last_step, meta_path, read_meta
from nanovlm.common import get_base_dir
from nanovlm.deepencoder import DeepEncoder
from nanovlm.detection import DetHead
from nanovlm.gpt import GPT
from nanovlm.lora import ADAPTER_KEYS, find_targets, prepare_adapters
from nanovlm.report import census
from nanovlm.vlm import VLM, freeze, preset_configs

model = "tiny"  # a preset, when no checkpoint is named
vocab_size = 65536  # the preset's vocabulary
model_tag = ""  # or a run under checkpoints/ (its configs are read, not its weights)
checkpoint_dir = ""
freeze_sam = False
freeze_compressor = False
quant = ""  # "nf4"
double_quant = False
quant_targets = r"transformer\.h\.\d+\.(attn|mlp)\.c_\w+"
lora_r = 0
lora_alpha = 32.0
lora_dropout = 0.0
lora_targets = r"transformer\.h\.\d+\.(attn|mlp)\.c_\w+"
show = 12  # matched module names to list per pattern
user_config = configure(globals())

def list_matches(title, names):
    by_tower = {"vision": [n for n in names if n.startswith("encoder.")], "GPT": [n for n in names if n.startswith("gpt.")]}
    print(f"{title}: {len(names)} modules ({len(by_tower['GPT'])} in the GPT, {len(by_tower['vision'])} in the vision towers)")
    for n in names[:show]:
        print(f"  {n}")
    if len(names) > show:
        print(f"  ... and {len(names) - show} more")


if model_tag or checkpoint_dir:
    directory = checkpoint_dir or os.path.join(get_base_dir(), model_tag)
    try:
        meta = read_meta(meta_path(directory, find_last_step(directory)))
        gpt_config, encoder_config, image_token_id = configs_from_meta(meta, directory)
        det_config = det_config_of(meta)  # a run with a detection head counts it too
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    source = directory
else:
    try:
        gpt_config, encoder_config, _ = preset_configs(model, vocab_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    image_token_id, source, det_config = 0, f"preset {model}", None

with torch.device("meta"):
    vlm = VLM(GPT(gpt_config), DeepEncoder(encoder_config), image_token_id,
              DetHead(det_config) if det_config else None)

print(f"{source}: GPT d{gpt_config.n_layer} (n_embd {gpt_config.n_embd}), encoder SAM {encoder_config.sam_dim} / "
      f"CLIP {encoder_config.clip_dim}")
try:
    if quant:
        list_matches(f"4-bit targets {quant_targets!r}", find_targets(vlm, quant_targets, exclude=r"lm_head"))
    if lora_r > 0:
        list_matches(f"LoRA targets {lora_targets!r}", find_targets(vlm, lora_targets))
    prepare_adapters(vlm, {k: user_config[k] for k in ADAPTER_KEYS})
except ValueError as e:
    raise SystemExit(f"error: {e}")
freeze(vlm, freeze_sam, freeze_compressor)  # exactly what training freezes, after the adapters as in training

rows = census(vlm)
print(f"{'area':<14} {'total':>14} {'trainable':>14} {'4-bit':>14}")
for area, (total, trainable, four_bit) in rows.items():
    if total:
        print(f"{area:<14} {total:>14,} {trainable:>14,} {four_bit:>14,}")
total = sum(r[0] for r in rows.values())
trainable = sum(r[1] for r in rows.values())
print(f"{'all':<14} {total:>14,} {trainable:>14,} {sum(r[2] for r in rows.values()):>14,}")
print(f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
