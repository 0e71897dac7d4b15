"""
Synthetic OCR data: receipts, charts, text scenes, document lines and paragraphs, and word grounding, drawn with
Pillow from a seed. Nothing is downloaded; the text comes from the small word pools below.

    python -m scripts.make_data --n=20000 --split=train        # -> data/synth_train/dataset.json + images/
    python -m scripts.make_data --n=1000 --split=val --kinds=line,paragraph --workers=2
    python -m scripts.make_data --tier1=True                   # the committed set: data/tier1/ (10 records)
    python -m scripts.make_data --chats=500                    # text-only conversations: data/chats.jsonl
    python -m scripts.make_data --n=200 --split=val --seed=777 --kinds=print --out_dir=data/print_val
    python -m scripts.make_data --n=50 --split=val --seed=777 --kinds=page --out_dir=data/pages_val
    python -m scripts.make_data --n=500 --split=val --shots=2 --kinds=line  # -> data/synth_2shot_val/

A dataset is a JSON list of records {id, image, prompt, answer, source, type}, `image` a PNG path relative to the
JSON file. Every sample is a pure function of (seed, split, index): the same command gives the same bytes, and two
splits never share a sample because the split name is part of every sample's seed. Kinds take turns by index.
--shots=K writes K-shot conversation records {id, conversation, images, source, type} instead: K example turns
(image -> answer) of the record's kind, then the asked image (synth.make_shots; record i holds the kind's samples
i * (K + 1) to i * (K + 1) + K, its PNGs images/<id>_<j>.png in turn order).
The kind `print` is not drawn: it cuts runs of words from real typeset PDF pages (nanovlm/realprint.py, which needs
pypdfium2 and the Debian manuals that scripts/setup_data.sh installs; train and val use different documents).
The kinds `page` (drawn) and `page_print` (windows of those real pages) ground every text line of a document window
(nanovlm/synth.py explains the format and the reading order); only they and `grounding`, whose answers hold boxes,
are asked with a `<|grounding|>` prompt.

The fonts are Pillow's bundled scalable font (no system fonts, so images are the same on every machine);
--system_fonts=True mixes in the DejaVu faces under /usr/share/fonts when they exist, for more varied large sets.
Text is drawn big on canvases of 256-512 px, because the model may see the image at only 128-256 px.
"""

import functools
import json
import os
import time

from PIL import Image, ImageChops

from nanovlm.synth import (FONT_FACES, MAX_ANSWER_CHARS, PROMPT_DESCRIBE, PROMPT_FIGURE,  # noqa: F401
                           PROMPT_OCR, RENDERERS, draw_receipt, make_chat, make_sample, make_shots, render_chart,
                           render_scene, sample_rng, shop_template, system_font_files, templated_receipt_lines)

out_dir = ""  # default: data/synth_<split>, or data/tier1 with --tier1=True
n = 1000  # number of samples
split = "train"  # part of every sample's seed: train and val never share a sample
seed = 0
kinds = "receipt,chart,scene,line,paragraph,grounding"  # comma-separated, taken in turn
shots = 0  # > 0: K-shot conversation records (K example image -> answer turns of the kind, then the asked image)
tier1 = False  # write the fixed 10-record sanity set (4 receipts of one shop, 3 charts, 3 scenes); --seed picks another
chats = 0  # > 0: write this many text-only conversations (JSONL, for stage 2's --text_data) instead of images
workers = 1  # processes
system_fonts = False  # also use system DejaVu fonts (images then depend on the machine's fonts)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIER1_KINDS = ["receipt"] * 4 + ["chart"] * 3 + ["scene"] * 3


def write_sample(job):
    """Render one sample, save its PNG under out_dir/images, return its record (a worker's whole job)."""
    out_dir, kind, seed, split, index = job
    record, image = make_sample(kind, seed, split, index)
    record["image"] = f"images/{record['id']}.png"
    image.save(os.path.join(out_dir, record["image"]), compress_level=1)  # fast; barely larger than the default
    return record


def write_shots(job, shots):
    """Render one K-shot record, save its PNGs under out_dir/images (in turn order), return its record."""
    out_dir, kind, seed, split, index = job
    record, images = make_shots(kind, seed, split, index, shots)
    record["images"] = [f"images/{record['id']}_{j}.png" for j in range(len(images))]
    for path, image in zip(record["images"], images):
        image.save(os.path.join(out_dir, path), compress_level=1)
    return record


