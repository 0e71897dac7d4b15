"""
Real print: runs of consecutive words cut from text lines of typeset PDF manuals (Debian documentation packages),
rasterised at a scan-like dpi and cropped around the run with a small random margin, so that bits of the lines
above and below may show. The answer is the exact text of the run, read from the PDF's own text layer.

    image, text = render_print(random.Random(0), "val")

The train and val documents are disjoint and set in different fonts: training pages in Liberation, Roboto and
DejaVu (families that nanovlm.textlines trains on too), validation pages in Computer Modern, whose families
(CMU, Latin Modern) textlines holds out. Validation pages are also rasterised by another renderer (poppler's
pdftoppm; training pages by PDFium), so a val score measures print whose fonts, documents and rasteriser the model
has not seen. Every document was checked to embed all the fonts its text uses (no substituted base-14 fonts).

    image, lines = render_page_window(random.Random(0), "val", (640, 1024), 1024, (6, 12), 1600, 53)

cuts a window of whole text lines from the same documents instead, each line with its ink box from the glyphs'
own outlines (nanovlm.synth's page_print kind writes them as a grounding answer).
"""

import atexit
import ctypes
import functools
import gzip
import io
import os
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

PRINT_PACKAGES = ("gnuplot-doc asymptote-doc camlidl-doc gmsh-doc glpk-doc auto-multiple-choice-doc-pdf "
                  "debian-reference-en fonts-sil-charis")
CHARIS_DOCS = "/usr/share/doc/fonts-sil-charis/documentation/pdf/"
PRINT_DOCUMENTS = {
    "train": [
        "/usr/share/debian-reference/debian-reference.en.pdf",  # 261 pages, Liberation Serif/Sans/Mono
        "/usr/share/doc/auto-multiple-choice/auto-multiple-choice.en.pdf",  # 101 pages, DejaVu Serif/Sans/Mono
    ] + [CHARIS_DOCS + f"{name}.pdf.gz" for name in  # 26 pages in all, Roboto (and samples in Charis SIL)
         ("about", "design", "developer", "faq", "features", "history", "resources", "support", "versions")],
    "val": [
        "/usr/share/doc/gnuplot/gnuplot.pdf",  # 311 pages, Computer Modern (roman, typewriter, bold)
        "/usr/share/doc/asymptote/asymptote.pdf",  # 196 pages, Computer Modern
        "/usr/share/doc/camlidl/camlidl-1.04.doc.pdf",  # 26 pages, Computer Modern
        "/usr/share/doc/gmsh-doc/gmsh.pdf.gz",  # 390 pages, Computer Modern
        "/usr/share/doc/glpk-doc/glpk.pdf",  # 177 pages, Computer Modern
        "/usr/share/doc/glpk-doc/gmpl.pdf",  # 74 pages, Computer Modern
        "/usr/share/doc/glpk-doc/graphs.pdf",  # 61 pages, Computer Modern
    ],
}
RASTERISERS = {"train": "pdfium", "val": "poppler"}  # validation pages never pass through training's renderer

MAX_CHARS = 40  # longest run, in characters
DPI_RANGE = (100, 300)  # like scans and renders
MIN_LINE_WORDS = 3  # lines shorter than this (headings, page numbers, lone code tokens) are not cut from
ATTEMPTS = 200  # pages and lines to try before giving up on a split

# typographic characters written as the ASCII the text means, so the byte tokenizer sees one byte each:
# ligatures expanded, curly quotes straight, dashes and the minus sign a hyphen, the ellipsis three dots;
# U+FFFE and U+0002 are how the text layer marks a hyphen that breaks a word at the end of a line (the no-break
# space separates words like any space). Words that still hold other non-ASCII characters are never cut.
NORMALIZE = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                           "\ufb05": "st", "\ufb06": "st", "\u2018": "'", "\u2019": "'", "\u201a": "'",
                           "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2010": "-", "\u2011": "-",
                           "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-", "\u00ad": "-",
                           "\ufffe": "-", "\x02": "-", "\u2026": "..."})

