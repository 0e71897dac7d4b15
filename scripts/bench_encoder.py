"""
DeepEncoder forward time and peak memory per image mode on this machine (CUDA if present, else CPU), one image
and a batch of images, then the cost of SAM's relative positions in a global block: the reference's dense
(B, 12, HW, HW) bias against the folded form the encoder uses, measured in the same run.

    python -m scripts.bench_encoder                                  # real sizes; on CPU only tiny/small/base
    python -m scripts.bench_encoder --modes=base,gundam --batch=8
    python -m scripts.bench_encoder --config=tiny --modes=resize:128,pad:256,gundam:128:256 --rel_pos_modes=pad:256

Peak memory is what a call allocates above what was allocated before it (weights and inputs excluded): CUDA's
allocator statistics, or on CPU the running total of the profiler's allocation events. A Gundam row encodes a
portrait page (1000x1400: a 1024 global view and 2x3 tiles of 640).
"""

import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from nanovlm.common import autocast_context, autodetect_device_type
from nanovlm.deepencoder import DeepEncoder, DeepEncoderConfig, SamBlock
from nanovlm.image_process import count_image_tokens, preprocess, resolve_mode

config = "full"  # full (DeepSeek-OCR sizes) or tiny
modes = ""  # comma-separated image modes; "" = tiny,small,base,large,gundam (CPU: tiny,small,base)
batch = 4  # images in the batched row (CPU default: 2 when left at 4)
repeats = 0  # timed calls per row, median reported; 0 = 10 on CUDA, 1 on CPU
rel_pos_modes = "base,large"  # image modes whose size the dense-vs-folded comparison uses; "" skips it (CPU: base)
device_type = ""  # cuda, cpu, or "" to autodetect
threads = 0  # CPU threads; 0 = torch's default
from configurator import configure  # noqa: E402

user_config = configure(globals())

device_type = device_type or autodetect_device_type()
device = torch.device(device_type)
on_cpu = device.type == "cpu"
if threads:
    torch.set_num_threads(threads)
if on_cpu:
    modes = modes or "tiny,small,base"
    batch = 2 if batch == 4 else batch
    rel_pos_modes = "base" if rel_pos_modes == "base,large" else rel_pos_modes
modes = modes or "tiny,small,base,large,gundam"
repeats = repeats or (1 if on_cpu else 10)
if config not in ("full", "tiny"):
    raise SystemExit(f"--config must be full or tiny, got {config!r}")


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, n):
    times = []
    for _ in range(n):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory(fn):
    """Bytes allocated at the peak of one call of fn, above what was allocated when it started."""
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    allocations = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    total = peak = 0
    for event in allocations:
        total += event["args"]["Bytes"]
        peak = max(peak, total)
    return peak


def mib(n):
    return n / 2 ** 20


# -----------------------------------------------------------------------------
# the encoder, per mode

encoder_config = DeepEncoderConfig() if config == "full" else DeepEncoderConfig.tiny()
with torch.device("meta"):
    encoder = DeepEncoder(encoder_config)
encoder.to_empty(device=device)
encoder.init_weights()
encoder.eval()
n_params = encoder.num_params()
print(f"device: {device_type}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else
                                  f" ({torch.get_num_threads()} threads)")
      + f" | encoder: {config}, {n_params / 1e6:.1f}M params, {mib(4 * n_params):.0f} MiB fp32"
      + f" | {'bf16 autocast' if device.type == 'cuda' else 'fp32'} | median of {repeats}")

rng = np.random.RandomState(0)
page = Image.fromarray(rng.randint(0, 256, (1400, 1000, 3), dtype=np.uint8))  # portrait, width 1000
rows = []
for mode in modes.split(","):
    resolved = resolve_mode(mode)
    image = preprocess(page, mode)
    tokens = count_image_tokens(page.width, page.height, mode)
    views = f"{resolved.global_size}"
    if image.tiles is not None:
        views += f" + {len(image.tiles)}x{resolved.tile_size}"
    for n_images in (1, batch):
        images = [tuple(t.to(device) if torch.is_tensor(t) else t for t in image) for _ in range(n_images)]

        def run():
            with torch.no_grad(), autocast_context(device.type):
                encoder.encode_images(images)

        if not on_cpu:
            run()  # warm-up: kernels, allocator
        seconds = median_time(run, repeats)
        peak = peak_memory(run)
        rows.append((mode, views, tokens, n_images, 1000 * seconds, 1000 * seconds / n_images, mib(peak)))
        print(f"  measured {mode} x{n_images}", flush=True)

print()
print(f"{'mode':<16} {'views (px)':<14} {'tokens':>6} {'batch':>5} {'ms/call':>9} {'ms/image':>9} {'peak MiB':>9}")
for mode, views, tokens, n, ms, ms_image, peak in rows:
    print(f"{mode:<16} {views:<14} {tokens:>6} {n:>5} {ms:>9.1f} {ms_image:>9.1f} {peak:>9.1f}")

# -----------------------------------------------------------------------------
# relative positions in one SAM global block: dense bias vs folded

if rel_pos_modes:
    print()
    print(f"SAM global block ({encoder_config.sam_dim} wide, {encoder_config.sam_heads} heads), batch 1: "
          f"relative positions as a dense (B, heads, HW, HW) bias vs folded into q/k channels")
    print(f"{'size':>5} {'tokens':>6} {'pass':<8} {'dense MiB':>10} {'folded MiB':>10} {'ratio':>6} "
          f"{'dense ms':>9} {'folded ms':>9} {'max |diff|':>10}")
    torch.manual_seed(0)
    block = SamBlock(encoder_config, window=0).to(device)
    with torch.no_grad():
        block.attn.rel_pos_h.normal_(std=0.02)
        block.attn.rel_pos_w.normal_(std=0.02)
    for size in [resolve_mode(m).global_size for m in rel_pos_modes.split(",")]:
        grid = size // encoder_config.sam_patch_size
        x = torch.randn(1, grid, grid, encoder_config.sam_dim, device=device)
        results = {}
        for impl in ("dense", "folded"):
            block.attn.rel_pos_impl = impl

            def forward():
                with torch.no_grad(), autocast_context(device.type):
                    return block(x)

            def forward_backward():
                with autocast_context(device.type):
                    y = block(x.requires_grad_())
                y.float().square().mean().backward()
                x.grad = None
                block.zero_grad(set_to_none=True)

            if not on_cpu:
                forward(), forward_backward()  # warm-up
            out = forward().float()
            results[impl] = dict(out=out,
                                 forward=(peak_memory(forward), median_time(forward, repeats)),
                                 backward=(peak_memory(forward_backward), median_time(forward_backward, repeats)))
        diff = (results["dense"]["out"] - results["folded"]["out"]).abs().max().item()
        for name in ("forward", "backward"):
            (dense_peak, dense_s), (folded_peak, folded_s) = results["dense"][name], results["folded"][name]
            label = "fwd" if name == "forward" else "fwd+bwd"
            print(f"{size:>5} {grid * grid:>6} {label:<8} {mib(dense_peak):>10.1f} {mib(folded_peak):>10.1f} "
                  f"{dense_peak / folded_peak:>5.1f}x {1000 * dense_s:>9.1f} {1000 * folded_s:>9.1f} {diff:>10.2e}")