def tier1_samples(seed=0):
    """
    The 10 tier-1 samples, as hard as real data of their kind: 4 receipts of one shop (same header, footer and
    layout; only date, items and prices differ, so only the image tells them apart) of 6 to 36 items on a
    460 px wide, up to 1000 px tall JPEG; 3 charts on 850x600 PNGs with a transparent background (RGBA); 3 text
    scenes as 1024x768 JPEGs. Answers run from ~150 to ~1,000 characters. Returns (record, image, format) triples.
    """
    rng = sample_rng(seed, "tier1", "layout")
    template = shop_template(sample_rng(seed, "tier1", "shop"))
    item_counts = rng.sample([6, 14, 24, 36], 4)
    samples = []
    for index, kind in enumerate(TIER1_KINDS):
        sample = sample_rng(seed, "tier1", index)
        if kind == "receipt":
            lines = templated_receipt_lines(template, sample, item_counts[index])
            image, answer = draw_receipt(sample, lines, width=460, max_height=1000, largest=22)
            prompt, image_format = PROMPT_OCR, "jpg"
        elif kind == "chart":
            image, answer = render_chart(sample, width=850, height=600)
            image = transparent_paper(image)
            prompt, image_format = PROMPT_FIGURE, "png"
        else:
            image, answer = render_scene(sample, width=1024, height=768)
            prompt, image_format = PROMPT_DESCRIBE, "jpg"
        record = {"id": f"tier1_{index:02d}_{kind}", "prompt": prompt, "answer": answer, "source": "synth",
                  "type": kind}
        samples.append((record, image, image_format))
    return samples


def transparent_paper(image):
    """RGBA with the paper colour (the top-left pixel) made fully transparent: a chart exported on no background."""
    rgba = image.convert("RGBA")
    paper = image.getpixel((0, 0))
    alpha = Image.eval(ImageChops.difference(image, Image.new("RGB", image.size, paper)).convert("L"),
                       lambda d: 0 if d == 0 else 255)
    rgba.putalpha(alpha)
    return rgba


def save_dataset(records, out_dir):
    path = os.path.join(out_dir, "dataset.json")
    fields = {False: ("id", "image", "prompt", "answer", "source", "type"),
              True: ("id", "conversation", "images", "source", "type")}
    with open(path, "w") as f:
        json.dump([{k: r[k] for k in fields["conversation" in r]} for r in records], f, indent=1)
        f.write("\n")
    return path


def generate(out_dir, n, split, seed, kind_list, num_workers, shots=0):
    for kind in kind_list:
        if kind not in RENDERERS:
            raise ValueError(f"unknown kind '{kind}', choose from {', '.join(RENDERERS)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    jobs = [(out_dir, kind_list[i % len(kind_list)], seed, split, i) for i in range(n)]
    work = functools.partial(write_shots, shots=shots) if shots > 0 else write_sample
    if num_workers > 1:
        import multiprocessing
        with multiprocessing.Pool(num_workers) as pool:  # imap keeps the records in index order
            records = with_progress(pool.imap(work, jobs, chunksize=64), n)
    else:
        records = with_progress(map(work, jobs), n)
    return save_dataset(records, out_dir)


def with_progress(results, n, every=2000):
    records, t0 = [], time.time()
    for record in results:
        records.append(record)
        if len(records) % every == 0 or len(records) == n:
            elapsed = time.time() - t0
            print(f"{len(records):7d}/{n} samples | {elapsed:6.1f}s | {len(records) / elapsed:6.0f} images/s")
    return records


def generate_tier1(out_dir, seed):
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for record, image, image_format in tier1_samples(seed):
        record["image"] = f"images/{record['id']}.{image_format}"
        path = os.path.join(out_dir, record["image"])
        if image_format == "jpg":
            image.save(path, quality=85)
        else:
            image.save(path, optimize=True)  # committed: smallest files
        records.append(record)
    return save_dataset(records, out_dir)


def generate_chats(path, n, seed):
    """n text-only conversations, one JSON list of messages per line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for index in range(n):
            f.write(json.dumps(make_chat(seed, index)) + "\n")
    return path


def main():
    if system_fonts:
        FONT_FACES.extend(system_font_files())
    if chats > 0:
        path = generate_chats(out_dir or os.path.join(REPO_ROOT, "data", "chats.jsonl"), chats, seed)
    elif tier1:
        path = generate_tier1(out_dir or os.path.join(REPO_ROOT, "data", "tier1"), seed)
    else:
        kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
        name = f"synth_{shots}shot_{split}" if shots > 0 else f"synth_{split}"
        path = generate(out_dir or os.path.join(REPO_ROOT, "data", name), n, split, seed, kind_list, workers, shots)
    print(f"wrote {path}")


if __name__ == "__main__":
    from configurator import configure
    user_config = configure(globals())
    main()
