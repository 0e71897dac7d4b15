"""Page OCR (nanovlm/pageocr.py): both paths on a tiny random page model with a detection head and a tiny line
reader, the scores of a page set against hand values, bad input (an empty page, boxes past the image, malformed
answers), and the commands: ocr.py's page reading (--json, --boxes_out) and vision_sample's page scoring."""

import json
import os
import random
import shutil

import pytest
import torch
from PIL import Image, ImageDraw

from conftest import tiny_vlm
from nanovlm import pageocr
from nanovlm.checkpoint import read_meta, save_checkpoint
from nanovlm.detection import DetHead, DetHeadConfig
from nanovlm.engine import Engine
from nanovlm.pageocr import (clip_box, crop_line, grounding_text, lines_from_answer, load_reader, page_mode_of,
                             page_score, read_page, record_page_mode, score_pages, summarize_pages)
from nanovlm.vlm import model_meta
from test_scripts import run

GROUNDING = "<image>\n<|grounding|>OCR this image."
HEAD = DetHeadConfig(n_queries=3, n_layers=1, n_heads=2, dim=16, vision_dim=32, text_dim=32)
PAGE = ("<|ref|>hello world<|/ref|><|det|>[[100, 100, 600, 200]]<|/det|>\n"
        "<|ref|>second line<|/ref|><|det|>[[100, 300, 500, 400]]<|/det|>")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """checkpoints/pages (a page model with a detection head, trained on the grounding prompt), checkpoints/lines
    (a line reader) and a two-page set: one page with two lines, one blank."""
    base = tmp_path_factory.mktemp("pages")
    model = tiny_vlm(tokenizer)
    torch.manual_seed(1)
    model.det_head = DetHead(HEAD)
    tokenizer.save(str(base / "pages" / "tokenizer"))
    save_checkpoint(str(base / "pages"), 2, model.state_dict(),
                    dict(model_meta(model), image_mode="resize:128", tokenizer_dir="tokenizer",
                         prompts={GROUNDING: 5}))
    reader = tiny_vlm(tokenizer, seed=3, sequence_len=16)
    tokenizer.save(str(base / "lines" / "tokenizer"))
    save_checkpoint(str(base / "lines"), 1, reader.state_dict(),
                    dict(model_meta(reader), image_mode="line:256:64", tokenizer_dir="tokenizer",
                         prompts={"<image>\nFree OCR.": 9}))
    os.makedirs(base / "data" / "images")
    page = Image.new("RGB", (200, 120), "white")
    ImageDraw.Draw(page).text((22, 14), "hello world", fill="black")
    page.save(base / "data" / "images" / "page.png")
    Image.new("RGB", (200, 120), "white").save(base / "data" / "images" / "blank.png")
    records = [dict(id="page", image="images/page.png", prompt=GROUNDING, answer=PAGE),
               dict(id="blank", image="images/blank.png", prompt=GROUNDING, answer="")]
    with open(base / "data" / "dataset.json", "w") as f:
        json.dump(records, f)
    return base


@pytest.fixture
def loaded(base, one_thread):
    return load_reader(str(base / "pages"), "cpu"), load_reader(str(base / "lines"), "cpu")


def picture(base, name="page"):
    return Image.open(base / "data" / "images" / f"{name}.png").convert("RGB")

# -----------------------------------------------------------------------------
# parsing and bad input


def test_a_grounding_answer_gives_lines_in_pixels_and_0_999():
    lines = lines_from_answer(PAGE, 200, 120)
    assert lines == [{"text": "hello world", "box": [20, 12, 120, 24], "box_999": [100, 100, 600, 200]},
                     {"text": "second line", "box": [20, 36, 100, 48], "box_999": [100, 300, 500, 400]}]
    assert lines_from_answer(grounding_text(lines), 200, 120) == lines  # the prediction format reads back


def test_a_box_outside_the_image_is_clipped():
    answer = "<|ref|>wide<|/ref|><|det|>[[-50, 900, 1400, 1200]]<|/det|><|ref|>swapped<|/ref|><|det|>[[600, 50, 200, 10]]<|/det|>"
    lines = lines_from_answer(answer, 1000, 500)
    assert [line["box_999"] for line in lines] == [[0, 900, 999, 999], [200, 10, 600, 50]]
    assert lines[0]["box"] == [0, 450, 1000, 500]
    assert clip_box([1200, 1300, 1500, 1600]) == [999, 999, 999, 999]
    page = Image.new("RGB", (100, 40))
    assert crop_line(page, [100, 40, 100, 40]).size[0] >= 1  # a box with no area past the edge still crops