# -----------------------------------------------------------------------------
# documents


def print_documents(split):
    """The document paths of a split that exist on this machine; a clear error when there are none."""
    if split not in PRINT_DOCUMENTS:
        raise ValueError(f"unknown print split '{split}', choose from {', '.join(PRINT_DOCUMENTS)}")
    paths = [path for path in PRINT_DOCUMENTS[split] if os.path.exists(path)]
    if not paths:
        raise ValueError(f"no typeset PDF documents for split '{split}': install the Debian packages "
                         f"{PRINT_PACKAGES} (scripts/setup_data.sh does)")
    return paths


OPEN_DOCUMENTS = {}  # path -> PdfDocument, or None when it cannot be read; a handful, open for the process's life


def open_document(path):
    """The open PDF, or None when it cannot be read (broken, or encrypted with a password)."""
    if path not in OPEN_DOCUMENTS:
        try:
            # read whole (a few MB): a file PDFium reads lazily would share its offset with forked workers
            with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
                data = f.read()
            OPEN_DOCUMENTS[path] = pdfium.PdfDocument(data)
        except (OSError, pdfium.PdfiumError):
            OPEN_DOCUMENTS[path] = None
    return OPEN_DOCUMENTS[path]


@atexit.register  # registered after pypdfium2's own exit hook, so it runs first: PDFium warns of open documents
def close_documents():
    for document in OPEN_DOCUMENTS.values():
        if document is not None:
            document.close()
    OPEN_DOCUMENTS.clear()


@functools.lru_cache(maxsize=8)
def all_pages(paths):
    """Every (path, page index) of the documents, so that a page is drawn uniformly over the whole split."""
    pages = []
    for path in paths:
        document = open_document(path)
        pages += [(path, index) for index in range(len(document))] if document is not None else []
    if not pages:
        raise ValueError(f"none of the print documents could be opened: {', '.join(paths)}")
    return pages

# -----------------------------------------------------------------------------
# page text: characters -> words -> lines, with boxes in PDF points (left, bottom, right, top)


def page_chars(textpage):
    """(character, loose box) for each character of the text layer, in the order the page draws them. The loose
    box spans the font's ascent to descent: the same height for every character of a font and size, so it tells
    lines and baselines apart better than the ink box does."""
    count = pdfium_c.FPDFText_CountChars(textpage)
    text = textpage.get_text_range()
    rect = pdfium_c.FS_RECTF()
    chars = []
    for index in range(count):
        ok = pdfium_c.FPDFText_GetLooseCharBox(textpage, index, ctypes.byref(rect))
        char = text[index] if len(text) == count else chr(pdfium_c.FPDFText_GetUnicode(textpage, index))
        chars.append((char, (rect.left, rect.bottom, rect.right, rect.top) if ok else None))
    return chars


def is_break(char):
    return char.isspace() or (ord(char) < 32 and char != "\x02")


def same_run(box, previous, gap):
    """Whether the character box continues the word or line that ends at box previous: on the same baseline
    (within a third of the height), not behind it, and no further than gap heights to its right."""
    height = previous[3] - previous[1]
    return (abs(box[1] - previous[1]) < 0.33 * height and box[0] > previous[0] - 0.1 * height
            and box[0] - previous[2] < gap * height)


def page_words(chars):
    """Words as (text, box, clean): characters split at spaces, line breaks and visible gaps. A word is clean when
    all its characters share one size and baseline (no sub- or superscripts, no mixed sizes)."""
    words, current = [], []
    for char, box in chars + [(" ", None)]:
        if current and (is_break(char) or box is None or not same_run(box, current[-1][1], gap=0.25)):
            words.append(make_word(current))
            current = []
        if not is_break(char) and box is not None and box[2] > box[0]:
            current.append((char, box))
    return words


def make_word(chars):
    boxes = [box for _, box in chars]
    first = boxes[0]
    height = first[3] - first[1]
    clean = all(abs((b[3] - b[1]) - height) < 0.1 * height and abs(b[1] - first[1]) < 0.08 * height for b in boxes)
    box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    return "".join(char for char, _ in chars), box, clean


