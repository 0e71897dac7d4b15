"""Reading data: a split lexicon, font families split into training and held-out, lines of 1-64 characters."""

import random
import string

import pytest
from PIL import Image

from conftest import made_up_words
from nanovlm import textlines
from nanovlm.textlines import (MAX_CHARS, font_faces, lexicon, lexicon_split, line_text, render_read,
                               render_read_fonts)


def clear_caches():
    for cached in (textlines.lexicon, textlines.installed_fonts, textlines.font_faces):
        cached.cache_clear()


@pytest.fixture
def word_list(tmp_path, monkeypatch):
    """A word list of 400 made-up words (plus entries the lexicon must drop) in place of the system's."""
    words = made_up_words()
    path = tmp_path / "words"
    path.write_text("\n".join(words + ["café", "dog's", "x-ray"]) + "\n")
    monkeypatch.setattr(textlines, "LEXICON_FILES", [str(path)])
    clear_caches()
    yield words
    clear_caches()


def test_lexicon_splits_by_a_stable_hash(word_list):
    train, val = lexicon("train"), lexicon("val")
    assert not set(train) & set(val) and sorted(train + val) == word_list  # accents, possessives, hyphens dropped
    assert 0.1 < len(val) / len(word_list) < 0.3
    assert all(lexicon_split(w) == "val" for w in val) and lexicon_split("Word") == lexicon_split("word")


def test_missing_word_list_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(textlines, "LEXICON_FILES", ["/nonexistent/words"])
    clear_caches()
    with pytest.raises(ValueError, match="wamerican"):
        lexicon("train")
    clear_caches()


def test_lines_cover_lengths_cases_digits_and_symbols(word_list):
    rng, train_words = random.Random(1), lexicon("train")
    lines = [line_text(rng, train_words) for _ in range(600)]
    lengths = [len(line) for line in lines]
    assert min(lengths) >= 1 and max(lengths) <= MAX_CHARS
    assert sum(n <= 8 for n in lengths) > 60 and sum(n >= 50 for n in lengths) > 60
    text = "".join(lines)
    assert set(string.digits) <= set(text) and set(string.ascii_uppercase) <= set(text)
    assert set(textlines.SYMBOLS) <= set(text)  # every symbol of printed text appears somewhere
    assert all(line.isascii() for line in lines)
    # no validation word is drawn in a training line (random letter strings are too short to spell one)
    val_words = set(lexicon("val"))
    assert not {w.strip(string.punctuation).lower() for line in lines for w in line.split()} & val_words


def test_training_fonts_and_held_out_fonts_never_share_a_family(monkeypatch):
    monkeypatch.setattr(textlines, "TRAIN_FAMILIES", ["DejaVu Sans"])
    monkeypatch.setattr(textlines, "HELD_OUT_FAMILIES", ["DejaVu Serif"])
    clear_caches()
    installed = textlines.installed_fonts()
    if "DejaVu Sans" not in installed or "DejaVu Serif" not in installed:
        clear_caches()
        pytest.skip("needs the DejaVu fonts (Debian fonts-dejavu-core)")
    train, held_out = font_faces(False), font_faces(True)
    assert train[0] is None and set(train[1:]) == set(installed["DejaVu Sans"])  # Pillow's own face, then files
    assert set(held_out) == set(installed["DejaVu Serif"]) and not set(train) & set(held_out)
    monkeypatch.setattr(textlines, "FONT_DIRS", [])
    clear_caches()
    with pytest.raises(ValueError, match="held-out font"):
        font_faces(True)
    clear_caches()


def test_rendering_is_deterministic_and_held_out_fonts_stay_out_of_training(word_list):
    image_a, text_a = render_read(random.Random(5), "train")
    image_b, text_b = render_read(random.Random(5), "train")
    assert text_a == text_b and image_a.tobytes() == image_b.tobytes()
    assert isinstance(image_a, Image.Image) and image_a.mode == "RGB" and image_a.height >= 8
    with pytest.raises(ValueError, match="never for training"):
        render_read_fonts(random.Random(0), "train")


def test_every_installed_font_draws_every_printable_character():
    """A label is only right if its font draws each character: no face of either side may fall back to its
    missing-glyph box (or nothing) for printable ASCII. Checks the faces installed here (all of them on a machine
    set up by scripts/setup_data.sh)."""
    from PIL import ImageDraw

    def glyph(font, char):
        image = Image.new("L", (48, 48))
        ImageDraw.Draw(image).text((4, 4), char, font=font, fill=255)
        return image.tobytes()

    clear_caches()
    faces = [face for face in font_faces(False) if face is not None]
    try:
        faces += font_faces(True)
    except ValueError:
        pass  # no held-out family installed here
    characters = [c for c in string.printable if c.isprintable() and c != " "]
    for face in faces:
        font = textlines.get_font(face, 24)
        missing = {glyph(font, char) for char in ("\ue000", "\U000f0000")}  # private use: never in a text font
        assert not [c for c in characters if glyph(font, c) in missing], face
