"""
Page OCR: every text line of a page, in reading order, with its box. Two ways to get them from a page model (one
trained on grounding answers, `<|ref|>text<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>` per line, 0-999):

- grounding: the page model answers the grounding prompt; the answer is parsed into lines as far as it goes
  (complete <|ref|>..<|det|>..<|/det|> pairs; a cut or garbled part is skipped, never an error) and every box is
  put in order and clipped to the image.
- head: the page model's detection head gives the line boxes (objectness above a threshold, reading order,
  detection.reading_order); each box is cropped from the page with a small margin and all of a page's crops are
  read by a line reader (its own checkpoint, image mode and training prompt) in one Engine.generate_many batch.

    page = load_reader("checkpoints/pages", "cpu")
    lines = read_page(page, picture, "grounding")                 # [{"text", "box", "box_999"}, ...]
    lines = read_page(page, picture, "head", reader=load_reader("checkpoints/lines", "cpu"))
    page_score(lines, reference)                                  # cer, det_rate, iou against a grounding answer

A line's "box" is in pixels of the original image (x1, y1, x2, y2, ints: what a user crops with), "box_999" the
same box on the 0-999 scale of the image's width and height (what grounding answers and the scores use).
--page_mode=auto picks the path the checkpoint's meta says measured better (meta["page_mode"], written by
record_page_mode after scripts/bench_pages.py compared both), else grounding: the path every page model has.
"""

import json
import os
import time

import torch

from nanovlm.checkpoint import find_last_step, image_mode_of, load_vlm, meta_path, read_meta, reading_prompt
from nanovlm.common import atomic_write
from nanovlm.dataloader import image_to, prompt_ids
from nanovlm.engine import Engine
from nanovlm.evaluate import head_boxes, read_images
from nanovlm.image_process import preprocess
from nanovlm.metrics import cer, detection_rate, mean_iou, parse_boxes

PAGE_MODES = ("grounding", "head")
CROP_MARGIN = 0.25  # of the line's height on every side: the reader trained on lines with paper around the ink,
# and a head box a few pixels off would otherwise cut off ascenders, descenders or a first letter


def load_reader(directory, device, image_mode="", prompt="", max_new_tokens=-1):
    """A checkpoint ready to read (reader_of), loaded from its latest step."""
    return reader_of(*load_vlm(directory, device=device), directory, image_mode, prompt, max_new_tokens)


def reader_of(model, tokenizer, meta, directory, image_mode="", prompt="", max_new_tokens=-1):
    """A loaded checkpoint ready to read: engine, image mode and prompt (the flags, else the checkpoint's own),
    the answer budget (else its training sequence length) and its meta."""
    prompt, _ = reading_prompt(meta, prompt)
    budget = max_new_tokens if max_new_tokens > 0 else model.config.sequence_len
    return dict(engine=Engine(model, tokenizer), image_mode=image_mode_of(meta, image_mode), prompt=prompt,
                max_new_tokens=budget, meta=meta, directory=directory)


def page_mode_of(meta, flag="auto"):
    """grounding or head: the flag, or for auto (or empty) the path the meta says measured better, else grounding."""
    mode = flag if flag and flag != "auto" else meta.get("page_mode", "grounding")
    if mode not in PAGE_MODES:
        raise ValueError(f"unknown page mode {mode!r}: use grounding, head or auto")
    return mode

# -----------------------------------------------------------------------------
# boxes and lines


def clip_box(box):
    """A 0-999 box with its corners in order and clipped to the image, as ints (a generated answer may swap
    corners or run past the page)."""
    x1, y1, x2, y2 = (min(999, max(0, round(v))) for v in box)
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def to_pixels(box, width, height):
    x1, y1, x2, y2 = box
    return [round(x1 * width / 999), round(y1 * height / 999), round(x2 * width / 999), round(y2 * height / 999)]


def make_line(text, box, width, height):
    box = clip_box(box)
    return {"text": text, "box": to_pixels(box, width, height), "box_999": box}


def lines_from_answer(answer, width, height):
    """A grounding answer -> its lines, as far as it parses: every complete ref/det pair (metrics.parse_boxes,
    which never raises; a det without a ref gets the text ""), boxes clipped."""
    return [make_line(label or "", box, width, height) for label, box in parse_boxes(answer)]


def grounding_text(lines):
    """Lines back in the grounding format (0-999): what a page answer looks like, whichever path found them."""
    return "\n".join(f"<|ref|>{line['text']}<|/ref|><|det|>[[{', '.join(map(str, line['box_999']))}]]<|/det|>"
                     for line in lines)


def crop_line(picture, box):
    """The pixels of a line box, grown by CROP_MARGIN of its height on every side (within the page), at least
    one pixel each way."""
    x1, y1, x2, y2 = box
    pad = max(1, round(CROP_MARGIN * (y2 - y1)))
    left, top = max(0, x1 - pad), max(0, y1 - pad)
    right, bottom = min(picture.width, max(x2 + pad, left + 1)), min(picture.height, max(y2 + pad, top + 1))
    return picture.crop((min(left, picture.width - 1), min(top, picture.height - 1), right, bottom))

