"""
Text lines that can only be read letter by letter: the training data for reading real text.

The old line generators drew a few pool words in one font, and a model trained on them learned the words and the
font, not the letters. Here every ingredient is too varied to memorise, and split so that validation shares none
of it with training:

- text: words from a large English word list (wamerican), split by a stable hash into a training and a validation
  lexicon; random letter strings in mixed case; numbers, prices, dates, codes, and the symbols of printed text;
  1 to 64 characters;
- fonts: the installed families named below, split by family into training fonts and held-out fonts (serif, sans,
  mono, condensed, light, bold, italic on both sides); a held-out family never appears in training in any style;
- rendering: sizes of 10-12 pt text scanned or rendered at about 100-300 dpi, neighbouring lines above and below
  cut by the crop, slight skew, blur, low-resolution resampling, noise, JPEG, faded contrast, tinted paper.

Every sample is a pure function of its random.Random, like the rest of nanovlm.synth (which registers the kinds).
"""

import functools
import glob
import io
import os
import random
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

LEXICON_FILES = ["/usr/share/dict/american-english", "/usr/share/dict/words"]  # Debian wamerican
FONT_DIRS = ["/usr/share/fonts", "/usr/share/texmf/fonts/opentype"]
MAX_CHARS = 64  # the longest line drawn; the model's line mode gives the CTC read-out 128 columns for it
VAL_SHARE = 5  # one word in 5 (by a stable hash) belongs to the validation lexicon

# Families by their fonts' own family names (Pillow's getname()); files of other families are never used.
# Held out: one face per kind of print, so "unseen fonts" covers serif, old-style, sans, humanist sans, mono and
# typewriter, plus the TeX faces in which most typeset manuals are set.
TRAIN_FAMILIES = [
    "DejaVu Sans", "DejaVu Sans Mono", "DejaVu Serif", "Liberation Sans", "Liberation Serif", "Liberation Mono",
    "Arimo", "Tinos", "Cousine", "Carlito", "Caladea", "Noto Sans", "Noto Serif", "Noto Sans Mono",
    "Noto Sans Display", "Noto Serif Display", "Open Sans", "Open Sans Condensed", "Roboto", "Roboto Condensed",
    "Linux Libertine O", "Linux Biolinum O", "Linux Libertine Mono O", "Inconsolata", "Hack", "Fira Code",
    "Gentium Plus", "Gentium Book Plus", "Charis SIL", "STIX", "STIXGeneral", "Cantarell", "Accanthis ADF Std",
    "Accanthis ADF Std No2", "Berenis ADF Pro", "Universalis ADF Std", "Romande ADF Std", "Tribun ADF Std",
    "Verana", "Verana Sans", "Verana Sans Demi", "Mekanus ADF Std", "Cabin", "Quattrocento", "JetBrains Mono",
    "Old Standard TT", "Comfortaa", "Andika", "League Spartan", "Yanone Kaffeesatz", "Averia Serif GWF",
]
HELD_OUT_FAMILIES = [
    "Lato", "EB Garamond", "Go", "Go Medium", "Go Mono", "Baskervald ADF Std", "Gillius ADF", "Gillius ADF No2",
    "Courier Prime", "Courier Prime Code", "Tuffy", "CMU Serif", "CMU Sans Serif", "CMU Typewriter Text",
    "CMU Bright", "Latin Modern Roman", "Latin Modern Sans", "Latin Modern Mono",
]

SYMBOLS = "()[]{}<>,.;:\"'/-_=$%&#@*+~!?"
WORD_PUNCTUATION = [",", ".", ";", ":", "!", "?", ")", "\"", "'"]
UPPER, LOWER, DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz", "0123456789"

# -----------------------------------------------------------------------------
# lexicon


def lexicon_split(word):
    """'train' or 'val' for a word, by a hash that is the same on every machine and run."""
    return "val" if zlib.crc32(word.lower().encode()) % VAL_SHARE == 0 else "train"


@functools.lru_cache(maxsize=None)
def lexicon(split):
    """The split's words: plain ASCII letters only (no possessives, no accents), lower and upper case as listed."""
    path = next((p for p in LEXICON_FILES if os.path.exists(p)), None)
    if path is None:
        raise ValueError(f"no word list at {' or '.join(LEXICON_FILES)}: install Debian's wamerican "
                         "(bash scripts/lines.sh does)")
    with open(path, encoding="utf-8", errors="replace") as f:
        words = sorted({w.strip() for w in f if w.strip().isascii() and w.strip().isalpha()})
    return [w for w in words if lexicon_split(w) == split]

# -----------------------------------------------------------------------------
# fonts


