"""
NF4 weights against 16-bit ones, in one run: weight memory, quantize and dequantize throughput, a Linear4bit
forward against a plain Linear forward (bf16 on CUDA; fp32 on CPU, where bf16 matmuls are several times slower
and would flatter the 4-bit layer), and on CUDA the Triton kernels: dequantize GB/s against the plain torch path,
and a decode-shaped product (decode_rows x in_features) as the fused 4-bit matmul, as dequantize + F.linear, and
as a bf16 Linear. Runs on the CPU, and on CUDA too when there is a GPU.

    python -m scripts.bench_nf4
    python -m scripts.bench_nf4 --out_features=3072 --in_features=768 --double_quant=False --tokens=2048

Memory counts everything a 4-bit weight keeps: packed codes, scales (uint8 + nested fp32 scales and offset with
double quantization) and the two code tables. The last line reads `memory N.NNNx`: 4-bit bytes over bf16 bytes.
"""

import time

import torch
import torch.nn as nn

import torch.nn.functional as F

from nanovlm.nf4 import Linear4bit, dequantize_flat, dequantize_nf4, load_triton_kernels, quantize_nf4, state_nbytes

out_features = 5120  # a d20 MLP up-projection: 1280 -> 5120
in_features = 1280
blocksize = 64
double_quant = True  # the QLoRA setting; without it the fp32 scales alone cost 0.5 bit a weight
tokens = 512  # rows of the forward's input
decode_rows = "1,8"  # rows of the decode-shaped products (batch x new tokens), CUDA only
repeats = 5  # timed calls per row, median reported
devices = ""  # comma-separated; "" = cpu, plus cuda when available
threads = 0  # CPU threads; 0 = torch's default
from configurator import configure  # noqa: E402

user_config = configure(globals())

if threads:
    torch.set_num_threads(threads)
device_list = devices.split(",") if devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
numel = out_features * in_features


def median_ms(fn, device):
    fn()  # warm-up (and, on CUDA, the compile of the Triton kernels)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def rate(ms):
    return f"{numel / ms / 1e3:8.0f} Mweights/s"


def row(device, what, ms, note=""):
    print(f"{device:<6} {what:<34} {ms:9.2f} ms  {note}", flush=True)


print(f"weight {out_features}x{in_features} ({numel / 1e6:.2f}M), blocksize {blocksize}, double_quant {double_quant}, "
      f"{tokens} tokens, median of {repeats}")
torch.manual_seed(0)
weight_fp32 = torch.randn(out_features, in_features) * 0.02  # roughly a trained weight's distribution
for device in device_list:
    compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = str(compute_dtype).removeprefix("torch.")
    weight = weight_fp32.to(device=device, dtype=compute_dtype)
    ms = median_ms(lambda: quantize_nf4(weight, blocksize, double_quant), device)
    row(device, f"quantize {name} -> nf4", ms, rate(ms))
    state = quantize_nf4(weight, blocksize, double_quant)
    nested = {k: state[k] for k in ("nested_absmax", "nested_code", "nested_offset", "nested_blocksize") if k in state}
    plain = lambda: dequantize_flat(state["packed"], state["absmax"], state["code"], blocksize, numel,  # noqa: E731
                                    compute_dtype, **nested)
    moved = state_nbytes(state) + numel * weight.element_size()  # read the 4-bit state, write the weight
    ms = median_ms(plain, device)
    row(device, f"dequantize nf4 -> {name}, torch", ms, f"{rate(ms)} {moved / ms / 1e6:7.1f} GB/s")
    kernels = load_triton_kernels() if device == "cuda" else None
    if kernels is not None:
        ms = median_ms(lambda: kernels.dequantize(state, compute_dtype), device)
        row(device, f"dequantize nf4 -> {name}, triton", ms, f"{rate(ms)} {moved / ms / 1e6:7.1f} GB/s")
    err = (dequantize_nf4(state, torch.float32) - weight.float()).norm() / weight.float().norm()
    print(f"{device:<6} nf4 relative error {err.item():.4f}")

    linear = nn.Linear(in_features, out_features, device=device, dtype=compute_dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = Linear4bit.from_linear(linear, blocksize, double_quant, compute_dtype=compute_dtype)
    x = torch.randn(tokens, in_features, device=device, dtype=compute_dtype)
    with torch.no_grad():
        base_ms = median_ms(lambda: linear(x), device)
        row(device, f"forward Linear {name}", base_ms)
        ms = median_ms(lambda: layer(x), device)
        row(device, f"forward Linear4bit {name}", ms, f"{ms / base_ms:.2f}x the {name} Linear")
        for rows in [int(r) for r in decode_rows.split(",")] if kernels is not None else []:
            xd = torch.randn(rows, in_features, device=device, dtype=compute_dtype)
            base_ms = median_ms(lambda: linear(xd), device)
            row(device, f"decode {rows} rows: Linear {name}", base_ms)
            ms = median_ms(lambda: F.linear(xd, plain().view(out_features, in_features)), device)
            row(device, f"decode {rows} rows: torch dequant+linear", ms, f"{ms / base_ms:.2f}x the {name} Linear")
            ms = median_ms(lambda: F.linear(xd, kernels.dequantize(state, compute_dtype)), device)
            row(device, f"decode {rows} rows: triton dequant+linear", ms, f"{ms / base_ms:.2f}x the {name} Linear")
            ms = median_ms(lambda: kernels.matmul(xd, state), device)
            row(device, f"decode {rows} rows: triton fused 4-bit", ms, f"{ms / base_ms:.2f}x the {name} Linear")
    if device == "cpu" and "cuda" not in device_list:
        print("cpu    GPU figures (Triton dequantize GB/s, fused decode matmul) not measured: no CUDA device here")

bf16_bytes = numel * 2
plain = state_nbytes(quantize_nf4(weight_fp32, blocksize, double_quant=False))
nested = state_nbytes(quantize_nf4(weight_fp32, blocksize, double_quant=True))
print(f"weight bytes: bf16 {bf16_bytes:,}  nf4 {plain:,} ({plain / bf16_bytes:.3f}x, {8 * plain / numel:.3f} bits)  "
      f"nf4+double quant {nested:,} ({nested / bf16_bytes:.3f}x, {8 * nested / numel:.3f} bits)")
print(f"memory {(nested if double_quant else plain) / bf16_bytes:.3f}x")
