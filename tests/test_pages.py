"""Document pages with every line grounded (kinds `page` and `page_print`): boxes on the ink, reading order, split
words and fonts, answers the grounding parser reads, and prompts that ask for boxes only where answers have them.
Synthetic pages draw from a made-up word list; real pages from a PDF written here, so no Debian package is needed
except for the last test."""

import json
import random
import re
import shutil

import numpy as np
import pytest

from conftest import made_up_words, write_pdf
from nanovlm import realprint, synth, textlines
from nanovlm.metrics import parse_boxes
from nanovlm.synth import (ANSWER_LIMITS, PROMPT_GROUNDING_OCR, RENDERERS, SPLIT_KINDS, draw_page, make_sample,
                           page_fonts, render_page, render_page_print)
from scripts.make_data import generate

GROUNDING_KINDS = {"grounding", "page", "page_print"}


@pytest.fixture
def word_list(tmp_path, monkeypatch):
    """400 made-up words in place of the system's word list: a training word never shows up by chance."""
    words = made_up_words()
    path = tmp_path / "words"
    path.write_text("\n".join(words) + "\n")
    monkeypatch.setattr(textlines, "LEXICON_FILES", [str(path)])
    textlines.lexicon.cache_clear()
    yield
    textlines.lexicon.cache_clear()


def held_out_fonts():
    try:
        return textlines.font_faces(True)
    except ValueError:
        pytest.skip("no held-out font family installed (scripts/setup_data.sh installs them)")


def to_pixels(box, width, height, slack=2):
    """A 0-999 box back in pixels, widened by the scale's rounding (under a pixel) and slack."""
    x1, y1, x2, y2 = box
    return (max(0, int(x1 * width / 999) - slack), max(0, int(y1 * height / 999) - slack),
            int(np.ceil(x2 * width / 999)) + slack, int(np.ceil(y2 * height / 999)) + slack)


def check_ink_in_boxes(image, boxes, dark):
    """Every box holds ink that reaches within a few pixels of each of its sides; no ink lies outside them."""
    ink = dark(np.asarray(image).astype(int))
    covered = np.zeros_like(ink)
    for box in boxes:
        x1, y1, x2, y2 = to_pixels(box, image.width, image.height)
        rows, cols = np.nonzero(ink[y1:y2, x1:x2])
        assert len(rows), f"no ink in {box}"
        assert rows.min() <= 4 and cols.min() <= 4 and (y2 - y1) - rows.max() <= 5 and (x2 - x1) - cols.max() <= 5
        covered[y1:y2, x1:x2] = True
    assert not (ink & ~covered).any(), "ink outside every box"


def in_reading_order(boxes):
    """Each line below the one before (its centre lower) or wholly to its right (a row's next cell, or the top of
    the next column)."""
    return all((b[1] + b[3]) / 2 > (a[1] + a[3]) / 2 or b[0] >= a[2] for a, b in zip(boxes, boxes[1:]))

# -----------------------------------------------------------------------------
# prompts


@pytest.mark.parametrize("kind", sorted(RENDERERS))
def test_boxes_are_asked_for_only_where_the_answer_has_them(kind):
    """`<|grounding|>` in the prompt exactly when the answer is in the grounding format, for every kind."""
    assert ("<|grounding|>" in RENDERERS[kind][1]) == (kind in GROUNDING_KINDS)
    for index in range(2):
        try:
            record, _ = make_sample(kind, 0, "val" if kind in SPLIT_KINDS else "test", index)
        except ValueError as error:  # a word list, font or document that is not installed here
            pytest.skip(str(error))
        assert ("<|grounding|>" in record["prompt"]) == bool(parse_boxes(record["answer"])), record["id"]

# -----------------------------------------------------------------------------
# synthetic pages


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_line_box_holds_its_ink(word_list, split):
    if split == "val":
        held_out_fonts()
    for index in range(6):
        image, answer = render_page(random.Random(index), split, clean=True)
        boxes = parse_boxes(answer)
        assert len(boxes) == answer.count("\n") + 1 and all(0 <= v <= 999 for _, box in boxes for v in box)
        background = np.asarray(image)[0, 0].astype(int)
        check_ink_in_boxes(image, [box for _, box in boxes], lambda p: np.abs(p - background).max(axis=2) > 60)