def page_lines(words):
    """Lines as lists of words, in the page's drawing order (top to bottom, left to right for typeset text): a
    new line starts where the baseline changes or the text jumps back or far ahead (a column or table gap)."""
    lines = []
    for word in words:
        if lines and same_run(word[1], lines[-1][-1][1], gap=1.5):
            lines[-1].append(word)
        else:
            lines.append([word])
    return lines


def page_marks(page):
    """Boxes of what the page draws besides text (rules, lines, images, figures), top-level objects only. TeX
    draws some characters as rules (the underscore of \\_, fraction bars), which the text layer does not hold."""
    marks, bounds = [], [ctypes.c_float() for _ in range(4)]
    for index in range(pdfium_c.FPDFPage_CountObjects(page)):
        obj = pdfium_c.FPDFPage_GetObject(page, index)
        if (pdfium_c.FPDFPageObj_GetType(obj) != pdfium_c.FPDF_PAGEOBJ_TEXT
                and pdfium_c.FPDFPageObj_GetBounds(obj, *bounds)):
            marks.append(tuple(bound.value for bound in bounds))
    return marks


@functools.lru_cache(maxsize=64)
def read_page(path, index):
    """The lines and marks of one page (a few hundred small tuples; bounded, as pages are drawn at random)."""
    try:
        page = open_document(path)[index]
    except pdfium.PdfiumError:
        return [], []  # a page PDFium cannot load
    try:
        if page.get_rotation() != 0:
            return [], []  # rotated pages: text boxes and render crops would disagree
        return page_lines(page_words(page_chars(page.get_textpage()))), page_marks(page)
    finally:
        page.close()  # closes its text page too

# -----------------------------------------------------------------------------
# a run of words


def normalize(text):
    return text.translate(NORMALIZE)


def is_ascii_text(text):
    return bool(text) and all(32 <= ord(char) < 127 for char in text)


def usable(word):
    return word[2] and is_ascii_text(normalize(word[0]))


def pick_run(rng, line, max_chars):
    """A run of consecutive clean ASCII words of the line, as (start, end) word indices, of at most max_chars
    characters and as close as the line allows to a length drawn uniformly in 1..max_chars (so short and long
    runs both come up); None when the line has no usable word."""
    lengths = [len(normalize(word[0])) if usable(word) else None for word in line]
    runs = []  # (characters, start, end)
    for start in range(len(line)):
        length = -1
        for end in range(start + 1, len(line) + 1):
            if lengths[end - 1] is None or length + 1 + lengths[end - 1] > max_chars:
                break
            length += 1 + lengths[end - 1]
            runs.append((length, start, end))
    if not runs:
        return None
    target = rng.randint(1, max_chars)
    nearest = min(abs(length - target) for length, _, _ in runs)
    return rng.choice([(start, end) for length, start, end in runs if abs(length - target) == nearest])


def union(boxes):
    boxes = list(boxes)
    return min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)


def beside(box, other):
    """Whether other is at the box's height: it overlaps 30% of the box's height, or most of its own (a rule)."""
    overlap = min(box[3], other[3]) - max(box[1], other[1])
    return overlap > min(0.3 * (box[3] - box[1]), 0.9 * (other[3] - other[1]))


def has_mark(box, marks):
    """Whether something drawn that is not text lies within the box: its text would miss what the image shows."""
    height = box[3] - box[1]
    return any(m[0] < box[2] and m[2] > box[0] and m[1] > box[1] - 0.1 * height and m[3] < box[3] + 0.1 * height
               for m in marks)


def free_space(box, lines, marks):
    """How far the box may grow to the left and to the right before it touches another word or mark at its height
    (of any line of the page, so also words that the drawing order put in another line)."""
    left, right = float("inf"), float("inf")
    for other in [word[1] for line in lines for word in line] + marks:
        if beside(box, other):
            if other[2] <= box[0] + 0.01:
                left = min(left, box[0] - other[2])
            elif other[0] >= box[2] - 0.01:
                right = min(right, other[0] - box[2])
    return left, right


