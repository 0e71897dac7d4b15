"""
Our DeepEncoder against DeepSeek-OCR's own encoder modules, side by side on the same weights: time per image and
the largest difference of the token sequences the language model would see.

DeepSeek-OCR's code is not part of this repository and nothing is downloaded: point --reference_dir at the
`deepencoder` folder of a local copy of its public repository (DeepSeek-OCR-vllm/deepencoder, holding
sam_vary_sdpa.py, clip_sdpa.py and build_linear.py).

    python -m scripts.bench_deepseek --reference_dir=/path/to/DeepSeek-OCR-master/DeepSeek-OCR-vllm/deepencoder
    python -m scripts.bench_deepseek --reference_dir=... --cases=640,1024,gundam --repeats=3 --threads=2

The reference's modules get random weights (every tensor non-zero, so every term shows); they are written as a
DeepSeek-OCR checkpoint (its key names) and read into our encoder by nanovlm.importers, the path real weights
take. Cases: a 640 or 1024 px global view, and Gundam (a 1024 global view and 2x3 tiles of 640). The two encoders
run interleaved, best of `repeats`, on the CPU in fp32, no autograd. The last line is `ratio N.NNN` for the last case (ours /
reference time).
"""

import math
import os
import sys
import tempfile
import time
import types

import torch
from safetensors.torch import save_file

from configurator import configure
from nanovlm.importers import load_deepseek_ocr_vision

reference_dir = ""  # DeepSeek-OCR-vllm/deepencoder of a local copy of DeepSeek-OCR's repository
cases = "640,1024,gundam"
repeats = 3
threads = 0  # 0 = torch's default
seed = 0
user_config = configure(globals())

if not reference_dir or not os.path.isfile(os.path.join(reference_dir, "sam_vary_sdpa.py")):
    sys.exit(f"--reference_dir must be DeepSeek-OCR's deepencoder folder (with sam_vary_sdpa.py), got {reference_dir!r}")
CASES = {"640": (640, 0, (1, 1)), "1024": (1024, 0, (1, 1)), "gundam": (1024, 6, (2, 3))}
for case in cases.split(","):
    if case not in CASES:
        sys.exit(f"unknown case {case!r}, choose from {', '.join(CASES)}")
if threads:
    torch.set_num_threads(threads)



class AttrDict(dict):
    """A dict whose keys read as attributes: the config objects their builders take."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key)


# Their files import flash_attn and easydict at the top. Neither runs on a CPU path with use_flash_attn=False, so
# stand-ins are enough where the packages are not installed.
try:
    import easydict  # noqa: F401
except ImportError:
    sys.modules["easydict"] = types.SimpleNamespace(EasyDict=AttrDict)
try:
    import flash_attn  # noqa: F401
except ImportError:
    def no_flash(*args, **kwargs):
        raise RuntimeError("flash_attn is not installed")
    sys.modules["flash_attn"] = types.SimpleNamespace(flash_attn_qkvpacked_func=no_flash, flash_attn_func=no_flash)
sys.path.insert(0, reference_dir)
from build_linear import MlpProjector  # noqa: E402
from clip_sdpa import build_clip_l  # noqa: E402
from sam_vary_sdpa import build_sam_vit_b  # noqa: E402

# -----------------------------------------------------------------------------
# the reference encoder with random weights, and ours read from them as a checkpoint

torch.manual_seed(seed)
sam, clip = build_sam_vit_b().eval(), build_clip_l().eval()
projector = MlpProjector(AttrDict(projector_type="linear", input_dim=2048, n_embed=1280)).eval()
image_newline, view_seperator = torch.randn(1280) / 1280 ** 0.5, torch.randn(1280) / 1280 ** 0.5
checkpoint = {"model.image_newline": image_newline, "model.view_seperator": view_seperator}
with torch.no_grad():
    for module, prefix in ((sam, "model.sam_model."), (clip, "model.vision_model."), (projector, "model.projector.")):
        for name, p in module.named_parameters():
            # norms near 1, everything else small and non-zero (SAM's rel-pos tables start at zero)
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.02 * torch.randn_like(p))
            checkpoint[prefix + name] = p.detach().clone()
with tempfile.TemporaryDirectory() as tmp:
    save_file(checkpoint, os.path.join(tmp, "model.safetensors"))
    ours = load_deepseek_ocr_vision(os.path.join(tmp, "model.safetensors"))


def reference_features(pixels):
    """DeepSeek-OCR's order: SAM, CLIP fed SAM's map, [CLIP without CLS, SAM tokens] on channels, projector."""
    sam_map = sam(pixels)
    clip_tokens = clip(pixels, sam_map)
    return projector(torch.cat((clip_tokens[:, 1:], sam_map.flatten(2).permute(0, 2, 1)), dim=-1))


def with_newlines(grid):
    rows, cols, dim = grid.shape
    return torch.cat([grid, image_newline[None, None, :].expand(rows, 1, dim)], dim=1).view(-1, dim)


def reference_encode(global_view, tiles, tiling):
    """The sequence DeepSeek-OCR splices into the prompt: [stitched tiles + newlines], [global + newlines], separator."""
    features = reference_features(global_view[None])[0]
    side = math.isqrt(features.shape[0])
    parts = [with_newlines(features.view(side, side, -1))]
    if tiles is not None:
        tile_features = reference_features(tiles)
        columns, rows = tiling
        m = math.isqrt(tile_features.shape[1])
        stitched = tile_features.view(rows, columns, m, m, -1).permute(0, 2, 1, 3, 4).reshape(rows * m, columns * m, -1)
        parts.insert(0, with_newlines(stitched))
    return torch.cat(parts + [view_seperator[None]], dim=0)


# -----------------------------------------------------------------------------
# side by side

print(f"{torch.get_num_threads()} threads | fp32 | interleaved, best of {repeats} | seed {seed}")
print(f"{'case':<8} {'tokens':>6} {'DeepSeek-OCR ms':>16} {'ours ms':>9} {'ratio':>7} {'max |diff|':>11} {'rel diff':>9}")
ratio = None
with torch.inference_mode():
    for case in cases.split(","):
        size, n_tiles, tiling = CASES[case]
        global_view = torch.randn(3, size, size)
        tiles = torch.randn(n_tiles, 3, 640, 640) if n_tiles else None
        runs = [lambda: reference_encode(global_view, tiles, tiling),
                lambda: ours.encode_image(global_view, tiles, tiling)]
        best, outputs = [math.inf, math.inf], [None, None]
        for _ in range(repeats):
            for i, run in enumerate(runs):
                start = time.perf_counter()
                outputs[i] = run()
                best[i] = min(best[i], time.perf_counter() - start)
        theirs, mine = outputs
        if theirs.shape != mine.shape:
            sys.exit(f"{case}: the sequences differ in shape: {tuple(theirs.shape)} vs {tuple(mine.shape)}")
        diff = (theirs - mine).abs().max().item()
        relative = ((theirs - mine).norm() / theirs.norm()).item()
        ratio = best[1] / best[0]
        print(f"{case:<8} {mine.shape[0]:>6} {1000 * best[0]:>16.1f} {1000 * best[1]:>9.1f} {ratio:>6.3f}x "
              f"{diff:>11.2e} {relative:>9.2e}")
        if relative > 1e-4:
            sys.exit(f"{case}: our sequence differs from the reference's by {relative:.2e} (relative)")
print(f"ratio {ratio:.3f}")