@pytest.mark.parametrize("split", ["train", "val"])
def test_answers_parse_into_one_box_per_line_in_reading_order(word_list, split):
    if split == "val":
        held_out_fonts()
    layouts = set()
    for index in range(24):
        image, lines, page = draw_page(random.Random(index), split)
        layouts.add(page["layout"])
        answer = synth.grounding_answer(lines, image.width, image.height)
        boxes = parse_boxes(answer)
        assert [label for label, _ in boxes] == [text for text, _ in lines]  # every line, its text as drawn
        assert len(boxes) <= synth.PAGE_LINES[1] and len(answer) <= ANSWER_LIMITS["page"]
        assert all(text == text.strip() and text.isascii() and "  " not in text for text, _ in lines)
        assert in_reading_order([box for _, box in lines]), answer
        if page["layout"] == "columns":  # the left column top to bottom, then the right one
            middle = image.width / 2
            sides = [box[0] > middle for _, box in lines if box[2] < middle or box[0] > middle]
            assert sides == sorted(sides) and True in sides
    assert layouts == {"text", "columns", "receipt"}


def test_validation_pages_share_no_word_or_font_with_training(word_list):
    held_out = set(held_out_fonts())
    train_words, val_words = set(textlines.lexicon("train")), set(textlines.lexicon("val"))
    upright, regular, mono, bold = page_fonts(True)
    assert set(upright) | set(mono) <= held_out and not held_out & set(textlines.font_faces(False))
    for split, others in (("val", train_words), ("train", val_words)):
        drawn = set()
        for index in range(12):
            _, lines, page = draw_page(random.Random(index), split)
            assert (page["face"] in held_out) == (split == "val")
            drawn |= {word.lower() for text, _ in lines for word in re.findall(r"[A-Za-z]+", text)}
        assert not drawn & {w.lower() for w in others}, split
        assert len(drawn & {w.lower() for w in (val_words if split == "val" else train_words)}) > 50


def test_page_records(word_list, tmp_path):
    record, image = make_sample("page", 3, "train", 5)
    again, image_again = make_sample("page", 3, "train", 5)
    assert record == again and image.tobytes() == image_again.tobytes()
    assert record["prompt"] == PROMPT_GROUNDING_OCR and record["source"] == "synth" and record["type"] == "page"
    assert synth.PAGE_WIDTHS[0] <= image.width <= synth.PAGE_WIDTHS[1] and image.height <= synth.PAGE_MAX_HEIGHT
    narrow, answer = render_page(random.Random(0), "train", widths=(320, 320), lines=(2, 2))  # sizes: parameters
    assert narrow.width == 320 and len(parse_boxes(answer)) <= 2
    with pytest.raises(ValueError, match="'train' or 'val'"):
        render_page(random.Random(0), "test")
    path = generate(str(tmp_path / "out"), 3, "train", 777, ["page"], 1)
    records = json.load(open(path))
    assert [r["id"] for r in records] == ["train_000000_page", "train_000001_page", "train_000002_page"]

# -----------------------------------------------------------------------------
# real pages: a PDF written here


# (x, y, text): a heading, a paragraph, two columns (the left one drawn first, as typesetters do), more text
TEXT = [(72, 720, "Pages and their lines"),
        (72, 690, "Every line of a window is listed with its box,"), (72, 676, "from the top down, and the left"),
        (72, 662, "column before the right one.")]
LEFT = [(72, 630 - 14 * k, f"left column line {k}") for k in range(4)]
RIGHT = [(330, 630 - 14 * k, f"right column line {k}") for k in range(4)]
MORE = [(72, 480 - 14 * k, f"closing text number {k} here") for k in range(4)]
SUPERSCRIPT = "BT /F1 12 Tf 72 540 Td (energy is mc) Tj 5 Ts (2) Tj 0 Ts ET\n"  # raised: unreadable
RULED = "BT /F1 12 Tf 72 515 Td (use my) Tj ET BT /F1 12 Tf 122.4 515 Td (name here) Tj ET 115.2 513.5 7.2 0.6 re f\n"