def crop_box(rng, box, lines, marks):
    """The run's box plus random margins, in points: 10-45% of the line height above and below (so parts of the
    neighbouring lines can show), and up to one height at the sides, but never reaching the next word."""
    height = box[3] - box[1]
    free_left, free_right = free_space(box, lines, marks)
    left = min(height * rng.uniform(0.1, 1.0), 0.7 * free_left)
    right = min(height * rng.uniform(0.1, 1.0), 0.7 * free_right)
    below, above = height * rng.uniform(0.1, 0.45), height * rng.uniform(0.1, 0.45)
    return box[0] - left, box[1] - below, box[2] + right, box[3] + above

# -----------------------------------------------------------------------------
# rendering


def render_split(split, path, index, page, region, dpi):
    """The region rasterised by the split's renderer (RASTERISERS): PDFium for training, poppler for validation."""
    if RASTERISERS.get(split, "pdfium") == "poppler":
        return render_region_poppler(path, index, page, region, dpi)
    return render_region(page, region, dpi)


def render_region(page, region, dpi):
    """Rasterise only the region (left, bottom, right, top in points) of the page: grayscale, as RGB; None when
    the region lies outside the visible page."""
    page_left, page_bottom, page_right, page_top = page.get_bbox()  # the visible box, inherited boxes resolved
    left, bottom = max(region[0], page_left), max(region[1], page_bottom)
    right, top = min(region[2], page_right), min(region[3], page_top)
    if right - left < 1 or top - bottom < 1:
        return None  # text outside the visible page
    crop = (left - page_left, bottom - page_bottom, page_right - right, page_top - top)
    bitmap = page.render(scale=dpi / 72, crop=crop, grayscale=True, draw_annots=False)
    return bitmap.to_pil().convert("RGB")


POPPLER_COPIES = {}  # path -> a plain PDF file that pdftoppm can read (compressed documents unpacked once)


def poppler_readable(path):
    if not path.endswith(".gz"):
        return path
    if path not in POPPLER_COPIES:
        with gzip.open(path) as f, tempfile.NamedTemporaryFile(suffix=".pdf", delete=False) as copy:
            shutil.copyfileobj(f, copy)
        POPPLER_COPIES[path] = copy.name
        atexit.register(os.unlink, copy.name)
    return POPPLER_COPIES[path]


def render_region_poppler(path, index, page, region, dpi):
    """The same region rasterised by poppler's pdftoppm (a subprocess; validation sets only, where speed does not
    matter), grayscale, as RGB; None when the region lies outside the visible page."""
    if shutil.which("pdftoppm") is None:
        raise ValueError("validation print is rasterised by poppler's pdftoppm: install Debian's poppler-utils "
                         "(scripts/setup_data.sh does)")
    page_left, page_bottom, page_right, page_top = page.get_bbox()
    left, bottom = max(region[0], page_left), max(region[1], page_bottom)
    right, top = min(region[2], page_right), min(region[3], page_top)
    if right - left < 1 or top - bottom < 1:
        return None
    scale = dpi / 72  # pdftoppm crops in pixels from the page's top-left corner
    crop = [round((left - page_left) * scale), round((page_top - top) * scale),
            max(1, round((right - left) * scale)), max(1, round((top - bottom) * scale))]
    command = ["pdftoppm", "-r", str(dpi), "-f", str(index + 1), "-l", str(index + 1), "-gray", "-png"]
    command += [arg for flag, value in zip(("-x", "-y", "-W", "-H"), crop) for arg in (flag, str(value))]
    result = subprocess.run(command + [poppler_readable(path)], capture_output=True, check=True)
    return Image.open(io.BytesIO(result.stdout)).convert("RGB")


# PDFium is not thread-safe, and the training loader draws samples in threads: one sample at a time goes
# through it (about 7 ms each), whichever thread asks
PDFIUM_LOCK = threading.Lock()