def test_a_malformed_answer_is_parsed_as_far_as_it_goes_and_never_raises():
    cut = PAGE + "\n<|ref|>third<|/ref|><|det|>[[100, 5"
    assert [line["text"] for line in lines_from_answer(cut, 200, 120)] == ["hello world", "second line"]
    garbled = "<|ref|>a<|/ref|><|det|>[[1, 2, 3]]<|/det|><|det|>[[10, 20, 30, 40]]<|/det|> junk <|ref|>b<|/ref|>"
    assert lines_from_answer(garbled, 999, 999) == [{"text": "", "box": [10, 20, 30, 40], "box_999": [10, 20, 30, 40]}]
    rng = random.Random(0)
    pieces = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "[[", "]]", "[", "]", ",", " 12", "999", "-3", "x", "\n"]
    for _ in range(500):
        lines_from_answer("".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))), 64, 64)


def test_scores_of_a_page_against_hand_values():
    lines = [{"text": "hello world", "box_999": [100, 100, 600, 200]},  # exact
             {"text": "secund line", "box_999": [100, 300, 400, 400]},  # IoU 300/400 = 0.75, one character wrong
             {"text": "", "box_999": [0, 900, 50, 999]}]  # an extra box: no reference line, no det_rate change
    score = page_score(lines, PAGE)
    assert score["det_rate"] == 1.0 and score["iou"] == pytest.approx((1 + 0.75) / 2)
    # "hello world\nsecund line\n" against "hello world\nsecond line": one substitution, one insertion, of 23
    assert score["cer"] == pytest.approx(2 / 23) and (score["lines"], score["ref_lines"]) == (3, 2)
    assert page_score(lines[1:2], PAGE)["det_rate"] == 0.5
    assert page_score([dict(lines[1], box_999=[600, 600, 900, 700])], PAGE)["iou"] == 0.0  # no match at 0.5


def test_a_page_with_no_text_answers_nothing_and_scores_as_such():
    assert lines_from_answer("", 100, 100) == [] and grounding_text([]) == ""
    empty = page_score([], "")
    assert empty == {"cer": 0.0, "lines": 0, "ref_lines": 0}  # no det_rate / iou: nothing to find
    assert page_score([{"text": "ghost", "box_999": [1, 1, 9, 9]}], "")["cer"] == 1.0
    summary = summarize_pages([dict(empty, seconds=1.0), dict(page_score([], PAGE), seconds=3.0)], "grounding")
    assert summary["det_rate"] == 0.0 and summary["cer"] == 0.5 and summary["seconds_per_page"] == 2.0

# -----------------------------------------------------------------------------
# both paths on tiny checkpoints


def test_the_grounding_path_returns_parsed_lines(loaded, base):
    page, _ = loaded
    assert page["prompt"] == GROUNDING and page_mode_of(page["meta"]) == "grounding"
    lines = read_page(page, picture(base), "grounding")
    answer = pageocr.read_grounding(page, picture(base))[0]
    assert lines == lines_from_answer(answer, 200, 120)  # a random model: whatever it says, parsed, no error


def test_the_head_path_reads_every_box_s_crop_in_one_batch(loaded, base, monkeypatch):
    page, reader = loaded
    calls = []
    generate_many = Engine.generate_many

    def counted(self, prompts, **kwargs):
        calls.append((self is reader["engine"], len(prompts)))
        return generate_many(self, prompts, **kwargs)
    monkeypatch.setattr(Engine, "generate_many", counted)
    lines = read_page(page, picture(base), "head", reader, threshold=0.0)  # every query's box
    assert calls == [(True, HEAD.n_queries)]
    assert len(lines) == HEAD.n_queries
    for line in lines:
        x1, y1, x2, y2 = line["box"]
        assert 0 <= x1 <= x2 <= 200 and 0 <= y1 <= y2 <= 120 and "\n" not in line["text"]
    assert read_page(page, picture(base), "head", reader, threshold=1.0) == []  # no box: nothing read
    with pytest.raises(ValueError, match="line reader"):
        read_page(page, picture(base), "head")


def test_auto_follows_the_measured_better_path(base, tmp_path):
    assert page_mode_of({}, "auto") == "grounding" and page_mode_of({"page_mode": "head"}, "") == "head"
    assert page_mode_of({"page_mode": "head"}, "grounding") == "grounding"
    with pytest.raises(ValueError):
        page_mode_of({}, "both")
    directory = tmp_path / "run"
    save_checkpoint(str(directory), 4, {"w": torch.zeros(1)}, {"image_mode": "resize:128"})
    summaries = {"grounding": dict(n=2, det_rate=0.9, iou=0.8, cer=0.30, seconds_per_page=3.0),
                 "head": dict(n=2, det_rate=0.8, iou=0.7, cer=0.10, seconds_per_page=1.0)}
    assert record_page_mode(str(directory), summaries)[0] == "head"
    meta = read_meta(str(directory / "meta_000004.json"))
    assert meta["page_mode"] == "head" and meta["page_modes_measured"]["grounding"]["cer"] == 0.30


