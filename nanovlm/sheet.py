"""
A picture of what the model reads: a PNG sheet of records, each image with the prediction under it (characters
the prediction gets wrong in red, a red caret where it leaves characters out) and the reference below that.
"""

from PIL import Image, ImageDraw, ImageFont

from nanovlm.dataloader import load_record_image
from nanovlm.metrics import wrong_characters

CELL_WIDTH, IMAGE_HEIGHT, COLUMNS, FONT_SIZE = 320, 128, 3, 15
OK, WRONG, REFERENCE = (20, 20, 20), (210, 30, 30), (90, 90, 90)


def draw_marked(draw, xy, pred, ref, font):
    """The prediction at xy, character by character, wrong ones in red; returns the x after it."""
    wrong, missing = wrong_characters(pred, ref)
    x, y = xy
    for ch, bad in zip(pred, wrong):
        draw.text((x, y), ch, font=font, fill=WRONG if bad else OK)
        x += font.getlength(ch)
    if missing:
        draw.text((x + 2, y), "^" * min(missing, 8), font=font, fill=WRONG)
    return x


def make_sheet(records, samples, path, max_items=24):
    """records and their scored samples (evaluate_records, matched by id) -> a PNG grid of up to max_items cells
    at path."""
    font = ImageFont.load_default(size=FONT_SIZE)
    by_id = {record["id"]: record for record in records}
    items = [(by_id[sample["id"]], sample) for sample in samples[:max_items]]
    cell_height = IMAGE_HEIGHT + 3 * (FONT_SIZE + 6)
    rows = -(-len(items) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * (CELL_WIDTH + 10) + 10, rows * (cell_height + 10) + 10), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (record, sample) in enumerate(items):
        x0 = 10 + (i % COLUMNS) * (CELL_WIDTH + 10)
        y0 = 10 + (i // COLUMNS) * (cell_height + 10)
        try:
            image = load_record_image(record)
            image.thumbnail((CELL_WIDTH, IMAGE_HEIGHT))
            sheet.paste(image, (x0, y0))
        except ValueError:
            draw.text((x0, y0), "(image unreadable)", font=font, fill=WRONG)
        pred, ref = one_line(sample["prediction"]), one_line(sample["reference"])
        y = y0 + IMAGE_HEIGHT + 4
        draw_marked(draw, (x0, y), pred, ref, font)
        draw.text((x0, y + FONT_SIZE + 6), ref, font=font, fill=REFERENCE)
        verdict = "exact" if sample["exact"] else f"CER {sample['cer']:.2f}"
        draw.text((x0, y + 2 * (FONT_SIZE + 6)), f"{sample['id']} | {verdict}", font=font, fill=REFERENCE)
    sheet.save(path)
    return path


def one_line(text, limit=44):
    """Newlines shown as a visible mark and long answers cut, so every cell stays one line high."""
    text = text.replace("\n", " | ")
    return text if len(text) <= limit else text[:limit - 1] + "…"
