"""
DeepEncoder forward time and peak memory per image mode on this machine (CUDA if present, else CPU), one image
and a batch of images; where that time goes, stage by stage; what each of the encoder's speed choices is worth,
measured in the same run; and SAM's relative positions in one global block in the three exact forms.

    python -m scripts.bench_encoder                                  # real sizes; on CPU only tiny/small/base
    python -m scripts.bench_encoder --modes=base,gundam --batch=8
    python -m scripts.bench_encoder --config=tiny --modes=resize:128,pad:256,gundam:128:256 --rel_pos_modes=pad:256

Peak memory is what a call allocates above what was allocated before it (weights and inputs excluded): CUDA's
allocator statistics, or on CPU the running total of the profiler's allocation events. A Gundam row encodes a
portrait page (1000x1400: a 1024 global view and 2x3 tiles of 640). The stage table times one image per mode by
module hooks ("other" is the rest: position tables, the concat, the token layout). The switch comparison runs
the encoder with and without one choice, interleaved, best of max(repeats, 2), on one image of switch_mode:
oneDNN for the linear layers on CPU (nanovlm.common.Linear) and the rel-pos form picked by "auto".
"""

import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import nanovlm.common as common
from nanovlm.common import autocast_context, autodetect_device_type
from nanovlm.deepencoder import DeepEncoder, DeepEncoderConfig, SamBlock
from nanovlm.image_process import count_image_tokens, preprocess, resolve_mode

config = "full"  # full (DeepSeek-OCR sizes) or tiny
modes = ""  # comma-separated image modes; "" = tiny,small,base,large,gundam (CPU: tiny,small,base)
batch = 4  # images in the batched row (CPU default: 2 when left at 4)
repeats = 0  # timed calls per row, median reported; 0 = 10 on CUDA, 1 on CPU
rel_pos_modes = "base,large"  # image modes whose size the rel-pos comparison uses; "" skips it (CPU: base)
switch_mode = "base"  # image mode of the speed-switch comparison; "" skips it
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

def on_device(image):
    """A preprocessed image (global_view, tiles, tiling) with its tensors on the benchmark's device."""
    return tuple(t.to(device) if torch.is_tensor(t) else t for t in image)


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
        images = [on_device(image) for _ in range(n_images)]

        def run():
            with torch.no_grad(), autocast_context(device.type):
                encoder.encode_images(images)

        run()  # warm-up: kernels (oneDNN builds one per new shape, CUDA compiles), the allocator
        seconds = median_time(run, repeats)
        peak = peak_memory(run)
        rows.append((mode, views, tokens, n_images, 1000 * seconds, 1000 * seconds / n_images, mib(peak)))
        print(f"  measured {mode} x{n_images}", flush=True)

print()
print(f"{'mode':<16} {'views (px)':<14} {'tokens':>6} {'batch':>5} {'ms/call':>9} {'ms/image':>9} {'peak MiB':>9}")
for mode, views, tokens, n, ms, ms_image, peak in rows:
    print(f"{mode:<16} {views:<14} {tokens:>6} {n:>5} {ms:>9.1f} {ms_image:>9.1f} {peak:>9.1f}")


# -----------------------------------------------------------------------------
# where the time goes: module hooks around each stage, one image per mode

def stage_of(name, module):
    if name == "sam.patch_embed":
        return "SAM patch embed"
    if name.startswith("sam.blocks.") and name.count(".") == 2:
        return "SAM windowed blocks" if module.window > 0 else "SAM global blocks"
    return {"sam.neck": "SAM neck", "sam.net_2": "compressor (net_2, net_3)", "sam.net_3": "compressor (net_2, net_3)",
            "clip": "CLIP", "projector": "projector"}.get(name)


STAGES = ["SAM patch embed", "SAM windowed blocks", "SAM global blocks", "SAM neck", "compressor (net_2, net_3)",
          "CLIP", "projector", "other", "total"]


def stage_times(images):
    """Milliseconds per stage of one encode_images call."""
    spent, hooks = dict.fromkeys(STAGES, 0.0), []
    for name, module in encoder.named_modules():
        stage = stage_of(name, module)
        if stage is None:
            continue

        def start(module, args):
            sync()
            module.started = time.perf_counter()

        def stop(module, args, output, stage=stage):
            sync()
            spent[stage] += 1000 * (time.perf_counter() - module.started)

        hooks += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    sync()
    t0 = time.perf_counter()
    with torch.no_grad(), autocast_context(device.type):
        encoder.encode_images(images)
    sync()
    spent["total"] = 1000 * (time.perf_counter() - t0)
    spent["other"] = spent["total"] - sum(spent[stage] for stage in STAGES[:-2])
    for hook in hooks:
        hook.remove()
    return spent