# -----------------------------------------------------------------------------
# the two paths


def read_grounding(page, picture):
    """The page model's grounding answer, and its lines."""
    answer = read_images(page["engine"], [picture], [page["prompt"]], page["image_mode"], page["max_new_tokens"],
                         batch_size=1)[0]
    return answer, lines_from_answer(answer, *picture.size)


@torch.no_grad()
def detect_lines(page, picture, threshold=0.5):
    """The detection head's line boxes (0-999, reading order) for a page, asked with the page model's prompt (the
    head also reads the GPT's states of it)."""
    model, tokenizer = page["engine"].model, page["engine"].tokenizer
    if model.det_head is None:
        raise ValueError(f"{page['directory']} has no detection head (train it with --det_head=True)")
    ids = prompt_ids(tokenizer, page["prompt"], picture, page["image_mode"])
    features = model.encoder.encode_images([image_to(preprocess(picture, page["image_mode"]), model.get_device())])
    return head_boxes(model, [ids], [features], tokenizer.encode_special("<|assistant_end|>"), threshold)[0]


def read_crops(reader, crops):
    """Line crops read by the line reader, all in one generate_many batch; one line of text each."""
    if not crops:
        return []
    answers = read_images(reader["engine"], crops, [reader["prompt"]] * len(crops), reader["image_mode"],
                          reader["max_new_tokens"], batch_size=len(crops))
    return [" ".join(answer.split()) for answer in answers]


def read_with_head(page, reader, picture, threshold=0.5):
    """The head's boxes, each line crop read by the reader."""
    width, height = picture.size
    boxes = [clip_box(box) for box in detect_lines(page, picture, threshold)]
    texts = read_crops(reader, [crop_line(picture, to_pixels(box, width, height)) for box in boxes])
    return [make_line(text, box, width, height) for text, box in zip(texts, boxes)]


def read_page(page, picture, mode, reader=None, threshold=0.5):
    """Every line of a page in reading order, [{"text", "box" (pixels), "box_999"}], by the path `mode` names."""
    if mode == "head":
        if reader is None:
            raise ValueError("the head path reads its line crops with a line reader: give one (--reader_tag)")
        return read_with_head(page, reader, picture, threshold)
    return read_grounding(page, picture)[1]

# -----------------------------------------------------------------------------
# scoring a page set


def page_score(lines, reference):
    """
    A page's lines against its reference grounding answer: cer of the page text (lines joined by newlines, boxes
    dropped); det_rate, the share of reference lines matched one-to-one by a predicted box at IoU >= 0.5 (boxes
    alone: the text is cer's to judge), and iou, the mean IoU of those matches. A reference without lines (a page
    with no text) has no det_rate or iou: its score is the cer of saying nothing (0) or something (1).
    """
    refs = parse_boxes(reference)
    ref_text = "\n".join(label or "" for label, _ in refs) if refs else reference.strip()
    result = {"cer": cer("\n".join(line["text"] for line in lines), ref_text), "lines": len(lines),
              "ref_lines": len(refs)}
    if refs:
        predicted, wanted = [line["box_999"] for line in lines], [box for _, box in refs]
        result.update(det_rate=detection_rate(predicted, wanted), iou=mean_iou(predicted, wanted))
    return result


def score_pages(page, records, pictures, mode, reader=None, threshold=0.5):
    """One sample per record (id, prediction: the page in the grounding format, reference, seconds, page_score's
    measures), each page read on its own and timed from its loaded image to its lines."""
    samples = []
    for record, picture in zip(records, pictures):
        start = time.perf_counter()
        lines = read_page(page, picture, mode, reader, threshold) if picture is not None else []
        seconds = time.perf_counter() - start
        reference = record.get("answer", "")
        samples.append(dict(id=record["id"], prediction=grounding_text(lines), reference=reference,
                            seconds=seconds, **page_score(lines, reference)))
    return samples


def summarize_pages(samples, mode):
    """Means over pages (det_rate and iou over pages with reference lines) and seconds per page."""
    def mean(key):
        values = [s[key] for s in samples if s.get(key) is not None]
        return sum(values) / len(values) if values else None
    return {"page_mode": mode, "n": len(samples), "det_rate": mean("det_rate"), "iou": mean("iou"),
            "cer": mean("cer"), "seconds_per_page": mean("seconds"), "samples": samples}


def record_page_mode(directory, summaries):
    """Write into the checkpoint's latest meta the path that read better ({mode: summary}: the lower page cer, a
    tie going to the higher det_rate) and what each measured: --page_mode=auto follows it."""
    best = min(summaries, key=lambda m: (summaries[m]["cer"], -(summaries[m]["det_rate"] or 0)))
    path = meta_path(directory, find_last_step(directory))
    meta = read_meta(path)
    meta["page_mode"] = best
    meta["page_modes_measured"] = {m: {k: s[k] for k in ("n", "det_rate", "iou", "cer", "seconds_per_page")}
                                   for m, s in summaries.items()}
    atomic_write(path, json.dumps(meta, indent=2).encode())
    return best, os.path.basename(path)
