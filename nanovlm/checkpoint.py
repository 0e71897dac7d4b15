"""
Checkpoints. Our format is one directory per run (checkpoints/<model_tag>/):

    model_{step:06d}.safetensors     the weights (rank 0)
    meta_{step:06d}.json             model/encoder config, tokenizer, step, training config and prompts, loader
                                     state, metrics
    optim_{step:06d}_rank{r}.pt      optimizer state, one per rank

Every file is written atomically (temp file, fsync, rename) and the meta goes last: a step counts as saved only
once its meta exists, so a run killed mid-save leaves the previous checkpoint as the latest loadable one.

Other projects' weights (nanochat, DeepSeek-OCR, Hugging Face towers) come in through importers.py.
"""

import json
import os
import re
from dataclasses import fields

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanovlm.common import atomic_write
from nanovlm.deepencoder import DeepEncoderConfig
from nanovlm.detection import DetHeadConfig
from nanovlm.gpt import GPTConfig
from nanovlm.image_process import resolve_mode
from nanovlm.lora import load_adapter, prepare_adapters, save_adapter
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import build_vlm


# ---- key checking shared by every loader

def check_state_dict(expected, found, source):
    """
    expected: {name: shape}; found: {name: tensor}. Raises one ValueError that names every missing, unexpected
    and mis-shaped key of `source` (a file or directory name).
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k}: expected {tuple(expected[k])}, found {tuple(found[k].shape)}"
                 for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {'; '.join(misshaped)}")
    if problems:
        raise ValueError(f"{source}: " + " | ".join(problems))


def expected_shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---- our format

def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.safetensors")


def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def adapter_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"adapter_{step:06d}.safetensors")


def save_checkpoint(checkpoint_dir, step, model_state, meta, optimizer_state=None, rank=0, adapter_model=None):
    """
    Save one step. Every rank calls it: rank 0 writes the weights and the meta, every rank its optimizer shard.
    With adapter_model (a LoRA run) only its adapters are written, and meta["adapter"] names the base they apply
    to. The meta is written last, so a step whose meta exists is complete.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    if optimizer_state is not None:
        atomic_write(optim_path(checkpoint_dir, step, rank), lambda tmp: torch.save(optimizer_state, tmp))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank's file is on disk before the meta says the step is complete
    if rank != 0:
        return
    if adapter_model is not None:
        save_adapter(adapter_model, adapter_path(checkpoint_dir, step), meta={"step": step})
    else:
        # safetensors wants contiguous tensors that do not share memory
        tensors = {k: v.detach().contiguous() for k, v in model_state.items()}
        atomic_write(model_path(checkpoint_dir, step), lambda tmp: save_file(tensors, tmp))
    meta = dict(meta, step=step)
    atomic_write(meta_path(checkpoint_dir, step), json.dumps(meta, indent=2).encode())


def find_last_step(checkpoint_dir, pattern=r"meta_(\d{6})\.json"):
    """The largest step that has a meta file (i.e. a complete save)."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint_dir}")
    steps = [int(m.group(1)) for name in os.listdir(checkpoint_dir) if (m := re.fullmatch(pattern, name))]
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    return max(steps)


def read_meta(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint meta not found: {path}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt checkpoint meta ({e})") from e


def read_safetensors(path, device="cpu"):
    try:
        return load_file(path, device=str(device))
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def load_checkpoint(checkpoint_dir, step=None, device="cpu", load_optimizer=False, rank=0, load_model=True):
    """(model_state, optimizer_state or None, meta) of `step`, by default the latest complete one."""
    if step is None:
        step = find_last_step(checkpoint_dir)
    meta = read_meta(meta_path(checkpoint_dir, step))
    # an adapter checkpoint holds no full weights: load_vlm rebuilds its base
    model_state = None
    if load_model and "adapter" not in meta:
        model_state = read_safetensors(model_path(checkpoint_dir, step), device)
    optimizer_state = None
    if load_optimizer:
        path = optim_path(checkpoint_dir, step, rank)
        if not os.path.exists(path):
            raise FileNotFoundError(f"optimizer state not found: {path}")
        optimizer_state = torch.load(path, map_location=device, weights_only=True)
    return model_state, optimizer_state, meta


def configs_from_meta(meta, source):
    """(GPTConfig, DeepEncoderConfig, image_token_id) of one of our checkpoint metas."""
    for key in ("model_config", "encoder_config", "image_token_id"):
        if key not in meta:
            raise ValueError(f"{source}: not a nanovlm model checkpoint (no {key})")
    encoder_config = dict(meta["encoder_config"])
    for f in fields(DeepEncoderConfig):  # JSON made the tuples lists
        if isinstance(f.default, tuple) and f.name in encoder_config:
            encoder_config[f.name] = tuple(encoder_config[f.name])
    return GPTConfig(**meta["model_config"]), DeepEncoderConfig(**encoder_config), meta["image_token_id"]


def det_config_of(meta):
    """The detection head's config of a checkpoint meta; None for a model without a head (every older one)."""
    return DetHeadConfig(**meta["det_head_config"]) if meta.get("det_head_config") else None


