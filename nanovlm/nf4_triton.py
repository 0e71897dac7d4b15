"""
The NF4 kernels in Triton: dequantize, a fused 4-bit matmul for decode, and the input gradient through the frozen
4-bit weight. They read the state nf4.py writes (bitsandbytes' layout) and never write a 16-bit copy of the weight,
except `dequantize` itself, whose job that is.

Weight element (n, k) of an (N, K) weight is flat index f = n*K + k: its code is the high nibble of byte f // 2
when f is even, the low one when f is odd, and its scale is absmax[f // blocksize]. Blocks may straddle rows and
K may be odd, so every tile computes its codes and scales from f, never from the row alone.

The kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how the tests check them here).
This file imports triton at the top: nf4.py imports it only when a Triton path is asked for.
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def nf4_weights(flat, mask, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 weights at flat indices `flat` (any tile shape): code[nibble] * scale, the plain path's two fp32 ops."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - flat % 2) * 4)) & 0xF  # the first element of a byte is its high nibble
    level = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = flat // BLOCKSIZE
    if NESTED:  # double quantization: dyn[q] * absmax2[block // 256] + offset, in this order, as the plain path
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0) * \
            tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = scale + tl.load(nested_offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return level * scale


@triton.jit
def cast(x, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even. bf16 is rounded in integers: the same bits on a GPU and in the
    interpreter (whose float cast to bf16 truncates), so the tests can ask for exact equality."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (the interpreter only, whose dot multiplies bf16's raw bits) widens
    16-bit operands to fp32 first: the products are exact either way, so the result is the same math."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def dequantize_kernel(out_ptr, numel, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                      nested_offset_ptr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                      NESTED_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    flat = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < numel
    w = nf4_weights(flat, mask, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                    nested_offset_ptr, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE)
    tl.store(out_ptr + flat, cast(w, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def matmul_kernel(x_ptr, out_ptr, M, N, K, stride_xm, stride_om, packed_ptr, code_ptr, absmax_ptr,
                  nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, BLOCKSIZE: tl.constexpr,
                  NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, N) = x (M, K) @ W^T: each program owns a BLOCK_M x BLOCK_N tile and walks K, dequantizing the
    BLOCK_N x BLOCK_K slice of W it needs in registers."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        w_mask = (rn[:, None] < N) & (rk[None, :] < K)
        w = nf4_weights(rn[:, None] * K + rk[None, :], w_mask, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr,
                        nested_code_ptr, nested_offset_ptr, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE)
        acc += dot(x, tl.trans(cast(w, x.dtype)), PRECISION, UPCAST)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], cast(acc, out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def matmul_grad_input_kernel(g_ptr, out_ptr, M, N, K, stride_gm, stride_om, packed_ptr, code_ptr, absmax_ptr,
                             nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, BLOCKSIZE: tl.constexpr,
                             NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, PRECISION: tl.constexpr,
                             UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, K) = g (M, N) @ W: the input gradient of x @ W^T. Each program owns a BLOCK_M x BLOCK_K tile and
    walks N."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N),
                    other=0.0)
        w_mask = (rn[:, None] < N) & (rk[None, :] < K)
        w = nf4_weights(rn[:, None] * K + rk[None, :], w_mask, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr,
                        nested_code_ptr, nested_offset_ptr, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE)
        acc += dot(g, cast(w, g.dtype), PRECISION, UPCAST)
    tl.store(out_ptr + rm[:, None] * stride_om + rk[None, :], cast(acc, out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


# -----------------------------------------------------------------------------
# Launchers: a state dict in, a tensor out

def state_args(state):
    """The state's tensors in the kernels' argument order, and its constexprs. Without double quantization the
    nested pointers are never read; absmax stands in for them."""
    absmax = state["absmax"]
    nested = "nested_absmax" in state
    offset = state["nested_offset"].reshape(1) if nested else absmax
    tensors = (state["packed"], state["code"], absmax, state["nested_absmax"] if nested else absmax,
               state["nested_code"] if nested else absmax, offset)
    constexprs = dict(BLOCKSIZE=state["blocksize"], NESTED=nested,
                      NESTED_BLOCKSIZE=state.get("nested_blocksize", 256))
    return tensors, constexprs


def check_size(numel):
    # flat indices are int32 inside the kernels
    if numel >= 2 ** 31:
        raise ValueError(f"a 4-bit weight of {numel:,} elements is too large for the Triton kernels (< 2**31)")


def dequantize(state, dtype, block=1024):
    """The whole weight in dtype, flat index order (reshape to state['shape'])."""
    numel = 1
    for d in state["shape"]:
        numel *= d
    check_size(numel)
    out = torch.empty(numel, dtype=dtype, device=state["packed"].device)
    tensors, constexprs = state_args(state)
    dequantize_kernel[(triton.cdiv(numel, block),)](out, numel, *tensors, **constexprs, BLOCK=block)
    return out.view(state["shape"])


def dot_settings(dtype):
    """PRECISION and UPCAST for inputs of this dtype. fp32 inputs get full fp32 products, as F.linear does by
    default; 16-bit inputs go to the tensor cores as they are (widened to fp32 in the interpreter)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    upcast = interpreted and dtype != torch.float32
    return dict(PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)


def matmul(x, state, block_m=16, block_n=64, block_k=64):
    """x (M, K) @ W^T -> (M, N) in x's dtype, W never materialized: the decode-shaped product (small M)."""
    N, K = state["shape"]
    check_size(N * K)
    x = x.contiguous()
    M = x.size(0)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    tensors, constexprs = state_args(state)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    matmul_kernel[grid](x, out, M, N, K, x.stride(0), out.stride(0), *tensors, **constexprs,
                        **dot_settings(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def matmul_grad_input(grad_out, state, block_m=16, block_n=64, block_k=64):
    """grad_out (M, N) @ W -> (M, K): the gradient that reaches the input of x @ W^T, W never materialized."""
    N, K = state["shape"]
    check_size(N * K)
    grad_out = grad_out.contiguous()
    M = grad_out.size(0)
    out = torch.empty(M, K, dtype=grad_out.dtype, device=grad_out.device)
    tensors, constexprs = state_args(state)
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    matmul_grad_input_kernel[grid](grad_out, out, M, N, K, grad_out.stride(0), out.stride(0), *tensors,
                                   **constexprs, **dot_settings(grad_out.dtype), BLOCK_M=block_m,
                                   BLOCK_N=block_n, BLOCK_K=block_k)
    return out
