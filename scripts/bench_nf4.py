"""
NF4 weights against 16-bit ones, in one run: weight memory, quantize and dequantize throughput, and a Linear4bit
forward against a plain Linear forward (bf16 on CUDA; fp32 on CPU, where bf16 matmuls are several times slower
and would flatter the 4-bit layer). Runs on the CPU, and on CUDA too when there is a GPU.

    python -m scripts.bench_nf4
    python -m scripts.bench_nf4 --out_features=3072 --in_features=768 --double_quant=False --tokens=2048

Memory counts everything a 4-bit weight keeps: packed codes, scales (uint8 + nested fp32 scales and offset with
double quantization) and the two code tables. The last line reads `memory N.NNNx`: 4-bit bytes over bf16 bytes.
"""

import time

import torch
import torch.nn as nn

from nanovlm.nf4 import Linear4bit, dequantize_nf4, quantize_nf4, state_nbytes

out_features = 5120  # a d20 MLP up-projection: 1280 -> 5120
in_features = 1280
blocksize = 64
double_quant = True  # the QLoRA setting; without it the fp32 scales alone cost 0.5 bit a weight
tokens = 512  # rows of the forward's input
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
    fn()  # warm-up (and, on CUDA, the compile of the fused dequantize)
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
    ms = median_ms(lambda: dequantize_nf4(state, compute_dtype, fast=False), device)
    row(device, f"dequantize nf4 -> {name}", ms, rate(ms))
    if device == "cuda":
        ms = median_ms(lambda: dequantize_nf4(state, compute_dtype, fast=True), device)
        row(device, f"dequantize nf4 -> {name}, compiled", ms, rate(ms))
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

bf16_bytes = numel * 2
plain = state_nbytes(quantize_nf4(weight_fp32, blocksize, double_quant=False))
nested = state_nbytes(quantize_nf4(weight_fp32, blocksize, double_quant=True))
print(f"weight bytes: bf16 {bf16_bytes:,}  nf4 {plain:,} ({plain / bf16_bytes:.3f}x, {8 * plain / numel:.3f} bits)  "
      f"nf4+double quant {nested:,} ({nested / bf16_bytes:.3f}x, {8 * nested / numel:.3f} bits)")
print(f"memory {(nested if double_quant else plain) / bf16_bytes:.3f}x")