@pytest.fixture
def page_pdf(tmp_path, monkeypatch):
    content = "".join(f"BT /F1 12 Tf {x} {y} Td ({text}) Tj ET\n" for x, y, text in TEXT + LEFT + RIGHT + MORE)
    path = write_pdf(tmp_path / "page.pdf", content + SUPERSCRIPT + RULED)
    monkeypatch.setattr(realprint, "PRINT_DOCUMENTS", {"train": [path], "val": [path]})
    monkeypatch.setattr(realprint, "RASTERISERS", {"train": "pdfium", "val": "pdfium"})
    return path


def test_page_lines_and_which_are_readable(page_pdf):
    lines = realprint.window_lines(page_pdf, 0)
    readable = {text for text, _, _, ok in lines if ok}
    assert readable == {text for _, _, text in TEXT + LEFT + RIGHT + MORE}
    assert {text for text, _, _, ok in lines if not ok} == {"energy is mc2", "use my name here"}
    for text, loose, ink, _ in lines:  # the ink box lies within the font's ascent-to-descent box
        assert loose[0] - 0.5 <= ink[0] < ink[2] <= loose[2] + 0.5 and loose[1] - 0.5 <= ink[1] < ink[3] <= loose[3]


def test_real_windows_ground_whole_readable_lines(page_pdf):
    page_texts = [text for _, _, text in TEXT + LEFT + RIGHT + MORE]
    seen = set()
    for seed in range(16):
        image, answer = render_page_print(random.Random(seed), "train")
        boxes = parse_boxes(answer)
        texts = [label for label, _ in boxes]
        assert len(boxes) == answer.count("\n") + 1 and set(texts) <= set(page_texts), texts
        assert texts == sorted(texts, key=page_texts.index)  # the page's drawing order: its reading order
        assert in_reading_order([box for _, box in boxes]) and all(0 <= v <= 999 for _, b in boxes for v in b)
        left = [t.startswith("left") for t in texts if t.split()[0] in ("left", "right")]
        assert left == sorted(left, reverse=True)  # the whole left column first
        check_ink_in_boxes(image, [box for _, box in boxes], lambda p: p.min(axis=2) < 128)
        assert image.width <= synth.PAGE_WIDTHS[1] and image.height <= synth.PAGE_MAX_HEIGHT
        seen |= set(texts)
    assert len(seen) > 15 and any(t.startswith("right") for t in seen)


def test_real_windows_are_deterministic_and_poppler_draws_validation(page_pdf, monkeypatch, tmp_path):
    a, answer_a = render_page_print(random.Random(5), "val")
    b, answer_b = render_page_print(random.Random(5), "val")
    assert answer_a == answer_b and a.tobytes() == b.tobytes()
    if shutil.which("pdftoppm"):
        monkeypatch.setattr(realprint, "RASTERISERS", {"train": "pdfium", "val": "poppler"})
        image, answer = render_page_print(random.Random(5), "val")
        assert [label for label, _ in parse_boxes(answer)] == [label for label, _ in parse_boxes(answer_a)]
        assert abs(image.width - a.width) <= 2 and abs(image.height - a.height) <= 2
    path = generate(str(tmp_path / "out"), 2, "val", 777, ["page_print"], 1)
    for record in json.load(open(path)):
        assert record["prompt"] == PROMPT_GROUNDING_OCR and record["source"] == "print"
        assert record["type"] == "page_print" and parse_boxes(record["answer"])


def test_real_windows_from_the_installed_manuals():
    for split in ("train", "val"):
        try:
            realprint.print_documents(split)
        except ValueError:
            pytest.skip("the typeset manuals are not installed (scripts/setup_data.sh installs them)")
        if split == "val" and not shutil.which("pdftoppm"):
            pytest.skip("validation pages are rasterised by poppler's pdftoppm")
        for seed in range(2):
            image, answer = render_page_print(random.Random(seed), split)
            boxes = parse_boxes(answer)
            assert boxes and len(boxes) == answer.count("\n") + 1 and answer.isascii()
            assert in_reading_order([box for _, box in boxes])
            ink = np.asarray(image).min(axis=2) < 128
            for _, box in boxes:
                x1, y1, x2, y2 = to_pixels(box, image.width, image.height, slack=1)
                assert ink[y1:y2, x1:x2].any()
