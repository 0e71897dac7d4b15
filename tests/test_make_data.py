"""The synthetic data generator: determinism, split separation, every kind's record, grounding boxes, tier-1 set."""

import io
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from nanovlm.metrics import parse_boxes
from nanovlm.synth import COMMON_WORDS, LINE2_MAX_CHARS, SPLIT_KINDS
from scripts.make_data import (MAX_ANSWER_CHARS, RENDERERS, generate, make_sample,
                               tier1_samples)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIER1_DIR = os.path.join(REPO_ROOT, "data", "tier1")


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# the kinds drawn from installed word lists, fonts and PDFs have their own tests (test_textlines, test_realprint)
SELF_CONTAINED = sorted(set(RENDERERS) - SPLIT_KINDS)


@pytest.mark.parametrize("kind", SELF_CONTAINED)
def test_same_seed_same_sample(kind):
    record_a, image_a = make_sample(kind, 3, "train", 7)
    record_b, image_b = make_sample(kind, 3, "train", 7)
    assert record_a == record_b
    assert png_bytes(image_a) == png_bytes(image_b)
    record_c, _ = make_sample(kind, 4, "train", 7)
    assert record_c["answer"] != record_a["answer"]  # the seed matters


def test_splits_do_not_share_samples():
    for kind in SELF_CONTAINED:
        train = {make_sample(kind, 0, "train", i)[0]["answer"] for i in range(6)}
        val = {make_sample(kind, 0, "val", i)[0]["answer"] for i in range(6)}
        assert not train & val, kind

# -----------------------------------------------------------------------------
# every kind: a valid record with an answer of the expected shape


def money(text):
    return round(float(text) * 100)


def check_receipt(answer):
    lines = answer.split("\n")
    amounts = {line.rsplit(" ", 1)[0]: money(line.rsplit(" ", 1)[1]) for line in lines
               if re.fullmatch(r".* \d+\.\d\d", line)}
    tax = next(v for k, v in amounts.items() if k.startswith("TAX "))
    assert amounts["SUBTOTAL"] + tax == amounts["TOTAL"]
    items = lines[lines.index(next(l for l in lines if re.search(r"\d+\.\d\d$", l))):]
    items = items[:next(i for i, l in enumerate(items) if l.startswith("SUBTOTAL"))]
    assert sum(money(l.rsplit(" ", 1)[1]) for l in items) == amounts["SUBTOTAL"]


def check_chart(answer):
    lines = answer.split("\n")
    assert re.fullmatch(r"(Bar|Line) chart\. x: .+\. y: .+ \(.+\)\.", lines[1])
    table = [l for l in lines if l.startswith("|")]
    assert len(table) >= 5 and table[1].startswith("| ---")
    columns = table[0].count("|")
    assert all(row.count("|") == columns for row in table)
    assert all(re.fullmatch(r"\d+", cell.strip()) for row in table[2:] for cell in row.strip("|").split("|")[1:])
    assert lines[-1].startswith("Source: ")


def check_scene(answer):
    assert answer.startswith('"')
    assert len(re.findall(r'"[^"]+"', answer)) >= 1
    assert "background" in answer


def check_line(answer):
    assert "\n" not in answer and answer.strip() == answer and len(answer.split()) >= 2


def check_line2(answer):
    assert "\n" not in answer and answer.strip() == answer and 1 <= len(answer.split()) <= 4
    assert len(answer) <= LINE2_MAX_CHARS


def check_paragraph(answer):
    assert answer.count("\n") >= 4 and "\n\n" in answer


def check_grounding(answer):
    boxes = parse_boxes(answer)
    assert len(boxes) == len(answer.split("\n")) >= 3  # one box per line, every line parses
    for label, box in boxes:
        assert label and all(0 <= v <= 999 for v in box) and box[0] < box[2] and box[1] < box[3]


CHECKS = {"receipt": check_receipt, "chart": check_chart, "scene": check_scene, "line": check_line, "line2": check_line2,
          "paragraph": check_paragraph, "grounding": check_grounding}


@pytest.mark.parametrize("kind", SELF_CONTAINED)
def test_every_kind_renders_a_valid_record(kind):
    for index in range(8):
        record, image = make_sample(kind, 0, "test", index)
        assert record["type"] == kind and record["source"] == "synth"
        assert record["prompt"].startswith("<image>\n") and record["prompt"].count("<image>") == 1
        assert 0 < len(record["answer"]) <= MAX_ANSWER_CHARS
        assert image.mode == "RGB" and 256 <= max(image.size) <= 512 and min(image.size) >= 128
        CHECKS[kind](record["answer"])


def test_line2_content_goes_beyond_the_word_pool():
    """Held-out reading needs text a language prior cannot guess: most line2 lines hold a digit or a word that is
    not in the pool, and lines are all different."""
    answers = [make_sample("line2", 0, "test", i)[0]["answer"] for i in range(200)]
    pool = set(COMMON_WORDS)
    beyond = [a for a in answers if any(w.lower() not in pool for w in a.split())]
    assert len(beyond) >= 150 and sum(any(c.isdigit() for c in a) for a in answers) >= 100
    assert len(set(answers)) >= 195
    assert any(re.fullmatch(r"[A-Z]{1,3}-\d{2,4}", w) for a in answers for w in a.split())  # codes like RX-4471


