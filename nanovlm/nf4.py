"""
NF4: 4-bit NormalFloat weights (QLoRA, Dettmers et al. 2023), byte-compatible with bitsandbytes. Plain PyTorch
here; on CUDA the dequantize and the 4-bit matmuls run in the Triton kernels of nf4_triton.py (see kernel_for).

    weight (any shape, any float dtype)
      -> flatten row-major, in fp32
      -> blocks of `blocksize` consecutive elements, one fp32 absmax per block
      -> each element scaled by 1/absmax, snapped to the nearest of 16 NF4 levels (a 4-bit code)
      -> two codes a byte, the first element in the high nibble                 packed uint8 ((numel+1)//2, 1)

Double quantization shrinks the scales too: the absmax vector minus its mean is quantized to 8 bits with the
signed "dynamic" map in blocks of 256, which leaves one fp32 per 256 scales plus the mean.
At blocksize 64 that is 4.127 bits a weight instead of 4.5.

A quantization state is a plain dict, with the same names as bitsandbytes' QuantState fields:
    packed, absmax, code, blocksize, shape, dtype                    (always)
    nested_absmax, nested_code, nested_offset, nested_blocksize      (double quantization; absmax is then uint8)

`Linear4bit` is an nn.Linear that keeps only this state and dequantizes on the fly; `quantize_model` swaps
it in. Module names are matched by `name_matches` (also used by lora.py).
"""

import json
import math
import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.common import PLAIN_LINEARS

# The 16 NF4 levels as bitsandbytes stores them. Regenerating them from the normal quantiles agrees only to 1e-7,
# so the fp32 literals are the definition. Index 7 is an exact zero.
NF4_LEVELS = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# Midpoints between neighbouring levels: the decision thresholds of the nearest-level rule
NF4_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]
NESTED_BLOCKSIZE = 256  # second-level blocksize of double quantization, fixed by bitsandbytes


def check_blocksize(blocksize):
    if not (isinstance(blocksize, int) and 32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize!r}")


def dynamic_map_8bit(device=None):
    """
    bitsandbytes' signed 8-bit "dynamic" map (256 sorted fp32 values in [-0.993, 1]), used for the nested absmax.
    Decade i = 0..6 holds the midpoints of 2**i + 1 evenly spaced points on [0.1, 1], scaled by 10**(i - 6), with
    both signs; then 0 and 1. The fp32 arithmetic below reproduces bitsandbytes' table bit for bit.
    """
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = mids * (10.0 ** (i - 6))  # an fp32 multiply, as in the reference
        values += [scaled, -scaled]
    values.append(torch.tensor([0.0, 1.0]))
    return torch.cat(values).sort().values.to(device)


# -----------------------------------------------------------------------------
# Quantize

def blockwise(x, blocksize):
    """A flat fp32 tensor as (nblocks, blocksize), zero-padded: zeros change no absmax."""
    nblocks = (x.numel() + blocksize - 1) // blocksize  # integer ops: sizes are symbolic under torch.compile
    pad = nblocks * blocksize - x.numel()
    return (F.pad(x, (0, pad)) if pad else x).view(nblocks, blocksize)


def quantize_nf4(weight, blocksize=64, double_quant=False):
    """NF4-quantize a tensor of any shape. Returns the state dict described at the top of this file."""
    check_blocksize(blocksize)
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    x = weight.detach().reshape(-1).float()  # always fp32: bf16 and fp32 inputs of the "same" weight give other codes
    numel = x.numel()
    blocks = blockwise(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # multiply by the reciprocal (not divide) to land on the same fp32 values as bitsandbytes; floor 0 scales
    scaled = (blocks * (1.0 / absmax.clamp_min(1e-38))[:, None]).clamp(-1, 1).view(-1)
    # nearest level = the number of midpoints strictly below the value (a tie goes to the lower level)
    thresholds = torch.tensor(NF4_THRESHOLDS, dtype=torch.float32, device=x.device)
    num_codes = numel + numel % 2  # the padding after an odd numel is 0.0, i.e. code 7
    codes = torch.bucketize(scaled[:num_codes], thresholds, out_int32=True)
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).view(-1, 1)
    state = dict(packed=packed, absmax=absmax, code=torch.tensor(NF4_LEVELS, device=x.device),
                 blocksize=blocksize, shape=tuple(weight.shape), dtype=weight.dtype)
    if double_quant:
        state.update(quantize_absmax(absmax))  # the 4-bit codes above used the exact absmax
    return state


