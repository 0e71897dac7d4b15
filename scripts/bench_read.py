"""
Our line reader against tesseract on the same held-out line sets: per set and reader the mean CER, exact matches
and lines per second, then how many times tesseract's lines per second ours reads.

    python -m scripts.bench_read --model_tag=lines \
        --data=data/synth_read_words/dataset.json,data/synth_read_fonts/dataset.json,data/print_val/dataset.json

ours: each record asked its own prompt (a record without one: the checkpoint's training prompt), greedy,
batch_size records at a time through Engine.generate_many (nanovlm.evaluate.read_images, as scripts/ocr.py reads
several images), on torch's threads (--threads). Timed from the images loaded (decoded from their files, not
timed) to the answers decoded: preprocessing, prompts, encoder, generation, detokenizing. One untimed warm-up
batch comes first.
tesseract: `tesseract IMAGE stdout --psm 7` (one text line), one process per image, one after another, with
OMP_THREAD_LIMIT=1 (one thread). Timed over those processes: each one's start and its reading of the image file
count. Its answer is its output without the trailing newline / form feed. Not installed: ours is reported alone.

An image a reader cannot read is an empty answer for that reader, named in one line. The last line is the
geometric mean over the sets of ours' lines/s over tesseract's (each set weighs the same, whatever its size).
"""

import json as jsonlib
import math
import os
import shutil
import subprocess
import time

import torch

from configurator import configure
from nanovlm.checkpoint import image_mode_of, load_vlm, reading_prompt
from nanovlm.common import autocast_context, compute_init, get_base_dir
from nanovlm.dataloader import load_records
from nanovlm.engine import Engine
from nanovlm.evaluate import answer_budget, read_images, score
from nanovlm.image_process import load_image

data = "data/synth_read_words/dataset.json,data/synth_read_fonts/dataset.json,data/print_val/dataset.json"
model_tag = "lines"  # a run under checkpoints/
checkpoint_dir = ""  # or an explicit checkpoint directory
step = -1  # -1 = the latest
image_mode = ""  # empty = the one the checkpoint was trained with
max_new_tokens = -1  # -1 = the set's longest reference + a little, at least the checkpoint's sequence length
limit = -1  # only the first N records of each set
batch_size = 8  # records read together by ours (greedy answers are the same at any batch size)
threads = 0  # torch threads for ours; 0 = torch's default
json = ""  # write the numbers here
device_type = ""
user_config = configure(globals())

TESSERACT_ENV = dict(os.environ, OMP_THREAD_LIMIT="1")  # one thread: tesseract's OpenMP would take every core
WARM_UP_TOKENS = 8  # enough for the warm-up batch to run decode steps, not only the prefill


def fail(message):
    raise SystemExit(f"error: {message}")


def load_set(path):
    """A set's records (the first `limit`); tesseract reads image files, so a set is a dataset JSON."""
    if path.startswith("synth:"):
        raise ValueError(f"{path}: give a dataset JSON (tesseract reads image files; make_data writes them)")
    records = load_records(path, need_prompt=False)
    return records[:limit] if limit > 0 else records


def load_pictures(records):
    """Each record's image in memory; None where it cannot be read (one line: ours answers it with nothing)."""
    pictures = []
    for record in records:
        try:
            pictures.append(load_image(record["image"]))
        except ValueError as e:
            print(f"ours: record {record['id']}: {e} (an empty answer)")
            pictures.append(None)
    return pictures


def read_ours(engine, pictures, prompts, budget):
    """Our answers to the loaded pictures ("" where None) and the seconds from loaded to decoded."""
    readable = [i for i, picture in enumerate(pictures) if picture is not None]
    t0 = time.perf_counter()
    with autocast_context(device.type):
        answers = read_images(engine, [pictures[i] for i in readable], [prompts[i] for i in readable], image_mode,
                              budget, batch_size)
    seconds = time.perf_counter() - t0
    by_index = dict(zip(readable, answers))
    return [by_index.get(i, "") for i in range(len(pictures))], seconds


def read_tesseract(records):
    """tesseract's answers, one process per image, and the seconds all of them took."""
    answers = []
    t0 = time.perf_counter()
    for record in records:
        out = subprocess.run(["tesseract", record["image"], "stdout", "--psm", "7"], env=TESSERACT_ENV,
                             capture_output=True, encoding="utf-8", errors="replace")
        if out.returncode != 0:
            reason = next((line for line in out.stderr.splitlines() if line.strip()), f"exit {out.returncode}")
            print(f"tesseract: record {record['id']}: {reason} (an empty answer)")
        answers.append(out.stdout.rstrip("\n\f") if out.returncode == 0 else "")
    return answers, time.perf_counter() - t0