def render_print(rng, split, max_chars=MAX_CHARS, dpi=None):
    """
    A run of consecutive words from one text line of a real typeset page of the split, as (PIL RGB image, text).
    The page is drawn uniformly over the split's documents, then a line of at least MIN_LINE_WORDS words, then a
    run of at most max_chars characters (1 word up to max_chars, roughly uniform in length); it is rasterised at
    dpi (default: drawn from DPI_RANGE) with random margins. Deterministic given rng.
    """
    with PDFIUM_LOCK:
        return draw_print(rng, split, max_chars, dpi)


def draw_print(rng, split, max_chars, dpi):
    pages = all_pages(tuple(print_documents(split)))
    for _ in range(ATTEMPTS):
        path, index = rng.choice(pages)
        lines, marks = read_page(path, index)
        candidates = [line for line in lines if len(line) >= MIN_LINE_WORDS]
        if not candidates:
            continue  # no text, a rotated page, or only short lines
        line = rng.choice(candidates)
        run = pick_run(rng, line, max_chars)
        if run is None:
            continue
        words = line[run[0]:run[1]]
        text = " ".join(normalize(word) for word, _, _ in words)
        box = union(word_box for _, word_box, _ in words)
        if not any(char.isalnum() for char in text) or has_mark(box, marks):
            continue  # dot leaders and lone symbols; rules drawn in place of characters, underlines
        region = crop_box(rng, box, lines, marks)
        page = open_document(path)[index]
        dpi = dpi or rng.randint(*DPI_RANGE)
        try:
            image = render_split(split, path, index, page, region, dpi)
        finally:
            page.close()
        if image is not None:
            return image, text
    raise RuntimeError(f"no usable text line found in {ATTEMPTS} tries in the '{split}' print documents")

# -----------------------------------------------------------------------------
# windows of whole pages, every text line with its ink box (the page_print kind of nanovlm.synth)

LEADERS = re.compile(r"(\. ?){4}")  # a table of contents' dot leaders: how many dots would be a guess
MAX_GAP = 4  # line heights of empty space that a window never spans
BASELINE_TOLERANCE = 0.1  # of the font size: a line whose characters sit further off its baseline holds a sub- or
# superscript, whose text layer order and spelling the answer cannot show


@functools.lru_cache(maxsize=16)
def read_glyphs(path, index):
    """Every drawn character of a page as (loose box, ink box, baseline, font size): the ink box is the glyph's own
    outline box, as tight as the font's, where the loose box spans the font's ascent to descent."""
    try:
        page = open_document(path)[index]
    except pdfium.PdfiumError:
        return []
    try:
        textpage = page.get_textpage()
        rect, values = pdfium_c.FS_RECTF(), [ctypes.c_double() for _ in range(6)]
        left, right, bottom, top, x, y = values
        glyphs = []
        for i in range(pdfium_c.FPDFText_CountChars(textpage)):
            if (is_break(chr(pdfium_c.FPDFText_GetUnicode(textpage, i)))
                    or not pdfium_c.FPDFText_GetLooseCharBox(textpage, i, ctypes.byref(rect))
                    or not pdfium_c.FPDFText_GetCharBox(textpage, i, *(ctypes.byref(v) for v in (left, right, bottom,
                                                                                                  top)))
                    or not pdfium_c.FPDFText_GetCharOrigin(textpage, i, ctypes.byref(x), ctypes.byref(y))):
                continue
            glyphs.append(((rect.left, rect.bottom, rect.right, rect.top), (left.value, bottom.value, right.value,
                                                                             top.value),
                           y.value, pdfium_c.FPDFText_GetFontSize(textpage, i)))
        return glyphs
    finally:
        page.close()


