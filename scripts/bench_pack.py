"""
What packing (--pack=True) is worth, in one run: for tier-1 data (tiny preset) and for text lines (lines preset,
drawn on the fly), the same batches of samples trained on unpacked (a row per sample, padded to the longest) and
packed (several whole samples per row, up to the sequence length): the padding share of the tokens and the
training speed in real tokens per second (padding not counted, so the two are compared on the same work).

    python -m scripts.bench_pack                       # after scripts/tok_train (and lines.sh's byte tokenizer)

A step is the forward and backward of one batch (the optimizer step, the same for both, is left out). The two
run turn about on the same model (who goes first alternates) after `warmup` untimed steps each, so a load change
on the machine hits both alike; the losses of each pair must agree (the script exits non-zero if not). The last
line is the ratio of real tokens per second, packed over unpacked, per data set.
"""

import os
import sys
import time

import torch

from configurator import configure
from nanovlm.common import get_base_dir
from nanovlm.dataloader import load_records, vision_batches
from nanovlm.tokenizer import get_tokenizer
from nanovlm.training import ctc_targets_of, sequence_length
from nanovlm.vlm import build_vlm, preset_configs

tier1_data = "data/tier1/dataset.json"
tier1_tokenizer = ""  # empty = <base dir>/tokenizer (scripts/tok_train)
tier1_batch = 10  # vis_tok_train's total_batch_size
lines_data = "synth:read:1000000:1"
lines_tokenizer = ""  # empty = <base dir>/tokenizer_bytes (scripts/lines.sh)
lines_batch = 16  # lines.sh's batch
lines_image_mode = ""  # empty = the preset's
lines_max_seq_len = 0  # 0 = the longest of the first 2000 records, as training's default
warmup = 2  # untimed steps of each, first
steps = 10  # timed steps of each
threads = 0  # torch threads; 0 = torch's default
seed = 0
user_config = configure(globals())

if threads:
    torch.set_num_threads(threads)


def load_tokenizer(directory, default, what):
    """The tokenizer, or None with a message saying what makes it."""
    path = directory or os.path.join(get_base_dir(), default)
    if not os.path.isdir(path):
        print(f"{what}: skipped, no tokenizer at {path}")
        return None
    return get_tokenizer(path)


def train_one(model, tokenizer, batch, batch_size):
    """Forward + backward of one batch: (seconds, loss). As in training, a packed batch goes through the mask
    only when a row holds several samples."""
    inputs, targets, images, doc_ids = batch[:4]
    doc_ids = doc_ids if inputs.size(0) < batch_size else None
    t0 = time.perf_counter()
    if model.encoder.config.ctc_rows > 0:
        ctc_targets = ctc_targets_of(inputs, targets, tokenizer, model.image_token_id)
        loss, ctc = model(inputs, images=images, targets=targets, ctc_targets=ctc_targets, doc_ids=doc_ids)
        (loss + ctc).backward()
    else:
        loss = model(inputs, images=images, targets=targets, doc_ids=doc_ids)
        loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds, loss.item()


def bench(name, preset, tokenizer, data, batch_size, image_mode, max_seq_len):
    """One data set: both layouts on the same batches; returns the ratio of real tokens per second."""
    records = load_records(data)
    gpt_config, encoder_config, mode = preset_configs(preset, tokenizer.get_vocab_size(), image_mode)
    torch.manual_seed(seed)
    model = build_vlm(gpt_config, encoder_config, tokenizer.encode_special("<|image|>")).train()
    with torch.no_grad():  # nanochat's init zeroes these (flat logits): values, so the loss check sees real math
        for pname, p in model.gpt.named_parameters():
            if pname.endswith("c_proj.weight") or pname.startswith("lm_head"):
                p.normal_(0, 0.02)
    print(f"{name}: {preset} preset, image mode {mode}, {batch_size} samples a batch")
    max_tokens = sequence_length(model, tokenizer, records, None, mode, max_seq_len) + 1
    n = warmup + steps
    # the batches first, so no loader thread competes with the timed steps; one seed: the same samples in both
    layouts = [vision_batches(records, tokenizer, batch_size, max_tokens, mode, seed=seed, num_workers=1, pack=pack)
               for pack in (False, True)]
    plain, packed = ([next(loader) for _ in range(n)] for loader in layouts)
    totals = {False: [0.0, 0, 0], True: [0.0, 0, 0]}  # seconds, real tokens, all tokens (timed steps)
    worst = 0.0
    for i in range(n):
        batches = {False: plain[i], True: packed[i]}
        assert plain[i][-1] == packed[i][-1] and int((plain[i][3] > 0).sum()) == int((packed[i][3] > 0).sum())
        losses = {}
        for pack in (False, True) if i % 2 == 0 else (True, False):  # who goes first alternates
            seconds, losses[pack] = train_one(model, tokenizer, batches[pack], batch_size)
            if i >= warmup:
                doc_ids = batches[pack][3]
                totals[pack][0] += seconds
                totals[pack][1] += int((doc_ids > 0).sum())
                totals[pack][2] += doc_ids.numel()
        worst = max(worst, abs(losses[False] - losses[True]))
    rows = {pack: sum((packed if pack else plain)[i][0].size(0) for i in range(warmup, n)) / steps
            for pack in (False, True)}
    speed = {}
    for pack, label in ((False, "unpacked"), (True, "packed")):
        seconds, real, every = totals[pack]
        speed[pack] = real / seconds
        print(f"{name} {label:8s} | {rows[pack]:.1f} rows x {every / steps / rows[pack]:.0f} tokens a batch | "
              f"pad {100 * (1 - real / every):.1f}% | {speed[pack]:,.0f} real tok/s ({every / seconds:,.0f} with "
              f"padding) | {1000 * seconds / steps:.0f} ms a step")
    same = " (no row holds two samples: the same batches)" if rows[True] == rows[False] else ""
    print(f"{name}: packed vs unpacked losses differ by at most {worst:.2e}{same}")
    if worst > 1e-4:
        sys.exit(f"{name}: packed and unpacked losses differ by {worst}")
    return speed[True] / speed[False]


print(f"{steps} timed steps of each after {warmup} untimed, torch threads {torch.get_num_threads()}")
ratios = {}
for name, preset, data, batch_size, image_mode, max_seq_len, directory, default in (
        ("tier1", "tiny", tier1_data, tier1_batch, "", 0, tier1_tokenizer, "tokenizer"),
        ("lines", "lines", lines_data, lines_batch, lines_image_mode, lines_max_seq_len, lines_tokenizer,
         "tokenizer_bytes")):
    tokenizer = load_tokenizer(directory, default, name)
    if tokenizer is not None:
        ratios[name] = bench(name, preset, tokenizer, data, batch_size, image_mode, max_seq_len)
print("real tok/s packed / unpacked: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()))
