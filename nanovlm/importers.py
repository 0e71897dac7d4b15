"""
Importers for other projects' weights, from local files only (never a download):

    load_nanochat              a nanochat GPT checkpoint directory (model_*.pt + meta_*.json)
    load_deepseek_ocr_vision   DeepSeek-OCR's vision part as a new DeepEncoder
    load_deepseek_ocr_into     the same, into an existing encoder (e.g. a VLM's)
    load_hf_sam, load_hf_clip  Hugging Face SAM / CLIP vision towers into a DeepEncoder

Every importer checks every key and shape against the file and names the ones that are wrong, in one error.
"""

import glob
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open

from nanovlm.checkpoint import check_state_dict, expected_shapes, find_last_step, read_meta
from nanovlm.common import print0
from nanovlm.deepencoder import DeepEncoder, DeepEncoderConfig
from nanovlm.gpt import GPT, GPTConfig
from nanovlm.vlm import component_of


# ---- nanochat GPT checkpoints

def load_nanochat(checkpoint_dir, step=None, device="cpu"):
    """
    A nanochat checkpoint directory (model_{step:06d}.pt + meta_{step:06d}.json) -> (GPT, meta).
    The head counts come from meta["model_config"], never from the tensors: with n_kv_head == n_head no shape
    depends on the head count, so a wrong guess would load without error and compute garbage.
    """
    if step is None:
        step = find_last_step(checkpoint_dir, pattern=r"model_(\d{6})\.pt")
    device = torch.device(device)
    meta = read_meta(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"))
    if "model_config" not in meta:
        raise ValueError(f"{checkpoint_dir}/meta_{step:06d}.json has no model_config")
    try:
        config = GPTConfig(**meta["model_config"])
    except TypeError as e:
        raise ValueError(f"{checkpoint_dir}/meta_{step:06d}.json: bad model_config ({e})") from e

    path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"nanochat weights not found: {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcodes, ...: all mean the same to the user
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile'd models save this prefix
    if device.type != "cuda":
        # CUDA runs keep wte in bf16; CPU/MPS compute in fp32
        state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}

    with torch.device("meta"):
        model = GPT(config)
    check_state_dict(expected_shapes(model), state, path)
    model.to_empty(device=device)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rotary()
    model.eval()
    return model, meta


# ---- vision weight importers
# DeepSeek-OCR's vision part, and Hugging Face SAM / CLIP towers, into a DeepEncoder. The files are read lazily
# (safetensors headers first, then one tensor at a time), so the vision part of a multi-GB checkpoint loads
# without the rest of it in memory. Every key and shape is checked against the file's headers before any data is
# read, and dtypes are converted to the encoder's on load.

def safetensors_files(path):
    """The files of a safetensors checkpoint: the file itself, or a directory's shards (the ones its
    model.safetensors.index.json names, else every *.safetensors in it)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
        files = [os.path.join(path, shard) for shard in shards]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{index} names a shard that does not exist: {file}")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return files


def safetensors_headers(path):
    """{key: (file, shape)} over every file of the checkpoint, from the headers alone."""
    headers = {}
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    headers[key] = (file, tuple(f.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from e
    return headers


def file_shapes(encoder, plan):
    """{file key: shape} that a file must hold to fill `encoder` through `plan` (see read_vision_tensors)."""
    ours = expected_shapes(encoder)
    shapes = {}
    for name, keys in plan.items():
        shape = ours[name]
        for key in keys:
            shapes[key] = (shape[0] // len(keys),) + shape[1:]
    return shapes


def read_vision_tensors(path, encoder, plan, ignore, headers=None):
    """
    Read the tensors `plan` asks for and copy them into `encoder`.
    plan: {our parameter name: [file keys]}; several keys are concatenated on dim 0 (HF's q, k, v -> our qkv).
    ignore(file key) -> True for keys the file may hold that we do not load (a language model, HF-only heads).
    headers: safetensors_headers(path), when the caller has already read them.
    Every missing, unexpected or mis-shaped file key is named in one ValueError. Returns how many were ignored.
    """
    headers = headers or safetensors_headers(path)
    expected = file_shapes(encoder, plan)
    found = {k: torch.empty(shape, device="meta") for k, (_, shape) in headers.items() if not ignore(k)}
    check_state_dict(expected, found, path)

    by_file = {}
    for key in expected:
        by_file.setdefault(headers[key][0], []).append(key)
    tensors = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for key in keys:
                tensors[key] = f.get_tensor(key)
    state = {name: torch.cat([tensors[k] for k in keys]) if len(keys) > 1 else tensors[keys[0]]
             for name, keys in plan.items()}
    result = encoder.load_state_dict(state, strict=False)  # copies, converting dtype and device
    assert not result.unexpected_keys, f"plan names unknown parameters: {result.unexpected_keys}"
    return len(headers) - len(found)


# DeepSeek-OCR: our names are the checkpoint's with these prefixes stripped
DEEPSEEK_OCR_PREFIXES = {"sam.": "model.sam_model.", "clip.": "model.vision_model.",
                         "projector.": "model.projector.", "image_newline": "model.image_newline",
                         "view_seperator": "model.view_seperator"}


def deepseek_ocr_name(name):
    for ours, theirs in DEEPSEEK_OCR_PREFIXES.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise AssertionError(f"no checkpoint prefix for {name}")


def deepseek_ocr_plan(encoder, towers_only=False):
    names = [n for n in expected_shapes(encoder) if not towers_only or n.startswith(("sam.", "clip."))]
    return {name: [deepseek_ocr_name(name)] for name in names}


def load_deepseek_ocr_vision(path, config=None, device="cpu", dtype=torch.float32, towers_only=False):
    """
    A DeepEncoder with the vision weights of a DeepSeek-OCR safetensors checkpoint (a file, or a directory of
    shards with model.safetensors.index.json). config defaults to the real sizes. The language-model keys are
    skipped and counted. towers_only=True loads SAM and CLIP only and leaves the projector, image_newline and
    view_seperator freshly initialised: for a config whose out_dim is not DeepSeek-OCR's 1280.
    """
    config = config or DeepEncoderConfig()
    with torch.device("meta"):
        encoder = DeepEncoder(config)
    encoder.to_empty(device=device)
    encoder.to(dtype)
    if towers_only:
        encoder.init_weights()
    load_deepseek_ocr_into(path, encoder, towers_only)
    return encoder.eval()


def load_deepseek_ocr_into(path, encoder, towers_only=False):
    """Copy a DeepSeek-OCR checkpoint's vision weights into an existing DeepEncoder (see load_deepseek_ocr_vision)."""
    plan = deepseek_ocr_plan(encoder, towers_only)
    wanted = set(DEEPSEEK_OCR_PREFIXES.values())
    position_ids = "model.vision_model.embeddings.position_ids"  # a buffer (arange) some exports include

    def ignore(key):
        vision = any(key.startswith(p) for p in wanted)
        return not vision or key == position_ids or (towers_only and not key.startswith(
            ("model.sam_model.", "model.vision_model.")))

    skipped = read_vision_tensors(path, encoder, plan, ignore)
    print0(f"{path}: loaded {len(plan)} vision tensors into DeepEncoder, skipped {skipped} others "
          f"(language model{', projector and layout vectors' if towers_only else ''})")
    return encoder


# Hugging Face SamModel / SamVisionEncoder: the same tensors under other names; no net_2 / net_3
HF_SAM_RULES = [
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"^blocks\.(\d+)\.norm(\d)\.", r"layers.\1.layer_norm\2."),
    (r"^blocks\.", "layers."),
    (r"^neck\.0\.", "neck.conv1."),
    (r"^neck\.1\.", "neck.layer_norm1."),
    (r"^neck\.2\.", "neck.conv2."),
    (r"^neck\.3\.", "neck.layer_norm2."),
]
HF_SAM_HEADS = ("prompt_encoder.", "mask_decoder.", "shared_image_embedding.")  # SamModel parts we do not use


