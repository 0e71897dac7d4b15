"""Real print: words and lines read from a PDF's text layer, runs cut from them, the split's documents. The PDF is
written here by hand (a few lines of PDF syntax), so no Debian manual is needed."""

import gzip
import json
import os
import random
import shutil

import pytest

from conftest import write_pdf as write_pdf_content
from nanovlm import realprint
from scripts.make_data import generate

LINES = [(72, 700, "The quick brown fox jumps"), (72, 686, "over the lazy dog again"),
         (72, 672, "Pack my box with five dozen")]
# "use my_name here": the underscore is a rule drawn between two strings, as TeX draws \_ (no character for it)
RULE_LINE = [(72, 658, "use my"), (122.4, 658, "name here")]
RULE = (115.2, 656.5, 7.2, 0.6)
COURIER_ADVANCE = 7.2  # Courier's advance is 600/1000 em: 7.2 pt at 12 pt


def write_pdf(path, lines, rules=()):
    """A one-page letter-size PDF showing each (x, y, text) in 12 pt Courier, and each (x, y, w, h) rule."""
    content = "".join(f"BT /F1 12 Tf {x} {y} Td ({text}) Tj ET\n" for x, y, text in lines)
    content += "".join(f"{x} {y} {w} {h} re f\n" for x, y, w, h in rules)
    return write_pdf_content(path, content)


@pytest.fixture
def documents(tmp_path, monkeypatch):
    """One small PDF as the only document of both splits, both rasterised by PDFium (poppler: its own test)."""
    path = write_pdf(tmp_path / "page.pdf", LINES + RULE_LINE, [RULE])
    monkeypatch.setattr(realprint, "PRINT_DOCUMENTS", {"train": [path], "val": [path]})
    monkeypatch.setattr(realprint, "RASTERISERS", {"train": "pdfium", "val": "pdfium"})
    return path


def is_run_of(text, line):
    return f" {text} " in f" {line} "


def test_words_and_lines_in_reading_order(documents):
    lines, marks = realprint.read_page(documents, 0)
    assert [" ".join(word for word, _, _ in line) for line in lines] == [text for _, _, text in LINES] + [
        "use my name here"]
    for line, (x, y, text) in zip(lines, LINES):
        lefts = [box[0] for _, box, _ in line]
        assert lefts == sorted(lefts) and abs(lefts[0] - x) < 1  # left to right, from the line's start
        first = line[0][1]
        assert abs((first[2] - first[0]) - COURIER_ADVANCE * len(line[0][0])) < 1  # a word's box spans its letters
        assert first[1] < y < first[3]  # the box holds the baseline
        assert all(clean for _, _, clean in line)
    bottoms = [line[0][1][1] for line in lines]
    assert bottoms == sorted(bottoms, reverse=True)  # top to bottom
    assert any(abs(mark[0] - RULE[0]) < 1 and abs(mark[2] - RULE[0] - RULE[2]) < 1 for mark in marks)


def test_render_print_returns_a_run_and_its_image(documents):
    lines = [text for _, _, text in LINES] + ["use my name here"]
    texts = set()
    for seed in range(30):
        image, text = realprint.render_print(random.Random(seed), "train", max_chars=20)
        assert image.mode == "RGB" and image.width > image.height > 10
        assert len(text) <= 20 and any(is_run_of(text, line) for line in lines), text
        assert "my name" not in text  # the drawn underscore has no character: such runs are never cut
        texts.add(text)
    assert len(texts) > 10 and any(" " not in text for text in texts) and any(" " in text for text in texts)


def test_image_size_follows_the_dpi(documents):
    image_100, text_100 = realprint.render_print(random.Random(3), "val", dpi=100)
    image_200, text_200 = realprint.render_print(random.Random(3), "val", dpi=200)
    assert text_100 == text_200
    assert abs(image_200.width - 2 * image_100.width) <= 2 and abs(image_200.height - 2 * image_100.height) <= 2
    points = len(text_100) * COURIER_ADVANCE  # the run's width; margins add at most a line height at each side
    assert points * 100 / 72 - 1 < image_100.width < (points + 30) * 100 / 72