def quantize_absmax(absmax):
    """Double quantization: 8-bit codes of (absmax - mean) in blocks of 256, plus per-block scale and the mean."""
    offset = absmax.mean()
    centred = blockwise(absmax - offset, NESTED_BLOCKSIZE)
    nested_absmax = centred.abs().amax(dim=1)
    scaled = (centred * (1.0 / nested_absmax.clamp_min(1e-38))[:, None]).clamp(-1, 1).view(-1)[:absmax.numel()]
    dyn = dynamic_map_8bit(absmax.device)
    midpoints = (dyn[:-1] + dyn[1:]) / 2  # nearest entry, ties to the lower one, as for the 4-bit codes
    q = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return dict(absmax=q, nested_absmax=nested_absmax, nested_code=dyn, nested_offset=offset,
                nested_blocksize=NESTED_BLOCKSIZE)


# -----------------------------------------------------------------------------
# Dequantize: the plain torch path (CPU, and the reference every kernel is checked against)

def absmax_fp32(absmax, nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256):
    """The per-block scales in fp32; for a double-quantized state dyn[q] * absmax2[i // 256] + offset."""
    if nested_absmax is None:
        return absmax.float()
    values = blockwise(nested_code[absmax.long()], nested_blocksize) * nested_absmax[:, None]
    return values.view(-1)[:absmax.numel()] + nested_offset


def dequantize_flat(packed, absmax, code, blocksize, numel, dtype, nested_absmax=None, nested_code=None,
                    nested_offset=None, nested_blocksize=256):
    """The first numel weights, flat, in dtype: code[c] * absmax[i // blocksize] in fp32, then cast."""
    scales = absmax_fp32(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    # one lookup per byte instead of two per element: row b of the table holds the levels of b's two nibbles
    # (an embedding lookup, the fastest gather on CPU)
    pair_table = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).float()  # (256, 2)
    values = F.embedding(packed.view(-1).long(), pair_table).view(-1)
    values = blockwise(values, blocksize) * scales[:, None]
    return values.view(-1)[:numel].to(dtype)


# -----------------------------------------------------------------------------
# Which kernels run: the Triton ones (nf4_triton.py) on CUDA, plain torch elsewhere.
# NANOVLM_NF4_KERNEL=triton|torch forces a path; with TRITON_INTERPRET=1 the Triton path runs on CPU tensors.

KERNEL_ENV = "NANOVLM_NF4_KERNEL"
_triton_module, _triton_error, _warned = None, None, set()


