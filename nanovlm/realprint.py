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
"""

import atexit
import ctypes
import functools
import gzip
import io
import os
import shutil
import subprocess
import tempfile
import threading

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
            if RASTERISERS.get(split, "pdfium") == "poppler":
                image = render_region_poppler(path, index, page, region, dpi)
            else:
                image = render_region(page, region, dpi)
        finally:
            page.close()
        if image is not None:
            return image, text
    raise RuntimeError(f"no usable text line found in {ATTEMPTS} tries in the '{split}' print documents")