def test_validation_pages_go_through_another_rasteriser(documents, monkeypatch):
    """The val split's default rasteriser is poppler's pdftoppm: the same run and crop as PDFium's, drawn by other
    code; without pdftoppm it is one clear error."""
    assert realprint.RASTERISERS is not None and "poppler" not in realprint.RASTERISERS.values()  # the fixture's
    pdfium_image, pdfium_text = realprint.render_print(random.Random(4), "val", dpi=150)
    monkeypatch.setattr(realprint, "RASTERISERS", {"train": "pdfium", "val": "poppler"})
    if shutil.which("pdftoppm"):
        image, text = realprint.render_print(random.Random(4), "val", dpi=150)
        assert text == pdfium_text and image.mode == "RGB"
        assert abs(image.width - pdfium_image.width) <= 2 and abs(image.height - pdfium_image.height) <= 2
    monkeypatch.setattr(realprint.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="poppler-utils"):
        realprint.render_print(random.Random(4), "val", dpi=150)


def test_same_seed_same_sample(documents):
    image_a, text_a = realprint.render_print(random.Random(7), "train")
    image_b, text_b = realprint.render_print(random.Random(7), "train")
    assert text_a == text_b and image_a.size == image_b.size and image_a.tobytes() == image_b.tobytes()


def test_compressed_broken_and_blank_documents(tmp_path, monkeypatch):
    plain = write_pdf(tmp_path / "page.pdf", LINES)
    with open(plain, "rb") as f, gzip.open(tmp_path / "page.pdf.gz", "wb") as out:
        out.write(f.read())
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nnot a pdf at all")
    assert realprint.open_document(str(broken)) is None
    blank = write_pdf(tmp_path / "blank.pdf", [])  # a page without text
    monkeypatch.setattr(realprint, "PRINT_DOCUMENTS", {"train": [str(broken), blank, str(tmp_path / "page.pdf.gz")]})
    _, text = realprint.render_print(random.Random(0), "train")
    assert any(is_run_of(text, line) for _, _, line in LINES)
    monkeypatch.setattr(realprint, "PRINT_DOCUMENTS", {"train": [str(broken)]})
    with pytest.raises(ValueError, match="could be opened"):
        realprint.render_print(random.Random(0), "train")


def test_no_documents_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(realprint, "PRINT_DOCUMENTS", {"train": [str(tmp_path / "missing.pdf")], "val": []})
    for split in ("train", "val"):
        with pytest.raises(ValueError, match="install the Debian packages gnuplot-doc"):
            realprint.render_print(random.Random(0), split)
    with pytest.raises(ValueError, match="unknown print split"):
        realprint.render_print(random.Random(0), "test")


def test_normalize():
    assert realprint.normalize("\ufb01nd \u201cit\u201d \u2013 don\u2019t\u2026 \u2212x e\ufffe") == \
        "find \"it\" - don't... -x e-"
    assert not realprint.is_ascii_text(realprint.normalize("caf\u00e9")) and not realprint.is_ascii_text("")


def test_make_data_writes_print_records(documents, tmp_path):
    path = generate(str(tmp_path / "out"), 3, "val", 777, ["print"], 1)
    records = json.load(open(path))
    assert [r["id"] for r in records] == ["val_000000_print", "val_000001_print", "val_000002_print"]
    for record in records:
        assert record["prompt"] == "<image>\nFree OCR." and record["source"] == record["type"] == "print"
        assert os.path.exists(os.path.join(os.path.dirname(path), record["image"])) and record["answer"]


def test_threads_draw_the_same_samples_as_one_thread(documents):
    """The training loader draws in threads; PDFium is not thread-safe, so samples go through it one at a time and
    come out as a single thread draws them."""
    from concurrent.futures import ThreadPoolExecutor
    draw = lambda seed: realprint.render_print(random.Random(seed), "train")  # noqa: E731
    alone = [draw(seed) for seed in range(12)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(draw, range(12)))
    assert [(t, i.tobytes()) for i, t in together] == [(t, i.tobytes()) for i, t in alone]
