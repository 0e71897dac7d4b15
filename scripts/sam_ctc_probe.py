"""
Does SAM learn to see characters? The `lines` preset's SAM alone (no compressor, CLIP or GPT) trained with its CTC
read-out on text lines drawn on the fly (`kind`: read, the lexicon-and-fonts lines lines.sh trains on, or line2,
the earlier pool-and-one-font lines): the cheap test bed for the plateau that decides whether the whole
model reads (see the README, "Does it read?"). It prints the CTC loss (and its running mean) every log_every steps
and, at the end, the step where the running mean first fell below `escaped_below`: the plateau, at about 3.5 nats
per character, is the read-out guessing character frequencies without locating them.

    python -m scripts.sam_ctc_probe --seed=1                       # the preset (with its conv stem)
    python -m scripts.sam_ctc_probe --seed=1 --conv_stem=none      # SAM's plain 16x16 patch projection
    python -m scripts.sam_ctc_probe --seed=1 --conv_stem=16,32,32,32 --steps=600
"""

import time

import torch

from configurator import configure
from nanovlm.common import print0
from nanovlm.deepencoder import DeepEncoder
from nanovlm.image_process import preprocess
from nanovlm.synth import make_sample
from nanovlm.vlm import ctc_loss, preset_configs

seed = 0  # initialisation seed; the lines are always the kind's training stream of data seed 1, as in lines.sh
kind = "read"  # read or line2 (any kind whose answer is one line)
steps = 1000
batch_size = 16
lr = 2e-3  # AdamW (0.9, 0.95), no weight decay, gradients clipped to 1, like the full run's vision groups
warmup_steps = 0
conv_stem = "preset"  # "preset", "none", or comma-separated widths of the stride-2 conv+BatchNorm+ReLU layers
escaped_below = 3.0
log_every = 50
threads = 0  # CPU threads; 0 = torch's default
user_config = configure(globals())

if threads:
    torch.set_num_threads(threads)
_, encoder_config, mode = preset_configs("lines", 257)
if conv_stem != "preset":
    encoder_config.sam_conv_stem = () if conv_stem == "none" else tuple(int(w) for w in conv_stem.split(","))
torch.manual_seed(seed)
encoder = DeepEncoder(encoder_config)
encoder.init_weights()  # as build_vlm does for a fresh model
sam = encoder.sam
params = [p for name, p in sam.named_parameters() if not name.startswith(("net_2.", "net_3."))]
optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
print0(f"SAM of the lines preset, conv stem {encoder_config.sam_conv_stem or 'none'}, image mode {mode}, "
       f"{sum(p.numel() for p in params):,} parameters, seed {seed}")


def line_batch(first):
    """batch_size training lines of the kind from index `first`: pixels (B, 3, H, W) and their texts' bytes."""
    pixels, texts = [], []
    for index in range(first, first + batch_size):
        record, image = make_sample(kind, 1, "train", index)
        pixels.append(preprocess(image, mode).global_view)
        texts.append(torch.tensor(list(record["answer"].encode("utf-8"))))
    return torch.stack(pixels), texts


running, escaped_at, t0 = None, None, time.time()
for step in range(steps):
    pixels, texts = line_batch(step * batch_size)
    _, neck = sam(pixels, return_neck=True)
    log_probs = sam.ctc_logits(neck)  # (columns, B, classes)
    loss = ctc_loss(log_probs, texts)
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
    if escaped_at is None and running < escaped_below:
        escaped_at = step
    if step % log_every == 0 or step == steps - 1:
        print0(f"step {step:05d}/{steps:05d} | ctc {loss.item():.4f} | running {running:.4f} | "
               f"total time {(time.time() - t0) / 60:.2f}m")
print0(f"escaped the plateau (running CTC < {escaped_below}) at step {escaped_at}" if escaped_at is not None
       else f"running CTC {running:.3f} after {steps} steps: not below {escaped_below}")