def load_triton_kernels():
    """nanovlm.nf4_triton, or None with the reason kept in _triton_error (no triton installed, ...)."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from nanovlm import nf4_triton
            _triton_module = nf4_triton
        except Exception as e:  # ImportError, or a triton that fails to initialise
            _triton_error = f"{type(e).__name__}: {e}"
    return _triton_module


def kernel_for(tensor):
    """
    "triton" or "torch" for a 4-bit weight living where `tensor` does. Automatic: Triton on CUDA, torch on other
    devices. A forced Triton path that cannot run is an error; an automatic one falls back to torch and says so
    once, with the reason, never silently.
    """
    choice = os.environ.get(KERNEL_ENV, "").strip().lower()
    if choice not in ("", "auto", "triton", "torch"):
        raise ValueError(f"{KERNEL_ENV}={choice!r}: use triton, torch, or leave it unset (automatic)")
    if choice == "torch" or (choice in ("", "auto") and not tensor.is_cuda):
        return "torch"
    reason = None
    if load_triton_kernels() is None:
        reason = f"triton cannot be imported ({_triton_error})"
    elif not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        reason = f"the weight is on {tensor.device.type}: Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1"
    if reason is None:
        return "triton"
    if choice == "triton":
        raise RuntimeError(f"{KERNEL_ENV}=triton, but {reason}")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"NF4 Triton kernels unavailable, using the plain torch path: {reason}")
    return "torch"


def dequantize_nf4(state, dtype=None):
    """Reconstruct the weight (state's shape, dtype or state's dtype), with the kernel kernel_for picks."""
    dtype = dtype or state["dtype"]
    packed = state["packed"]
    if kernel_for(packed) == "triton":
        return _triton_module.dequantize(state, dtype)
    nested = {k: state[k] for k in ("nested_absmax", "nested_code", "nested_offset", "nested_blocksize") if k in state}
    numel = math.prod(state["shape"])
    flat = dequantize_flat(packed, state["absmax"], state["code"], state["blocksize"], numel, dtype, **nested)
    return flat.view(state["shape"])


def unpack_codes(packed, numel):
    """The 4-bit code of every element (uint8), for inspection and tests."""
    packed = packed.view(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:numel]


def state_nbytes(state):
    """Bytes a state takes: packed codes, scales, nested scales, offset and code tables."""
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


# -----------------------------------------------------------------------------
# bitsandbytes serialization: `weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
# `weight.nested_quant_map`, and the non-tensor fields as JSON bytes in `weight.quant_state.bitsandbytes__nf4`

def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def state_to_bnb(state, name="weight"):
    """A state as the tensors bitsandbytes' Linear4bit.state_dict() writes for its weight `name`."""
    fields = dict(quant_type="nf4", blocksize=state["blocksize"], dtype=dtype_name(state["dtype"]),
                  shape=list(state["shape"]))
    tensors = {name: state["packed"], f"{name}.absmax": state["absmax"], f"{name}.quant_map": state["code"]}
    if "nested_absmax" in state:
        fields.update(nested_blocksize=state["nested_blocksize"], nested_dtype="float32",
                      nested_offset=float(state["nested_offset"]))
        tensors[f"{name}.nested_absmax"] = state["nested_absmax"]
        tensors[f"{name}.nested_quant_map"] = state["nested_code"]
    json_bytes = json.dumps(fields).encode("utf-8")
    tensors[f"{name}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json_bytes), dtype=torch.uint8)
    return tensors


def state_from_bnb(tensors, name="weight"):
    """The state of weight `name` from a bitsandbytes-style 4-bit state dict (ours or one written elsewhere)."""
    quant_keys = [k for k in tensors if k.startswith(f"{name}.quant_state.")]
    if len(quant_keys) != 1:
        raise ValueError(f"expected one '{name}.quant_state.bitsandbytes__<type>' entry, found {quant_keys}")
    fields = json.loads(bytes(tensors[quant_keys[0]].cpu().tolist()).decode("utf-8"))
    if fields.get("quant_type") != "nf4" or not quant_keys[0].endswith("__nf4"):
        raise ValueError(f"{quant_keys[0]}: only NF4 is supported, not {fields.get('quant_type')!r}")
    dtype = getattr(torch, fields["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{quant_keys[0]}: unknown dtype {fields['dtype']!r}")
    packed, absmax = tensors[name], tensors[f"{name}.absmax"]
    state = dict(packed=packed.view(torch.uint8).view(-1, 1),  # another quant_storage dtype is only a view
                 absmax=absmax, code=tensors[f"{name}.quant_map"].float(), blocksize=int(fields["blocksize"]),
                 shape=tuple(fields["shape"]), dtype=dtype)
    if "nested_offset" in fields:
        state.update(nested_absmax=tensors[f"{name}.nested_absmax"].float(),
                     nested_code=tensors[f"{name}.nested_quant_map"].float(),
                     nested_offset=torch.tensor(float(fields["nested_offset"]), device=absmax.device),
                     nested_blocksize=int(fields["nested_blocksize"]))
    check_state(state, name)
    return state


def check_state(state, name="weight"):
    """Sizes that must agree, so a corrupt or foreign state fails here and not inside a kernel."""
    numel = math.prod(state["shape"])
    nblocks = math.ceil(numel / state["blocksize"])
    if state["packed"].numel() != (numel + 1) // 2:
        raise ValueError(f"{name}: {state['packed'].numel()} packed bytes for shape {state['shape']}, "
                         f"expected {(numel + 1) // 2}")
    if state["absmax"].numel() != nblocks:
        raise ValueError(f"{name}: {state['absmax'].numel()} absmax values, expected {nblocks} "
                         f"(shape {state['shape']}, blocksize {state['blocksize']})")
    if "nested_absmax" in state:
        if state["absmax"].dtype != torch.uint8:
            raise ValueError(f"{name}: double-quantized absmax must be uint8, got {state['absmax'].dtype}")
        nested_blocks = math.ceil(nblocks / state["nested_blocksize"])
        if state["nested_absmax"].numel() != nested_blocks:
            raise ValueError(f"{name}: {state['nested_absmax'].numel()} nested absmax values, expected {nested_blocks}")


# -----------------------------------------------------------------------------
# The 4-bit Linear layer

# Products with at most this many rows (decode: batch x new tokens) run in the fused Triton kernels, which read
# the 4-bit codes straight into the matmul; larger ones dequantize once and use the vendor GEMM, which wins when
# the weight is reused across many rows.
FUSED_MAX_ROWS = 64


class DequantLinear(torch.autograd.Function):
    """
    x @ W^T with W dequantized on the fly. The backward pass dequantizes W again instead of saving it, so only the
    4-bit state stays alive between forward and backward (the point of QLoRA), and W never gets a gradient.
    On the Triton path, few rows never materialize W at all (nf4_triton.matmul / matmul_grad_input).
    """

    @staticmethod
    def forward(ctx, x, state):
        ctx.state = state
        rows = x.numel() // x.size(-1)
        if rows <= FUSED_MAX_ROWS and kernel_for(state["packed"]) == "triton":
            out = _triton_module.matmul(x.reshape(rows, x.size(-1)), state)
            return out.view(*x.shape[:-1], out.size(-1))
        return F.linear(x, dequantize_nf4(state, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        rows = grad_out.numel() // grad_out.size(-1)
        if rows <= FUSED_MAX_ROWS and kernel_for(ctx.state["packed"]) == "triton":
            grad_x = _triton_module.matmul_grad_input(grad_out.reshape(rows, grad_out.size(-1)), ctx.state)
            return grad_x.view(*grad_out.shape[:-1], grad_x.size(-1)), None
        return grad_out @ dequantize_nf4(ctx.state, grad_out.dtype), None


QUANT_BUFFERS = ("absmax", "code", "nested_absmax", "nested_code", "nested_offset")


class Linear4bit(nn.Module):
    """
    A Linear whose weight is NF4. `weight` is the packed uint8 parameter (frozen); the scales are buffers; the bias
    stays in full precision. Computes in compute_dtype (default bf16 on CUDA, fp32 on CPU) and returns the input
    dtype. state_dict() uses bitsandbytes' keys; load_state_dict() takes those or a full-precision `weight`.
    """

    def __init__(self, in_features, out_features, bias=True, blocksize=64, double_quant=False, compute_dtype=None,
                 device=None, state=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        if state is None:  # a zero weight, to be filled by load_state_dict
            state = quantize_nf4(torch.zeros(out_features, in_features, device=device), blocksize, double_quant)
        self.set_state(state)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear, blocksize=64, double_quant=False, compute_dtype=None):
        state = quantize_nf4(linear.weight, blocksize, double_quant)
        layer = cls(linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype, state=state)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    def set_state(self, state):
        assert tuple(state["shape"]) == (self.out_features, self.in_features), \
            f"4-bit weight of shape {tuple(state['shape'])} in a {self.in_features}->{self.out_features} Linear"
        self.weight = nn.Parameter(state["packed"], requires_grad=False)
        self.blocksize, self.weight_dtype = state["blocksize"], state["dtype"]
        self.nested_blocksize = state.get("nested_blocksize", NESTED_BLOCKSIZE)
        for name in QUANT_BUFFERS:
            self.register_buffer(name, state.get(name), persistent=False)  # saved by _save_to_state_dict

    def quant_state(self):
        state = dict(packed=self.weight, absmax=self.absmax, code=self.code, blocksize=self.blocksize,
                     shape=(self.out_features, self.in_features), dtype=self.weight_dtype)
        if self.double_quant:
            state.update(nested_absmax=self.nested_absmax, nested_code=self.nested_code,
                         nested_offset=self.nested_offset, nested_blocksize=self.nested_blocksize)
        return state

    @property
    def double_quant(self):
        return self.nested_absmax is not None

    def dequantize(self, dtype=None):
        return dequantize_nf4(self.quant_state(), dtype)

    def forward(self, x):
        dtype = self.compute_dtype or (torch.bfloat16 if self.weight.is_cuda else torch.float32)
        out = DequantLinear.apply(x.to(dtype), self.quant_state())
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() move the 4-bit state like any buffer, but a cast such as model.bfloat16() must not
        # round the fp32 scales: keep each buffer's dtype and take only the new device
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, buf in before.items():
            self._buffers[name] = buf.to(self._buffers[name].device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in state_to_bnb(self.quant_state()).items():
            destination[prefix + key] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        device = self.weight.device
        weight = state_dict.get(prefix + "weight")
        if weight is None:
            missing_keys.append(prefix + "weight")
        elif weight.is_floating_point():  # a full-precision checkpoint: quantize it with this layer's settings
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: shape {tuple(weight.shape)} does not fit "
                                  f"({self.out_features}, {self.in_features})")
            else:
                self.set_state(quantize_nf4(weight.to(device), self.blocksize, self.double_quant))
        else:
            try:
                tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "weight.")}
                tensors["weight"] = weight
                state = state_from_bnb(tensors)
                if tuple(state["shape"]) != (self.out_features, self.in_features):
                    raise ValueError(f"shape {state['shape']} does not fit ({self.out_features}, {self.in_features})")
                self.set_state({k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()})
            except (ValueError, KeyError) as e:
                error_msgs.append(f"{prefix}weight: {e}")
        if self.bias is not None:
            bias = state_dict.get(prefix + "bias")
            if bias is None:
                missing_keys.append(prefix + "bias")
            elif bias.shape != self.bias.shape:
                error_msgs.append(f"{prefix}bias: shape {tuple(bias.shape)} does not fit {tuple(self.bias.shape)}")
            else:
                with torch.no_grad():
                    self.bias.copy_(bias)
        if strict:
            known = {"weight", "bias"} if self.bias is not None else {"weight"}
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):].split(".")[0] not in known:
                    unexpected_keys.append(key)
                elif key == prefix + "bias" and self.bias is None:
                    unexpected_keys.append(key)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def param_elements(module, param_name, p):
    """How many weights a parameter stands for: a 4-bit Linear's packed uint8 weight holds two per byte."""
    if isinstance(module, Linear4bit) and param_name == "weight":
        return module.in_features * module.out_features
    return p.numel()


