"""
Checkpoints. Our format is one directory per run (checkpoints/<model_tag>/):

    model_{step:06d}.safetensors     the weights (rank 0)
    meta_{step:06d}.json             model/encoder config, tokenizer, step, training config, loader state, metrics
    optim_{step:06d}_rank{r}.pt      optimizer state, one per rank

Every file is written atomically (temp file, fsync, rename) and the meta goes last: a step counts as saved only
once its meta exists, so a run killed mid-save leaves the previous checkpoint as the latest loadable one.

Importers read other projects' files (local paths only, never a download): load_nanochat for nanochat GPT
checkpoints, and the vision importers below for DeepSeek-OCR / Hugging Face towers. Every importer checks every
key and shape and names the ones that are wrong.
"""

import glob
import json
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanovlm.common import atomic_write
from nanovlm.gpt import GPT, GPTConfig


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


def save_checkpoint(checkpoint_dir, step, model_state, meta, optimizer_state=None, rank=0):
    """
    Save one step. Every rank calls it: rank 0 writes the weights and the meta, every rank its optimizer shard.
    The meta is written last, so a step whose meta exists is complete.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    if optimizer_state is not None:
        atomic_write(optim_path(checkpoint_dir, step, rank), lambda tmp: torch.save(optimizer_state, tmp))
    if rank == 0:
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


def load_checkpoint(checkpoint_dir, step=None, device="cpu", load_optimizer=False, rank=0):
    """(model_state, optimizer_state or None, meta) of `step`, by default the latest complete one."""
    if step is None:
        step = find_last_step(checkpoint_dir)
    meta = read_meta(meta_path(checkpoint_dir, step))
    model_state = read_safetensors(model_path(checkpoint_dir, step), device)
    optimizer_state = None
    if load_optimizer:
        path = optim_path(checkpoint_dir, step, rank)
        if not os.path.exists(path):
            raise FileNotFoundError(f"optimizer state not found: {path}")
        optimizer_state = torch.load(path, map_location=device, weights_only=True)
    return model_state, optimizer_state, meta


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