@pytest.mark.parametrize("kind", ["receipt", "chart", "scene"])
def test_long_answers_are_hundreds_of_characters(kind):
    lengths = [len(make_sample(kind, 0, "test", i)[0]["answer"]) for i in range(20)]
    assert 150 <= min(lengths) and sum(lengths) / len(lengths) >= 200 and max(lengths) <= MAX_ANSWER_CHARS

# -----------------------------------------------------------------------------
# grounding boxes sit on the drawn words


def test_grounding_boxes_match_the_ink():
    for index in range(4):
        record, image = make_sample("grounding", 0, "test", index)
        pixels = np.asarray(image).astype(int)
        background = pixels[0, 0]  # words keep a margin from the edges
        ink = np.abs(pixels - background).max(axis=2) > 60
        height, width = ink.shape
        covered = np.zeros_like(ink)
        for label, (x1, y1, x2, y2) in parse_boxes(record["answer"]):
            # back to pixels; the 0-999 scale loses under a pixel, allow 2
            x1, x2 = int(x1 * width / 999) - 2, int(np.ceil(x2 * width / 999)) + 2
            y1, y2 = int(y1 * height / 999) - 2, int(np.ceil(y2 * height / 999)) + 2
            region = ink[y1:y2, x1:x2]
            rows, cols = np.nonzero(region)
            assert len(rows), f"no ink in the box of '{label}'"
            # the ink fills the box: it reaches within a few pixels of every side
            assert rows.min() <= 4 and cols.min() <= 4, label
            assert region.shape[0] - 1 - rows.max() <= 4 and region.shape[1] - 1 - cols.max() <= 4, label
            covered[y1:y2, x1:x2] = True
        assert not (ink & ~covered).any(), "ink outside every box"

# -----------------------------------------------------------------------------
# writing datasets


def test_generate_writes_a_loadable_dataset(tmp_path):
    path = generate(str(tmp_path), 7, "train", 0, SELF_CONTAINED, 1)
    with open(path) as f:
        records = json.load(f)
    assert len(records) == 7 and len({r["id"] for r in records}) == 7
    for record in records:
        assert set(record) == {"id", "image", "prompt", "answer", "source", "type"}
        with Image.open(os.path.join(tmp_path, record["image"])) as image:
            assert image.format == "PNG"
    with pytest.raises(ValueError):
        generate(str(tmp_path), 3, "train", 0, ["receipt", "poem"], 1)


def test_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scripts.make_data", "--n=4", "--kinds=line,grounding",
                             f"--out_dir={tmp_path}", "--split=cli"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "dataset.json") as f:
        assert [r["type"] for r in json.load(f)] == ["line", "grounding"] * 2

# -----------------------------------------------------------------------------
# the committed tier-1 set


def test_tier1_set_loads():
    """As hard as real data: receipts of one shop sharing header and footer, long answers, JPEG and RGBA PNG."""
    with open(os.path.join(TIER1_DIR, "dataset.json")) as f:
        records = json.load(f)
    assert len(records) == 10
    assert Counter(r["type"] for r in records) == {"receipt": 4, "chart": 3, "scene": 3}
    for record in records:
        path = os.path.join(TIER1_DIR, record["image"])
        assert os.path.isfile(path) and os.path.getsize(path) < 120_000, record["image"]
        assert 150 <= len(record["answer"]) <= 1000 and record["prompt"].count("<image>") == 1
        with Image.open(path) as image:
            width, height = image.size
            expected = {"receipt": ("JPEG", "RGB"), "chart": ("PNG", "RGBA"), "scene": ("JPEG", "RGB")}
            assert (image.format, image.mode) == expected[record["type"]], record["id"]
            assert 400 <= width <= 1024 and 500 <= height <= 1000
    assert max(len(r["answer"]) for r in records) >= 800
    receipts = [r["answer"].split("\n") for r in records if r["type"] == "receipt"]
    assert all(lines[:4] == receipts[0][:4] and lines[-2:] == receipts[0][-2:] for lines in receipts)
    assert len({tuple(lines) for lines in receipts}) == 4


def test_tier1_set_is_what_the_generator_makes():
    with open(os.path.join(TIER1_DIR, "dataset.json")) as f:
        committed = json.load(f)
    for old, (new, _, _) in zip(committed, tier1_samples()):
        assert old["id"] == new["id"] and old["prompt"] == new["prompt"]
        # a scene's layout (and so its description) depends on the font's measurements, which another Pillow
        # or FreeType may round differently; receipt and chart text never does
        if old["type"] != "scene":
            assert old["answer"] == new["answer"], old["id"]


def test_chats_are_deterministic_text_conversations(tmp_path):
    from nanovlm.dataloader import load_conversations
    from nanovlm.synth import make_chat
    assert make_chat(0, 5) == make_chat(0, 5) and make_chat(0, 5) != make_chat(1, 5)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(make_chat(0, i)) + "\n" for i in range(50)))
    conversations = load_conversations(str(path))
    assert len(conversations) == 50 and all(c[1]["role"] == "assistant" and c[1]["content"] for c in conversations)
    committed = load_conversations(os.path.join(REPO_ROOT, "data", "chats.jsonl"))
    assert committed[:3] == [make_chat(0, i) for i in range(3)]  # data/chats.jsonl is make_data --chats=500