@functools.lru_cache(maxsize=None)
def installed_fonts():
    """{family: [font files]} of every TrueType/OpenType file under FONT_DIRS, by the font's own family name."""
    families = {}
    for directory in FONT_DIRS:
        for path in sorted(glob.glob(os.path.join(directory, "**", "*.[ot]tf"), recursive=True)):
            try:
                family = ImageFont.truetype(path, 12).getname()[0]
            except OSError:  # a broken or unsupported file is not a font we can draw with
                continue
            families.setdefault(family, []).append(path)
    return families


@functools.lru_cache(maxsize=None)
def font_faces(held_out):
    """Font files of the training families (held_out=False, plus Pillow's bundled face, None) or of the held-out
    families, as installed here."""
    installed = installed_fonts()
    names = HELD_OUT_FAMILIES if held_out else TRAIN_FAMILIES
    faces = [path for name in names for path in installed.get(name, [])]
    faces = faces if held_out else [None] + faces
    if held_out and not faces:
        raise ValueError("none of the held-out font families is installed: run bash scripts/lines.sh (it installs "
                         "them with apt-get) or install the packages in scripts/setup_data.sh")
    return faces


@functools.lru_cache(maxsize=4096)
def get_font(face, size):
    return ImageFont.load_default(size=size) if face is None else ImageFont.truetype(face, size)

# -----------------------------------------------------------------------------
# text


def cased(rng, word):
    r = rng.random()
    return word.lower() if r < 0.6 else word.capitalize() if r < 0.85 else word.upper()


def random_letters(rng):
    """A string of 1-10 random letters: nothing to remember, every letter must be seen."""
    n = rng.randint(1, 10)
    style = rng.random()
    if style < 0.5:
        return "".join(rng.choice(LOWER) for _ in range(n))
    if style < 0.7:
        return rng.choice(UPPER) + "".join(rng.choice(LOWER) for _ in range(n - 1))
    if style < 0.85:
        return "".join(rng.choice(UPPER) for _ in range(n))
    return "".join(rng.choice(UPPER + LOWER) for _ in range(n))


def number_like(rng):
    """Numbers as printed text has them: integers, decimals, prices, percentages, dates, times, codes, refs."""
    d = lambda n: "".join(rng.choice(DIGITS) for _ in range(n))  # noqa: E731
    return rng.choice([
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 6))),
        lambda: f"{rng.randint(0, 999)}.{d(rng.randint(1, 3))}",
        lambda: f"${rng.randint(0, 9999):,}.{d(2)}",
        lambda: f"{rng.randint(0, 100)}%",
        lambda: f"{rng.randint(1900, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{d(rng.choice([2, 4]))}",
        lambda: f"{rng.randint(0, 23):02d}:{d(2)}",
        lambda: "".join(rng.choice(UPPER) for _ in range(rng.randint(1, 3))) + "-" + d(rng.randint(2, 5)),
        lambda: f"({d(3)}) {d(3)}-{d(4)}",
        lambda: f"[{rng.randint(1, 99)}]",
        lambda: f"{rng.randint(1, 20)}.{rng.randint(1, 20)}",
        lambda: "#" + d(rng.randint(1, 5)),
        lambda: f"{rng.randint(1, 99)}{rng.choice(['st', 'nd', 'rd', 'th', 'kg', 'mm', 'px', 'pt'])}",
    ])()


def symbolic(rng, words):
    """Tokens built around the symbols of printed text: code, paths, mail addresses, maths, markup."""
    w = lambda: rng.choice(words).lower()  # noqa: E731
    return rng.choice([
        lambda: f"{w()}_{w()}",
        lambda: f"{w()}({w()})",
        lambda: f"{w()}[{rng.randint(0, 99)}]",
        lambda: "{" + w() + "}",
        lambda: f"<{w()}>",
        lambda: f"{w()}@{w()}.{rng.choice(['com', 'org', 'net', 'edu'])}",
        lambda: f"~/{w()}/{w()}.{rng.choice(['txt', 'py', 'c', 'pdf'])}",
        lambda: f"{rng.choice(LOWER)} {rng.choice('=+-*/<>')} {rng.randint(0, 99)}",
        lambda: f"{w()}={rng.randint(0, 999)}",
        lambda: f"{w()} & {w()}",
        lambda: "".join(rng.choice(SYMBOLS) for _ in range(rng.randint(1, 4))),
        lambda: f"*{w()}*",
        lambda: f"\"{w()}\"",
        lambda: f"'{w()}'",
    ])()


def text_item(rng, words):
    """One space-separated item of a line: mostly words, then random letters, numbers and symbolic tokens."""
    r = rng.random()
    if r < 0.5:
        word = cased(rng, rng.choice(words))
        if rng.random() < 0.2:
            word += rng.choice(WORD_PUNCTUATION)
        elif rng.random() < 0.05:
            word = "(" + word + ")"
        return word
    if r < 0.7:
        return random_letters(rng)
    if r < 0.87:
        return number_like(rng)
    return symbolic(rng, words)


