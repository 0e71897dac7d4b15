"""The Triton NF4 kernels, run by Triton's interpreter on CPU tensors, against the plain torch path and the
bitsandbytes fixtures: dequantize (bit for bit), the fused decode matmul and the input gradient, Linear4bit with
LoRA on top, odd shapes, every blocksize, both double-quantization settings. `pytest -k triton` selects them."""

import glob
import os
import types
import warnings

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit then builds interpreted kernels

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("triton")

from conftest import FIXTURES
from nanovlm import nf4
from nanovlm.lora import apply_lora
from nanovlm.nf4 import KERNEL_ENV, Linear4bit, dequantize_flat, dequantize_nf4, quantize_nf4

nf4_triton = pytest.importorskip("nanovlm.nf4_triton")
pytestmark = pytest.mark.usefixtures("one_thread")
NF4_FIXTURES = sorted(glob.glob(os.path.join(FIXTURES, "nf4_*.pt")))
# (shape, blocksize): blocks that straddle rows, odd K, an odd element count, a blocksize larger than the weight
SHAPES = [((64, 256), 64), ((33, 301), 128), ((7, 129), 32), ((5, 3), 4096), ((48, 96), 256), ((3, 1000), 1024)]


@pytest.fixture
def kernel(monkeypatch):
    """Force a path: kernel("triton") or kernel("torch")."""
    return lambda name: monkeypatch.setenv(KERNEL_ENV, name)


def plain_dequantize(state, dtype):
    nested = {k: state[k] for k in ("nested_absmax", "nested_code", "nested_offset", "nested_blocksize") if k in state}
    numel = state["shape"][0] * state["shape"][1]
    return dequantize_flat(state["packed"], state["absmax"], state["code"], state["blocksize"], numel, dtype,
                           **nested).view(state["shape"])


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", SHAPES)
def test_triton_dequantize_is_bit_identical_to_torch(shape, blocksize, double_quant):
    torch.manual_seed(0)
    state = quantize_nf4(torch.randn(shape) * 0.02, blocksize, double_quant)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(nf4_triton.dequantize(state, dtype), plain_dequantize(state, dtype)), dtype


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_triton_dequantize_every_blocksize(blocksize):
    torch.manual_seed(blocksize)
    state = quantize_nf4(torch.randn(17, 515), blocksize, double_quant=True)  # 8755 elements: odd
    assert torch.equal(nf4_triton.dequantize(state, torch.float32), plain_dequantize(state, torch.float32))


@pytest.mark.parametrize("path", NF4_FIXTURES, ids=os.path.basename)
def test_triton_dequantize_reproduces_bitsandbytes(path, kernel):
    ref = torch.load(path, weights_only=True)
    state = dict(packed=ref["packed"], absmax=ref["absmax"], code=ref["code"], blocksize=ref["meta"]["blocksize"],
                 shape=tuple(ref["weight"].shape), dtype=ref["weight"].dtype)
    if ref["meta"]["double_quant"]:
        state.update({k: ref[k] for k in ("nested_absmax", "nested_code", "nested_offset", "nested_blocksize")})
    kernel("triton")
    assert torch.equal(dequantize_nf4(state), ref["dequant"])  # bitsandbytes' own codes and scales, bit for bit


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", SHAPES)
def test_triton_fused_matmul_and_input_gradient_match_torch(shape, blocksize, double_quant):
    torch.manual_seed(1)
    state = quantize_nf4(torch.randn(shape) * 0.02, blocksize, double_quant)
    w = plain_dequantize(state, torch.float32)
    for rows in (1, 5, 17):  # decode: one token, a few rows, more rows than one tile
        x = torch.randn(rows, shape[1])
        g = torch.randn(rows, shape[0])
        torch.testing.assert_close(nf4_triton.matmul(x, state), x @ w.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(nf4_triton.matmul_grad_input(g, state), g @ w, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, shape[1]).bfloat16()  # 16-bit inputs: bf16 weights, fp32 accumulation, as F.linear
    ref = F.linear(x.float(), plain_dequantize(state, torch.bfloat16).float())
    torch.testing.assert_close(nf4_triton.matmul(x, state).float(), ref, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_linear4bit_forward_and_input_gradient(double_quant, kernel):
    torch.manual_seed(2)
    linear = nn.Linear(96, 40)
    layer = Linear4bit.from_linear(linear, blocksize=32, double_quant=double_quant)
    results = {}
    for name in ("torch", "triton"):
        kernel(name)
        for rows in (2, nf4.FUSED_MAX_ROWS + 6):  # the fused kernels, and dequantize + F.linear
            x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)).requires_grad_(True)
            y = layer(x.view(1, rows, 96))
            y.backward(torch.ones_like(y))
            results[name, rows] = (y.detach(), x.grad)
    for rows in (2, nf4.FUSED_MAX_ROWS + 6):
        for got, want in zip(results["triton", rows], results["torch", rows]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is None


def test_triton_qlora_matches_the_torch_path(kernel):
    """LoRA on a 4-bit base: forward, the adapters' gradients and the input gradient agree across the paths."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 80), nn.GELU(), nn.Linear(80, 32))
    for i in (0, 2):
        model[i] = Linear4bit.from_linear(model[i], blocksize=64, double_quant=True)
    apply_lora(model, r"0|2", r=4, alpha=8)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B.weight, std=0.1)
    x0 = torch.randn(3, 64)
    grads = {}
    for name in ("torch", "triton"):
        kernel(name)
        model.zero_grad()
        x = x0.clone().requires_grad_(True)
        model(x).square().sum().backward()
        grads[name] = [x.grad] + [p.grad for n, p in model.named_parameters() if "lora_" in n]
    for got, want in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_triton_path_choice(kernel, monkeypatch):
    cpu = torch.zeros(1)
    kernel("")
    assert nf4.kernel_for(cpu) == "torch"  # automatic: Triton only for CUDA tensors
    kernel("triton")
    assert nf4.kernel_for(cpu) == "triton"  # forced, and the interpreter is on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # forced but cannot run: an error, not a fallback
        nf4.kernel_for(cpu)
    kernel("fast")
    with pytest.raises(ValueError, match=KERNEL_ENV):
        nf4.kernel_for(cpu)


def test_triton_unavailable_on_cuda_falls_back_once_with_the_reason(kernel, monkeypatch):
    kernel("")
    monkeypatch.setattr(nf4, "_triton_module", None)
    monkeypatch.setattr(nf4, "_triton_error", "ImportError: No module named 'triton'")
    monkeypatch.setattr(nf4, "_warned", set())
    cuda_weight = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"))
    with pytest.warns(UserWarning, match="No module named 'triton'"):
        assert nf4.kernel_for(cuda_weight) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every layer of every step
        assert nf4.kernel_for(cuda_weight) == "torch"
    kernel("triton")
    with pytest.raises(RuntimeError, match="cannot be imported"):
        nf4.kernel_for(cuda_weight)