def tesseract_version():
    """The first line of `tesseract --version` (on stdout; older releases write it to stderr)."""
    out = subprocess.run(["tesseract", "--version"], capture_output=True, encoding="utf-8", errors="replace")
    lines = (out.stdout + out.stderr).splitlines()
    return lines[0].strip() if lines else "tesseract, unknown version"


def measure(records, answers, seconds):
    """One reader on one set: n, mean CER over the lines, exact matches (as vision_sample), lines per second."""
    scored = [score(answer, record["answer"]) for answer, record in zip(answers, records)]
    n = len(records)
    return {"n": n, "cer": sum(s["cer"] for s in scored) / n, "exact": sum(bool(s["exact"]) for s in scored),
            "seconds": seconds, "lines_per_s": n / seconds}


paths = [p for p in data.split(",") if p]
if not paths:
    fail("give the line sets with --data=a.json,b.json")
if threads > 0:
    torch.set_num_threads(threads)
_, _, _, _, device = compute_init(device_type)
directory = checkpoint_dir or os.path.join(get_base_dir(), model_tag)
try:
    sets = [(path, load_set(path)) for path in paths]  # every set first: a missing one stops before the model loads
    model, tokenizer, meta = load_vlm(directory, None if step < 0 else step, device=device)
    image_mode = image_mode_of(meta, image_mode)
except (FileNotFoundError, ValueError) as e:
    fail(e)
has_tesseract = shutil.which("tesseract") is not None
version = tesseract_version() if has_tesseract else None
print(f"ours: {directory} step {meta['step']}, image mode {image_mode}, device {device}, "
      f"torch threads {torch.get_num_threads()}, batch {batch_size}, greedy")
print(f"tesseract: {version}, --psm 7, 1 thread, one process per line" if has_tesseract else
      "tesseract is not installed (Debian package tesseract-ocr): ours alone")
asked, note = reading_prompt(meta)  # for records without a prompt of their own
engine = Engine(model, tokenizer)

results = []
for index, (path, records) in enumerate(sets):
    without_prompt = sum("prompt" not in r for r in records)
    if without_prompt:
        print(f"{path}: records without a prompt ({without_prompt}) are asked {asked!r}: {note}")
    prompts = [r.get("prompt", asked) for r in records]
    budget = answer_budget(model, tokenizer, records, max_new_tokens)
    pictures = load_pictures(records)
    if index == 0:  # the first calls allocate and pick kernels: not part of the reading speed
        read_ours(engine, pictures[:batch_size], prompts[:batch_size], WARM_UP_TOKENS)
    answers, seconds = read_ours(engine, pictures, prompts, budget)
    result = {"data": path, "ours": measure(records, answers, seconds), "tesseract": None, "ratio": None}
    if has_tesseract:
        result["tesseract"] = measure(records, *read_tesseract(records))
        result["ratio"] = result["ours"]["lines_per_s"] / result["tesseract"]["lines_per_s"]
    results.append(result)

width = max(len("set"), *(len(path) for path in paths))
print(f"{'set':<{width}} {'reader':<10} {'n':>5} {'CER':>7} {'exact':>11} {'lines/s':>9}")
for result in results:
    for reader in ("ours", "tesseract"):
        m = result[reader]
        if m:
            exact = f"{m['exact']}/{m['n']}"
            print(f"{result['data']:<{width}} {reader:<10} {m['n']:>5} {m['cer']:7.4f} {exact:>11} "
                  f"{m['lines_per_s']:9.2f}")
ratios = [result["ratio"] for result in results if result["ratio"] is not None]
for result in results:
    if result["ratio"] is not None:
        print(f"lines/s ratio (ours / tesseract) on {result['data']}: {result['ratio']:.2f}x")
mean_ratio = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None
if json:
    summary = {"checkpoint": directory, "step": meta["step"], "image_mode": str(image_mode), "device": str(device),
               "threads": torch.get_num_threads(), "batch_size": batch_size, "tesseract": version, "sets": results,
               "ratio": mean_ratio, "ratio_is": "geometric mean over the sets of ours' lines/s / tesseract's"}
    with open(json, "w") as f:
        jsonlib.dump(summary, f, indent=2)
    print(f"wrote {json}")
if mean_ratio is None:
    print("lines/s ratio (ours / tesseract): - (no tesseract)")
else:
    print(f"lines/s ratio (ours / tesseract): {mean_ratio:.2f}x (geometric mean over {len(ratios)} sets)")