def hf_sam_name(name):
    """Our SAM parameter name (without "sam.") -> the Hugging Face one (without "vision_encoder.")."""
    for pattern, replacement in HF_SAM_RULES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return name


def hf_sam_plan(encoder, prefix="vision_encoder."):
    names = [n for n in expected_shapes(encoder) if n.startswith("sam.") and component_of("encoder." + n) == "sam"]
    return {name: [prefix + hf_sam_name(name[len("sam."):])] for name in names}


def load_hf_sam(path, encoder):
    """
    Load a Hugging Face SAM checkpoint (SamModel with its "vision_encoder." prefix, or a bare SamVisionEncoder)
    into encoder.sam. The compressor (net_2, net_3) has no counterpart there and keeps its current weights; the
    prompt encoder and mask decoder are skipped. Returns the encoder.
    """
    headers = safetensors_headers(path)
    prefix = "vision_encoder." if "vision_encoder.pos_embed" in headers or "pos_embed" not in headers else ""
    ignore = lambda key: key.startswith(HF_SAM_HEADS)
    skipped = read_vision_tensors(path, encoder, hf_sam_plan(encoder, prefix), ignore, headers)
    print0(f"{path}: loaded SAM into DeepEncoder (net_2/net_3 unchanged), skipped {skipped} mask-decoder tensors")
    return encoder


# Hugging Face CLIPVisionModel / CLIPModel: separate q, k, v projections, "encoder." instead of "transformer."
HF_CLIP_UNUSED = ("post_layernorm.", "embeddings.position_ids")  # the reference applies no final LayerNorm
HF_CLIP_OTHER_TOWERS = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def hf_clip_names(name):
    """Our CLIP parameter name (without "clip.") -> the Hugging Face names (without "vision_model.") it is made of."""
    match = re.match(r"^transformer\.layers\.(\d+)\.self_attn\.qkv_proj\.(weight|bias)$", name)
    if match:
        layer, kind = match.groups()
        return [f"encoder.layers.{layer}.self_attn.{s}_proj.{kind}" for s in "qkv"]
    return [re.sub(r"^transformer\.", "encoder.", name)]


def hf_clip_plan(encoder, prefix="vision_model."):
    return {name: [prefix + n for n in hf_clip_names(name[len("clip."):])]
            for name in expected_shapes(encoder) if name.startswith("clip.")}


def load_hf_clip(path, encoder):
    """
    Load a Hugging Face CLIP vision tower (CLIPVisionModel or CLIPModel, "vision_model." prefix or none) into
    encoder.clip, fusing q/k/v into qkv_proj. post_layernorm is skipped (the reference never applies it), and so
    are the text tower and the projections. Returns the encoder.
    """
    headers = safetensors_headers(path)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in headers) else ""
    ignore = lambda key: key.startswith(HF_CLIP_OTHER_TOWERS) or key[len(prefix):].startswith(HF_CLIP_UNUSED)
    skipped = read_vision_tensors(path, encoder, hf_clip_plan(encoder, prefix), ignore, headers)
    print0(f"{path}: loaded CLIP into DeepEncoder, skipped {skipped} tensors (post_layernorm, text tower, ...)")
    return encoder
