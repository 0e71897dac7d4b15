"""
Generation speed, in one run, greedy:
1. the KV-cached engine vs the naive loop that re-runs the whole sequence (and the encoder) for every new token,
   on one image prompt: `speedup N.NNx`;
2. batch_records different records (their own images and prompts of different lengths) generated together
   (Engine.generate_many) vs one by one: `batch speedup N.NNx`, the last line.
The compared loops run interleaved, best of `repeats` each, so a load change on the machine hits both alike. Both
sides must produce the same tokens: the script exits non-zero if they do not.

    python -m scripts.bench_engine                  # tiny model on CPU
    python -m scripts.bench_engine --model=d20      # nanochat d20 GPT + the real DeepEncoder (GPU)
    python -m scripts.bench_engine --profile=True   # where one decode step's time goes, instead of the benchmark

Weights are random: speed does not depend on what the model says. Stop tokens are ignored so that every loop
produces exactly new_tokens tokens per record.
"""

import sys
import time
from collections import defaultdict

import torch
from PIL import Image, ImageDraw

from configurator import configure
from nanovlm.common import autocast_context, compute_init
from nanovlm.engine import Engine, decode_threads, generate_naive, sample_next_token, token_forward
from nanovlm.gpt import KVCache, norm
from nanovlm.dataloader import prompt_ids
from nanovlm.image_process import preprocess
from nanovlm.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, build_encoding
from nanovlm.vlm import build_vlm, preset_configs

model = "tiny"
image_mode = ""  # empty = the preset's
new_tokens = 256
repeats = 3  # best of
batch_records = 8  # records in the batched-generation comparison
device_type = ""
profile = False  # True: the per-op profile and a timing by stage of the engine's decode steps, no benchmark
profile_steps = 200
user_config = configure(globals())

_, _, _, _, device = compute_init(device_type)
synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
# a byte-level tokenizer is enough to time the model: 256 byte tokens + the specials
tokenizer = Tokenizer(build_encoding(SPLIT_PATTERN, {bytes([i]): i for i in range(256)}, SPECIAL_TOKENS))
vocab = 65536 if model == "d20" else tokenizer.get_vocab_size()
gpt_config, encoder_config, mode = preset_configs(model, vocab, image_mode)  # image_mode "" = the preset's
vlm = build_vlm(gpt_config, encoder_config, tokenizer.encode_special("<|image|>"), device=device).eval()
with torch.no_grad():  # nanochat's init zeroes lm_head; random logits make a realistic argmax
    vlm.gpt.lm_head.weight.normal_(0, 0.02)

def receipt(seed, rows):
    """A receipt-like picture: rows of items with prices (what the encoder sees does not change the timing)."""
    picture = Image.new("RGB", (600, 800), "white")
    draw = ImageDraw.Draw(picture)
    for row in range(rows):
        draw.text((20, 20 + 25 * row), f"item {seed}-{row:02d} ........ {row * 1.25:7.2f}", fill="black")
    return picture


def on_device(view):
    return type(view)(view.global_view.to(device), view.tiles.to(device) if view.tiles is not None else None,
                      view.tiling)


def timed(fn):
    synchronize()
    t0 = time.perf_counter()
    out = fn()
    synchronize()
    return time.perf_counter() - t0, out