def test_score_pages_writes_grounding_predictions(loaded, base):
    page, reader = loaded
    records = json.load(open(base / "data" / "dataset.json"))
    samples = score_pages(page, records, [picture(base), None], "head", reader, threshold=0.0)
    assert lines_from_answer(samples[0]["prediction"], 200, 120)[0]["box_999"]  # the page in grounding format
    assert samples[1]["prediction"] == "" and samples[1]["cer"] == 0.0  # an unreadable page: nothing read
    assert samples[0]["det_rate"] is not None and samples[0]["seconds"] > 0

# -----------------------------------------------------------------------------
# the commands


def test_ocr_reads_a_page_by_the_head_writes_json_and_draws_boxes(base, tmp_path):
    json_path, boxes = tmp_path / "lines.json", tmp_path / "boxes.png"
    image = str(base / "data" / "images" / "page.png")
    out = run(base, "scripts.ocr", f"--image={image}", "--model_tag=pages", "--page_mode=head",
              "--det_threshold=0.0", f"--json={json_path}", f"--boxes_out={boxes}")
    assert out.returncode == 0, out.stderr
    assert "page mode head, lines read by lines" in out.stdout
    found = json.load(open(json_path))[image]
    assert len(found) == HEAD.n_queries and set(found[0]) == {"text", "box", "box_999"}
    assert Image.open(boxes).size == (200, 120)


def test_ocr_reads_a_page_model_s_pages_by_default(base, tmp_path):
    json_path = tmp_path / "lines.json"
    image = str(base / "data" / "images" / "blank.png")
    out = run(base, "scripts.ocr", f"--image={image}", "--model_tag=pages", "--max_new_tokens=8", f"--json={json_path}")
    assert out.returncode == 0, out.stderr
    assert "page mode grounding" in out.stdout and isinstance(json.load(open(json_path))[image], list)
    missing = run(base, "scripts.ocr", f"--image={image}", "--model_tag=pages", "--page_mode=head",
                  "--reader_tag=nothing")
    assert missing.returncode != 0 and "error:" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("mode", ["grounding", "head"])
def test_vision_sample_scores_a_page_set(base, tmp_path, mode):
    json_path = tmp_path / "eval.json"
    out = run(base, "scripts.vision_sample", "--model_tag=pages", f"--data={base / 'data' / 'dataset.json'}",
              f"--page_mode={mode}", "--det_threshold=0.0", "--max_new_tokens=8", f"--json={json_path}")
    assert out.returncode == 0, out.stderr
    summary = json.load(open(json_path))
    assert summary["page_mode"] == mode and summary["n"] == 2
    assert {"det_rate", "iou", "cer", "seconds_per_page"} <= set(summary)
    assert summary["samples"][1]["reference"] == "" and "det_rate" not in summary["samples"][1]
    for s in summary["samples"]:
        assert lines_from_answer(s["prediction"], 200, 120) is not None


def test_bench_pages_tables_ours_and_tesseract_and_records_the_better_path(base, tmp_path):
    shutil.copytree(base / "pages", tmp_path / "pages")
    ours = []
    for mode, cer in [("grounding", 0.4), ("head", 0.2)]:
        ours.append(str(tmp_path / f"{mode}.json"))
        with open(ours[-1], "w") as f:
            json.dump(dict(page_mode=mode, n=2, det_rate=0.5, iou=0.7, cer=cer, seconds_per_page=1.0), f)
    out = run(tmp_path, "scripts.bench_pages", f"--data={base / 'data' / 'dataset.json'}", "--model_tag=pages",
              f"--ours={','.join(ours)}", f"--json={tmp_path / 'bench.json'}")
    assert out.returncode == 0, out.stderr
    assert "| ours: detection head + line reader | 0.500 | 0.700 | 0.200 | 1.00 | 2 |" in out.stdout
    assert read_meta(str(tmp_path / "pages" / "meta_000002.json"))["page_mode"] == "head"
    readers = json.load(open(tmp_path / "bench.json"))["readers"]
    if shutil.which("tesseract"):  # the blank page has no reference lines: det_rate over the other one only
        assert readers["tesseract"]["n"] == 2 and readers["tesseract"]["cer"] is not None