print()
print("where the time goes, one image (ms):")
per_mode = {mode: stage_times([on_device(preprocess(page, mode))]) for mode in modes.split(",")}
widths = [max(10, len(mode)) + 2 for mode in per_mode]
print(f"{'stage':<26}" + "".join(f"{mode:>{w}}" for mode, w in zip(per_mode, widths)))
for stage in STAGES:
    print(f"{stage:<26}" + "".join(f"{spent[stage]:>{w}.1f}" for spent, w in zip(per_mode.values(), widths)))

# -----------------------------------------------------------------------------
# what each speed choice is worth: the encoder with and without it, interleaved


def set_rel_pos(impl):
    for block in encoder.sam.blocks:
        block.attn.rel_pos_impl = impl


SWITCHES = [("linears: oneDNN vs F.linear", lambda on: setattr(common, "CPU_ONEDNN_LINEAR", on),
             on_cpu and common.CPU_ONEDNN_LINEAR),
            ("rel-pos: auto vs folded", lambda on: set_rel_pos("auto" if on else "folded"), True),
            ("rel-pos: auto vs dense", lambda on: set_rel_pos("auto" if on else "dense"), True)]

if switch_mode:
    image = [on_device(preprocess(page, switch_mode))]
    print()
    print(f"speed choices, one {switch_mode} image, interleaved, best of {max(repeats, 2)}:")
    print(f"{'choice':<30} {'with ms':>9} {'without ms':>11} {'ratio':>7} {'max |diff|':>10}")
    for label, switch, applies in SWITCHES:
        if not applies:
            print(f"{label:<30} (does not apply here)")
            continue
        best, outputs = [float("inf"), float("inf")], [None, None]
        for _ in range(max(repeats, 2)):
            for i, on in enumerate((True, False)):
                switch(on)
                sync()
                start = time.perf_counter()
                with torch.no_grad(), autocast_context(device.type):
                    outputs[i] = encoder.encode_images(image)[0].float()
                sync()
                best[i] = min(best[i], time.perf_counter() - start)
            switch(True)
        diff = (outputs[0] - outputs[1]).abs().max().item()
        print(f"{label:<30} {1000 * best[0]:>9.1f} {1000 * best[1]:>11.1f} {best[0] / best[1]:>6.2f}x {diff:>10.2e}")

# -----------------------------------------------------------------------------
# relative positions in one SAM global block: the dense bias, folded, chunked

if rel_pos_modes:
    print()
    print(f"SAM global block ({encoder_config.sam_dim} wide, {encoder_config.sam_heads} heads), batch 1: relative "
          f"positions as a dense (B, heads, HW, HW) bias, folded into q/k channels, or added to blocks of scores")
    print(f"{'size':>5} {'tokens':>6} {'pass':<8} {'form':<8} {'peak MiB':>9} {'ms':>9} {'max |diff| vs dense':>20}")
    torch.manual_seed(0)
    block = SamBlock(encoder_config, window=0).to(device)
    with torch.no_grad():
        block.attn.rel_pos_h.normal_(std=0.02)
        block.attn.rel_pos_w.normal_(std=0.02)
    for size in [resolve_mode(m).global_size for m in rel_pos_modes.split(",")]:
        grid = size // encoder_config.sam_patch_size
        x = torch.randn(1, grid, grid, encoder_config.sam_dim, device=device)
        for label in ("fwd", "fwd+bwd"):
            dense_out = None
            # chunked is an inference form: with autograd it keeps every probability, like dense
            for impl in ("dense", "folded", "chunked") if label == "fwd" else ("dense", "folded"):
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

                run = forward if label == "fwd" else forward_backward
                run()  # warm-up
                out = forward().float()
                dense_out = out if impl == "dense" else dense_out
                diff = (out - dense_out).abs().max().item()
                print(f"{size:>5} {grid * grid:>6} {label:<8} {impl:<8} {mib(peak_memory(run)):>9.1f} "
                      f"{1000 * median_time(run, repeats):>9.1f} {diff:>20.2e}")