def image_mode_of(meta, flag=""):
    """The image mode to read with: the flag when one is given, else the one the checkpoint trained in; resolved
    (a bad name is a ValueError)."""
    return resolve_mode(flag or meta["image_mode"])


def load_vlm(checkpoint_dir, step=None, device="cpu", training=False):
    """
    (VLM, tokenizer, meta) from one of our checkpoint directories, by default its latest step. An adapter
    checkpoint (a LoRA / QLoRA run) is its base checkpoint, quantized and wrapped as it was trained, plus the
    adapter file; training=True readies that for more training (resume). The only place a model is rebuilt.
    """
    if step is None:
        step = find_last_step(checkpoint_dir)
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    if "adapter" in meta:
        adapter = meta["adapter"]
        model, tokenizer, _ = load_vlm(adapter_base_dir(checkpoint_dir, adapter), adapter["base_step"], device)
        prepare_adapters(model, adapter["config"], training=training)
        load_adapter(model, adapter_path(checkpoint_dir, step))
        return model.eval(), tokenizer, meta
    model = build_vlm(*configs_from_meta(meta, meta_path(checkpoint_dir, step)), device=device, init=False,
                      det_config=det_config_of(meta))
    check_state_dict(expected_shapes(model), model_state, model_path(checkpoint_dir, step))
    if torch.device(device).type == "cuda":
        model.load_state_dict(model_state, strict=True, assign=True)  # keeps a CUDA run's bf16 wte as it was
    else:
        model.load_state_dict(model_state, strict=True)  # CPU/MPS compute in fp32: bf16 tensors are upcast
    tokenizer = Tokenizer.from_directory(os.path.join(checkpoint_dir, meta.get("tokenizer_dir", "tokenizer")))
    model.eval()
    return model, tokenizer, meta


def adapter_base_dir(checkpoint_dir, adapter):
    """
    The base checkpoint of an adapter run. Metas store it relative to the adapter run's parent directory (the
    checkpoints dir), so a checkpoints dir that moves keeps working; an absolute path (older metas) is used as is.
    """
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), adapter["base_dir"]))


def relative_base_dir(checkpoint_dir, base_dir):
    """How a meta names base_dir: relative to checkpoint_dir's parent (see adapter_base_dir)."""
    return os.path.relpath(os.path.abspath(base_dir), os.path.dirname(os.path.abspath(checkpoint_dir)))


# ---- which prompt to read with

DEFAULT_PROMPT = "<image>\nOCR this image."  # for checkpoints whose meta records no training prompts (older runs)


def training_prompt(meta):
    """The prompt the checkpoint trained on most often (meta["prompts"]: {prompt: records}, most common first);
    None where the meta does not say."""
    prompts = meta.get("prompts") or {}
    return max(prompts, key=prompts.get) if prompts else None


def reading_prompt(meta, flag=""):
    """
    (prompt, note): a --prompt flag when one is given, else the checkpoint's training prompt, else DEFAULT_PROMPT;
    note says which of the last two it is (None for the flag). A model answers best when asked what it was
    trained on: a prompt it never saw is noise to a small model. A flag comes as typed in a shell ("\\n" for a
    newline) and gets the image first when it has none, as every training prompt does.
    """
    if flag:
        prompt = flag.replace("\\n", "\n")
        return (prompt if "<image>" in prompt else "<image>\n" + prompt), None
    prompt = training_prompt(meta)
    if prompt:
        return prompt, "the checkpoint's training prompt"
    return DEFAULT_PROMPT, "the default: the checkpoint records no training prompt"