# -----------------------------------------------------------------------------
# Swapping Linears in a model

def name_matches(pattern, name):
    """
    Does the regex match this module name? It must match the WHOLE name or a whole dotted tail of it (re.fullmatch
    after an optional `prefix.`). So `c_q` and `attn\\.c_q` match `gpt.transformer.h.0.attn.c_q`, and
    `transformer\\.h\\.\\d+\\.attn\\.c_q` matches it in a bare GPT and in the VLM alike; but `proj` does not match
    `c_proj` and `qkv` does not match CLIP's `qkv_proj`, so a short name never leaks into another tower by accident.
    """
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) is not None


def replace_module(model, name, new):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def quantize_model(model, include=None, exclude=r"lm_head", blocksize=64, double_quant=False, compute_dtype=None):
    """
    Swap nn.Linear modules for Linear4bit, in place. include / exclude are regexes on module names (see
    name_matches); include=None takes every Linear. lm_head is excluded by default; norms and embeddings are not
    Linears and stay as they are. Returns the names of the quantized modules.
    """
    names = []
    for name, module in list(model.named_modules()):
        # exact types: other subclasses (e.g. inside nn.MultiheadAttention) read .weight directly and would break
        if type(module) not in PLAIN_LINEARS or name.rpartition(".")[2] in ("lora_A", "lora_B"):
            continue
        if (include is not None and not name_matches(include, name)) or (exclude and name_matches(exclude, name)):
            continue
        replace_module(model, name, Linear4bit.from_linear(module, blocksize, double_quant, compute_dtype))
        names.append(name)
    if not names:
        raise ValueError(f"quantize_model: no nn.Linear matches include={include!r} exclude={exclude!r}")
    return names