@functools.lru_cache(maxsize=16)
def window_lines(path, index):
    """The page's text lines in its drawing order (reading order, for typeset text), as (text, loose box, ink box,
    readable). A line is readable when its text is ASCII once normalized, holds a letter or digit, has no dot
    leaders, sits on one baseline (no sub- or superscripts), has no rule
    drawn within it, and every character of its words was matched to a glyph (no other line's glyph among them)."""
    lines, marks = read_page(path, index)
    glyphs = read_glyphs(path, index)
    if not lines or not glyphs:
        return []
    loose = np.array([g[0] for g in glyphs])
    cx, cy = (loose[:, 0] + loose[:, 2]) / 2, (loose[:, 1] + loose[:, 3]) / 2
    found = []
    for line in lines:
        box = union(word[1] for word in line)
        text = " ".join(normalize(word[0]) for word in line)
        mine = [glyphs[i] for i in np.nonzero((cx >= box[0]) & (cx <= box[2]) & (cy >= box[1]) & (cy <= box[3]))[0]]
        sizes = [g[3] for g in mine]
        readable = (is_ascii_text(text) and any(char.isalnum() for char in text) and not has_mark(box, marks)
                    and not LEADERS.search(text)
                    and len(mine) == sum(len(word[0]) for word in line) and min(sizes) > 0.7 * max(sizes)
                    and max(g[2] for g in mine) - min(g[2] for g in mine) < BASELINE_TOLERANCE * max(sizes))
        inks = [g[1] for g in mine if g[1][2] > g[1][0] and g[1][3] > g[1][1]] or [box]
        found.append((text, box, union(inks), readable))
    return found


