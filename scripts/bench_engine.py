"""
Generation speed: the KV-cached engine vs the naive loop that re-runs the whole sequence (and the encoder) for
every new token, on one image prompt, greedy, in the same run. Both must produce the same tokens.

    python -m scripts.bench_engine                  # tiny model on CPU
    python -m scripts.bench_engine --model=d20      # nanochat d20 GPT + the real DeepEncoder (GPU)

Weights are random: speed does not depend on what the model says. Stop tokens are ignored so that both loops
produce exactly new_tokens tokens. The last line reads `speedup N.NNx` (engine over naive).
"""

import time

import torch
from PIL import Image, ImageDraw

from configurator import configure
from nanovlm.common import autocast_context, compute_init
from nanovlm.engine import Engine, generate_naive
from nanovlm.dataloader import prompt_ids
from nanovlm.image_process import preprocess
from nanovlm.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, build_encoding
from nanovlm.vlm import build_vlm, preset_configs

model = "tiny"
image_mode = ""  # empty = the preset's
new_tokens = 256
repeats = 3  # best of
device_type = ""
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

picture = Image.new("RGB", (600, 800), "white")
draw = ImageDraw.Draw(picture)
for row in range(30):
    draw.text((20, 20 + 25 * row), f"item {row:02d} ........ {row * 1.25:7.2f}", fill="black")
global_view, tiles, tiling = preprocess(picture, mode)
views = (global_view.to(device), tiles.to(device) if tiles is not None else None, tiling)
ids = prompt_ids(tokenizer, "<image>\nOCR this image.", picture, mode)
engine = Engine(vlm, tokenizer)
engine.stop_ids = set()  # time exactly new_tokens tokens


def best_time(fn):
    best, out = float("inf"), None
    for _ in range(repeats):
        synchronize()
        t0 = time.perf_counter()
        out = fn()
        synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


with autocast_context(device.type):
    engine.generate_batch(ids, images=[views], max_tokens=8, temperature=0.0)  # warm up
    t_engine, (rows, _) = best_time(lambda: engine.generate_batch(ids, images=[views], max_tokens=new_tokens,
                                                                 temperature=0.0))
    t_naive, naive = best_time(lambda: generate_naive(vlm, tokenizer, ids, [views], max_tokens=new_tokens,
                                                      stop=False))
generated = rows[0][len(ids):]
print(f"model {model} | device {device} | image mode {mode} | prompt {len(ids)} tokens "
      f"({ids.count(vlm.image_token_id)} image) | {new_tokens} new tokens, greedy, best of {repeats}")
print(f"{'loop':<8} {'seconds':>8} {'tokens/s':>10}")
print(f"{'engine':<8} {t_engine:8.3f} {len(generated) / t_engine:10.1f}")
print(f"{'naive':<8} {t_naive:8.3f} {len(naive) / t_naive:10.1f}")
print(f"same tokens: {generated == naive}")
print(f"speedup {t_naive / t_engine:.2f}x")