def line_text(rng, words, max_chars=MAX_CHARS):
    """A line of 1 to max_chars characters: a target length drawn first (short words, phrases and full lines
    alike), then items until it is reached. An item that would overrun ends the line (cut when it is the first)."""
    target = rng.choice([rng.randint(1, 8), rng.randint(8, 30), rng.randint(30, max_chars)])
    text = text_item(rng, words)
    while len(text) < target:
        item = text_item(rng, words)
        if len(text) + 1 + len(item) > max_chars:
            break
        text += " " + item
    return text[:max_chars]

# -----------------------------------------------------------------------------
# rendering


def draw_band(rng, face, size, lines, ink, paper, current):
    """The lines stacked at one line spacing on paper; returns the image and the ink box of lines[current]."""
    font = get_font(face, size)
    spacing = round(size * rng.uniform(1.1, 1.6))
    width = max(int(font.getlength(line)) for line in lines) + 2 * size
    image = Image.new("RGB", (width, spacing * (len(lines) + 1)), paper)
    draw = ImageDraw.Draw(image)
    box = None
    for i, line in enumerate(lines):
        xy = (size, spacing // 2 + i * spacing)
        draw.text(xy, line, font=font, fill=ink)
        if i == current:
            box = draw.textbbox(xy, line, font=font)
    return image, box


def degrade(rng, image, size):
    """What scanning, rendering and compression do to a line: resampling at a lower resolution, blur, noise,
    faded contrast, JPEG. Each is applied with some probability, so clean renders stay in the mix."""
    if rng.random() < 0.4 and size > 14:  # a coarser scan or render (never below 12 px text), brought back to size
        factor = rng.uniform(max(0.35, 12 / size), 0.9)
        small = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                             rng.choice([Image.Resampling.BILINEAR, Image.Resampling.BOX, Image.Resampling.NEAREST]))
        image = small.resize(image.size, Image.Resampling.BILINEAR)
    if rng.random() < 0.35:  # defocus, scaled to the glyphs: a radius of size / 25 still leaves strokes apart
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, max(0.3, size / 25))))
    pixels = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.3:  # faded print: pull ink and paper towards each other
        mid = pixels.mean()
        pixels = mid + (pixels - mid) * rng.uniform(0.6, 0.9)
    if rng.random() < 0.4:
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(2, 10), pixels.shape[:2])
        pixels = pixels + noise[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.4:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(40 if size > 16 else 70, 92))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def render_text_line(rng, text, faces, words):
    """One line of text as a crop from a printed page: the line between parts of its neighbours, skewed slightly,
    degraded; the crop's margins vary from tight to generous, as a line finder's boxes do."""
    face = rng.choice(faces)
    size = round(np.exp(rng.uniform(np.log(11), np.log(56))))  # 10-12 pt at ~70-330 dpi
    above = [line_text(rng, words) for _ in range(rng.randint(0, 1))]
    lines = above + [text] + [line_text(rng, words) for _ in range(rng.randint(0, 1))]
    light = rng.random() < 0.95
    paper = tuple(rng.randint(215, 255) for _ in range(3)) if light else tuple(rng.randint(0, 60) for _ in range(3))
    ink = tuple(rng.randint(0, 80) for _ in range(3)) if light else tuple(rng.randint(200, 255) for _ in range(3))
    image, (x1, y1, x2, y2) = draw_band(rng, face, size, lines, ink, paper, len(above))
    if rng.random() < 0.5:  # a slight skew, about the line's centre, so the crop below still frames it
        image = image.rotate(rng.uniform(-1.5, 1.5), Image.Resampling.BICUBIC, center=((x1 + x2) / 2, (y1 + y2) / 2),
                             fillcolor=paper)
    h = y2 - y1
    crop = (x1 - rng.uniform(0.05, 1.0) * h, y1 - rng.uniform(0.05, 0.4) * h,
            x2 + rng.uniform(0.05, 1.0) * h, y2 + rng.uniform(0.05, 0.4) * h)
    image = image.crop(tuple(round(c) for c in crop))
    return degrade(rng, image, size)


def render_read(rng, split="train"):
    """A line of the split's lexicon (plus letters, numbers, symbols) in a training font."""
    words = lexicon(split)
    text = line_text(rng, words)
    return render_text_line(rng, text, font_faces(False), words), text


def render_read_fonts(rng, split="val"):
    """The same kind of line in a held-out font: validation only, with the validation lexicon."""
    if split == "train":
        raise ValueError("read_fonts draws in the held-out fonts: it is for validation sets, never for training")
    words = lexicon(split)
    text = line_text(rng, words)
    return render_text_line(rng, text, font_faces(True), words), text