def interleaved(first, second):
    """Best-of-repeats times of two loops run turn about, and their last outputs."""
    best = [float("inf"), float("inf")]
    outs = [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            t, outs[i] = timed(fn)
            best[i] = min(best[i], t)
    return best, outs


picture = receipt(0, 30)
views = on_device(preprocess(picture, mode))
ids = prompt_ids(tokenizer, "<image>\nOCR this image.", picture, mode)
engine = Engine(vlm, tokenizer)
engine.stop_ids = set()  # time exactly new_tokens tokens

# records of the batch: each its own picture and a prompt of its own length
pictures = [receipt(i, 10 + 2 * i) for i in range(batch_records)]
prompts = [prompt_ids(tokenizer, "<image>\nOCR this image." + " Carefully." * i, p, mode) for i, p in enumerate(pictures)]
images = [[on_device(preprocess(p, mode))] for p in pictures]


def one_by_one():
    return [engine.generate_batch(p, images=im, max_tokens=new_tokens, temperature=0.0)[0][0][len(p):]
            for p, im in zip(prompts, images)]



@torch.inference_mode()
def profile_decode():
    """The engine's greedy decode steps at batch 1 after the benchmark's prompt: torch.profiler's ops by self CPU
    time, then the same steps timed by stage with perf_counter (the GPT's forward written out, no profiler)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    gpt, c = vlm.gpt, vlm.gpt.config
    kv_cache = KVCache(1, c.n_kv_head, len(ids) + 3 * profile_steps, c.n_embd // c.n_head, c.n_layer)
    logits = vlm(torch.tensor([ids], device=device), images=[views], kv_cache=kv_cache)[:, -1, :]

    def step(logits):  # what Engine.generate does per token
        next_ids = sample_next_token(engine.mask_forbidden(logits), None, temperature=0.0)
        next_ids[:, 0].tolist()
        return token_forward(vlm, next_ids, kv_cache)[:, -1, :], next_ids

    for _ in range(profile_steps // 4):
        logits, next_ids = step(logits)  # warm up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profile_steps):
            logits, next_ids = step(logits)
    ops = sorted(prof.key_averages(), key=lambda op: op.self_cpu_time_total, reverse=True)
    profiled = sum(op.self_cpu_time_total for op in ops)
    print(f"{profile_steps} decode steps at batch 1, {c.n_layer} layers, {torch.get_num_threads()} threads outside "
          f"the GPT, {decode_threads(gpt, next_ids)} in it; torch.profiler, ops by self CPU time (its own overhead "
          f"included): {profiled / profile_steps:.0f} us/step")
    print(f"{'op':<52} {'calls/step':>10} {'us/step':>8} {'share':>6}")
    for op in ops[:15]:
        print(f"{op.key:<52} {op.count / profile_steps:10.1f} {op.self_cpu_time_total / profile_steps:8.1f} "
              f"{op.self_cpu_time_total / profiled:6.1%}")

    seconds = defaultdict(float)
    def stage(name, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds[name] += time.perf_counter() - t0
        return out
    threads = torch.get_num_threads()
    for _ in range(profile_steps):
        torch.set_num_threads(decode_threads(gpt, next_ids))  # as token_forward runs the GPT
        x = stage("embedding + norm", lambda: norm(gpt.transformer.wte(next_ids)))
        pos = kv_cache.get_pos()
        cos_sin = stage("rotary slice", lambda: tuple(t[:, pos:pos + 1] for t in gpt.rotary(x.dtype)))
        for block in gpt.transformer.h:
            x = stage("attention (norm, qkv, rotary, cache, sdpa, proj, add)",
                      lambda: x + block.attn(norm(x), cos_sin, kv_cache))
            x = stage("mlp (norm, fc, relu^2, proj, add)", lambda: x + block.mlp(norm(x)))
        logits = stage("final norm + lm_head + softcap", lambda: gpt.head_logits(norm(x))[:, -1, :])
        torch.set_num_threads(threads)
        next_ids = stage("mask_forbidden + argmax", lambda: sample_next_token(engine.mask_forbidden(logits), None, 0.0))
        stage(".tolist()", lambda: next_ids[:, 0].tolist())
    total = sum(seconds.values())
    print(f"{'stage (' + str(c.n_layer) + ' layers)':<56} {'us/step':>8} {'share':>6}")
    for name, s in seconds.items():
        print(f"{name:<56} {s / profile_steps * 1e6:8.1f} {s / total:6.1%}")
    print(f"{'total':<56} {total / profile_steps * 1e6:8.1f}")


if profile:
    profile_decode()
    sys.exit()

with autocast_context(device.type):
    engine.generate_batch(ids, images=[views], max_tokens=8, temperature=0.0)  # warm up
    (t_engine, t_naive), (rows, naive) = interleaved(
        lambda: engine.generate_batch(ids, images=[views], max_tokens=new_tokens, temperature=0.0)[0],
        lambda: generate_naive(vlm, tokenizer, ids, [views], max_tokens=new_tokens, stop=False))
    engine.generate_many(prompts[:2], images=images[:2], max_tokens=8)  # warm up
    (t_single, t_batched), (singles, batched) = interleaved(
        one_by_one, lambda: engine.generate_many(prompts, images=images, max_tokens=new_tokens))
generated = rows[0][len(ids):]
n_batch = sum(len(out) for out in batched)
print(f"model {model} | device {device} | image mode {mode} | prompt {len(ids)} tokens "
      f"({ids.count(vlm.image_token_id)} image) | {new_tokens} new tokens, greedy, best of {repeats}, interleaved")
print(f"{'loop':<28} {'seconds':>8} {'tokens/s':>10}")
print(f"{'engine':<28} {t_engine:8.3f} {len(generated) / t_engine:10.1f}")
print(f"{'naive recompute':<28} {t_naive:8.3f} {len(naive) / t_naive:10.1f}")
print(f"{f'{batch_records} records one by one':<28} {t_single:8.3f} {n_batch / t_single:10.1f}")
print(f"{f'{batch_records} records batched':<28} {t_batched:8.3f} {n_batch / t_batched:10.1f}")
same, same_batch = generated == naive, singles == batched
print(f"same tokens: engine vs naive {same}, batched vs one by one {same_batch}")
print(f"speedup {t_naive / t_engine:.2f}x")
print(f"batch speedup {t_single / t_batched:.2f}x")
if not (same and same_batch):
    sys.exit("the compared loops produced different tokens")
