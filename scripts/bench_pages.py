"""
Page OCR side by side on the same held-out pages: our page model's two paths (the grounding answer; the detection
head with the line reader), as scripts/vision_sample.py --page_mode scored them, and tesseract, scored here the
same way (nanovlm.pageocr.page_score): detection rate (reference lines matched one-to-one at IoU >= 0.5), IoU of
those matches, CER of the page text (lines joined by newlines, boxes dropped) and seconds per page.

    python -m scripts.vision_sample --model_tag=pages --data=data/pages_val/dataset.json --page_mode=grounding \
        --json=checkpoints/pages/eval_grounding.json      # and --page_mode=head --json=.../eval_head.json
    python -m scripts.bench_pages --data=data/pages_val/dataset.json --model_tag=pages \
        --ours=checkpoints/pages/eval_grounding.json,checkpoints/pages/eval_head.json --json=bench_pages.json

tesseract: `tesseract IMAGE stdout --psm 6 tsv` (a uniform block of text), one process per page with
OMP_THREAD_LIMIT=1, timed per page from the process's start; a line is its TSV line box (level 4) with the text of
its words (level 5) joined by spaces, lines in tesseract's order. Not installed: ours alone.
With --model_tag and both of ours' paths, the one that read better (lower page CER) is written into that
checkpoint's meta: `--page_mode=auto` (scripts/ocr.py, vision_sample) then takes it. The table is markdown.
"""

import csv
import io
import json as jsonlib
import os
import shutil
import subprocess
import time

from configurator import configure
from nanovlm.common import get_base_dir
from nanovlm.dataloader import load_records
from nanovlm.image_process import load_image
from nanovlm.pageocr import grounding_text, make_line, page_score, record_page_mode, summarize_pages

data = "data/pages_val/dataset.json"  # a page set in the grounding format (a dataset JSON: tesseract reads files)
ours = ""  # vision_sample --page_mode JSONs of the same set, comma-separated
model_tag = ""  # record the better of ours' paths in checkpoints/<model_tag>'s meta
limit = -1  # only the first N pages (as vision_sample's --limit)
json = ""  # write the numbers here
user_config = configure(globals())

TESSERACT_ENV = dict(os.environ, OMP_THREAD_LIMIT="1")  # one thread: tesseract's OpenMP would take every core


def tesseract_lines(path):
    """tesseract's lines of one page: [{"text", "box", "box_999"}] (empty where it fails, said in one line)."""
    out = subprocess.run(["tesseract", path, "stdout", "--psm", "6", "tsv"], env=TESSERACT_ENV, capture_output=True,
                         encoding="utf-8", errors="replace")
    if out.returncode != 0:
        print(f"tesseract: {path}: exit {out.returncode} (no lines)")
        return []
    width, height = load_image(path).size
    boxes, words = {}, {}
    for row in csv.DictReader(io.StringIO(out.stdout), delimiter="\t", quoting=csv.QUOTE_NONE):
        key = (row["page_num"], row["block_num"], row["par_num"], row["line_num"])
        if row["level"] == "4":
            x, y, w, h = (int(row[k]) for k in ("left", "top", "width", "height"))
            boxes[key] = [x * 999 / width, y * 999 / height, (x + w) * 999 / width, (y + h) * 999 / height]
        elif row["level"] == "5" and (row.get("text") or "").strip():
            words.setdefault(key, []).append(row["text"].strip())
    return [make_line(" ".join(words[key]), box, width, height) for key, box in boxes.items() if key in words]


def score_tesseract(records):
    samples = []
    for record in records:
        start = time.perf_counter()
        lines = tesseract_lines(record["image"])
        samples.append(dict(id=record["id"], prediction=grounding_text(lines), reference=record.get("answer", ""),
                            seconds=time.perf_counter() - start, **page_score(lines, record.get("answer", ""))))
    return summarize_pages(samples, "tesseract")


def row(name, summary):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    return (f"| {name} | {fmt(summary['det_rate'], '.3f')} | {fmt(summary['iou'], '.3f')} | "
            f"{fmt(summary['cer'], '.3f')} | {fmt(summary['seconds_per_page'], '.2f')} | {summary['n']} |")


records = load_records(data, need_prompt=False)
records = records[:limit] if limit > 0 else records
results = {}
for path in [p for p in ours.split(",") if p]:
    with open(path) as f:
        summary = jsonlib.load(f)
    if summary["n"] != len(records):
        raise SystemExit(f"error: {path} scored {summary['n']} pages, {data} has {len(records)} here (--limit?)")
    results[summary["page_mode"]] = summary
if shutil.which("tesseract"):
    results["tesseract"] = score_tesseract(records)
else:
    print("tesseract is not installed (Debian package tesseract-ocr): ours alone")
print(f"{len(records)} pages of {data}")
print("| reader | det rate | IoU | CER | s/page | pages |\n|---|---|---|---|---|---|")
for name, summary in results.items():
    print(row({"grounding": "ours: grounding answer", "head": "ours: detection head + line reader"}.get(name, name),
              summary))
if model_tag and {"grounding", "head"} <= set(results):
    paths = {m: results[m] for m in ("grounding", "head")}
    best, meta_file = record_page_mode(os.path.join(get_base_dir(), model_tag), paths)
    print(f"page mode {best} read better: written to {model_tag}/{meta_file} (--page_mode=auto takes it)")
if json:
    with open(json, "w") as f:
        jsonlib.dump({"data": data, "readers": {k: {m: v for m, v in s.items() if m != "samples"}
                                                for k, s in results.items()}}, f, indent=2)
    print(f"wrote {json}")