def overlaps(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def close_lines(lines, chosen):
    """The chosen lines plus every line their bounding box touches, until none is left out; None when one of
    them is not readable (a window shows all of a line or none of it)."""
    while True:
        if not all(lines[i][3] for i in chosen):
            return None
        region = union(lines[i][1] for i in chosen)
        touched = {i for i, line in enumerate(lines) if i not in chosen and overlaps(region, line[1])}
        if not touched:
            return chosen
        chosen = chosen | touched


def pick_window(rng, lines, max_lines, max_chars, line_markup, max_size):
    """Neighbouring lines around a random readable one: the lines below it, then (while there is room) above it,
    never across a gap of MAX_GAP line heights, as many as fit max_lines, max_chars (the answer's length,
    line_markup characters a line besides its text) and max_size (width, height in points); None when not even
    the first fits."""
    readable = [i for i, line in enumerate(lines) if line[3]]
    if not readable:
        return None
    anchor = rng.choice(readable)
    top = lines[anchor][1][3]

    def fits(chosen):
        box = union(lines[i][1] for i in chosen)
        return (len(chosen) <= max_lines and sum(len(lines[i][0]) + line_markup for i in chosen) <= max_chars
                and box[2] - box[0] <= max_size[0] and box[3] - box[1] <= max_size[1])
    chosen = close_lines(lines, {anchor})
    if chosen is None or not fits(chosen):
        return None
    below = sorted((i for i in range(len(lines)) if lines[i][1][3] <= top), key=lambda i: -lines[i][1][3])
    above = sorted((i for i in range(len(lines)) if lines[i][1][3] > top), key=lambda i: lines[i][1][3])
    height = lines[anchor][1][3] - lines[anchor][1][1]
    for candidates in (below, above):
        for i in candidates:
            if i in chosen:
                continue
            region, box = union(lines[k][1] for k in chosen), lines[i][1]
            if max(region[1] - box[3], box[1] - region[3]) > MAX_GAP * height:
                break  # past a wide empty space (a footer far below the text): a window of mostly paper
            grown = close_lines(lines, chosen | {i})
            if grown is None or not fits(grown):
                break
            chosen = grown
    return sorted(chosen)  # drawing order


def window_region(rng, lines, chosen, min_width, max_size):
    """The chosen lines' box with random margins (a fifth to one and a half line heights, at the sides at least
    enough to make min_width), each side's halved until it reaches no other line, then all of them until their
    corners do not either; none beyond max_size."""
    box = union(lines[i][1] for i in chosen)
    height = float(np.median([lines[i][1][3] - lines[i][1][1] for i in chosen]))
    others = [line[1] for i, line in enumerate(lines) if i not in chosen]
    spare = ((max_size[0] - (box[2] - box[0])) / 2, (max_size[1] - (box[3] - box[1])) / 2)

    def grow(margins):  # left, bottom, right, top
        return box[0] - margins[0], box[1] - margins[1], box[2] + margins[2], box[3] + margins[3]

    def clear(margins):
        return not any(overlaps(grow(margins), other) for other in others)
    margins = [0.0] * 4
    for side in range(4):
        margin = height * rng.uniform(0.2, 1.5)
        margin = min(max(margin, (min_width - (box[2] - box[0])) / 2) if side % 2 == 0 else margin, spare[side % 2])
        for _ in range(6):
            if clear([margin if k == side else 0.0 for k in range(4)]):
                margins[side] = margin
                break
            margin /= 2
    for _ in range(6):
        if clear(margins):
            return grow(margins)
        margins = [m / 2 for m in margins]
    return box


def in_reading_order(boxes):
    """Whether each box (x1, y1, x2, y2, y down) lies below the one before it (its centre lower) or wholly to its
    right: the next line, the next cell of a row, or the top of the next column."""
    return all((b[1] + b[3]) / 2 > (a[1] + a[3]) / 2 or b[0] >= a[2] for a, b in zip(boxes, boxes[1:]))


def render_page_window(rng, split, widths, max_height, line_range, max_chars, line_markup):
    """
    A window of a real typeset page of the split showing whole text lines only, as (PIL RGB image,
    [(text, ink box in pixels)] in reading order). A page is drawn uniformly over the split's documents, then a
    readable line, then the lines below and above it while the window stays within max_chars of answer, a number
    of lines drawn from line_range, and widths[1] x max_height pixels at 100 dpi; windows of fewer than 3 lines
    are drawn again. The dpi is drawn from DPI_RANGE, no higher than keeps the window within that size and, where it
    can, high enough that the window is at least widths[0] wide. Deterministic given rng.
    """
    with PDFIUM_LOCK:
        return draw_page_window(rng, split, widths, max_height, line_range, max_chars, line_markup)


def draw_page_window(rng, split, widths, max_height, line_range, max_chars, line_markup):
    pages = all_pages(tuple(print_documents(split)))
    max_size = (widths[1] * 72 / DPI_RANGE[0], max_height * 72 / DPI_RANGE[0])  # in points
    for _ in range(ATTEMPTS):
        path, index = rng.choice(pages)
        lines = window_lines(path, index)
        chosen = pick_window(rng, lines, rng.randint(*line_range), max_chars, line_markup, max_size) if lines else None
        if not chosen or len(chosen) < min(3, line_range[0]):
            continue  # no readable line, or too few readable ones together
        page = open_document(path)[index]
        try:
            page_box = page.get_bbox()
            region = window_region(rng, lines, chosen, widths[0] * 72 / DPI_RANGE[1], max_size)
            region = (max(region[0], page_box[0]), max(region[1], page_box[1]), min(region[2], page_box[2]),
                      min(region[3], page_box[3]))
            width, height = region[2] - region[0], region[3] - region[1]
            if width < 1 or height < 1:
                continue
            high = min(DPI_RANGE[1], widths[1] * 72 / width, max_height * 72 / height)
            low = min(max(DPI_RANGE[0], widths[0] * 72 / width), high)
            dpi = rng.randint(int(low), max(int(low), int(high)))
            image = render_split(split, path, index, page, region, dpi)
        finally:
            page.close()
        if image is None:
            continue
        sx, sy = image.width / width, image.height / height
        found = [(lines[i][0], ((lines[i][2][0] - region[0]) * sx, (region[3] - lines[i][2][3]) * sy,
                                (lines[i][2][2] - region[0]) * sx, (region[3] - lines[i][2][1]) * sy)) for i in chosen]
        boxes = [box for _, box in found]
        if in_reading_order(boxes) and not any(overlaps(a, b) for k, a in enumerate(boxes) for b in boxes[k + 1:]):
            return image, found
    raise RuntimeError(f"no window of readable lines found in {ATTEMPTS} tries in the '{split}' print documents")
