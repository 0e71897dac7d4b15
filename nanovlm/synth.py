"""
Synthetic OCR samples drawn with Pillow from a seed: receipts, charts, text scenes, document lines and
paragraphs, word grounding, `line2` text lines whose content goes beyond any word pool (numbers, prices,
dates, times, codes, made-up names), and `page` windows of documents whose answers ground every text line. Nothing
is downloaded; the text comes from the small pools below or (pages) from textlines' split word list. The kinds
that teach reading real text live in their own modules: `read` and `read_fonts` (nanovlm.textlines: a large word
list, many installed fonts, scan-like degradations), `print` and `page_print` (nanovlm.realprint: word runs and
page windows from typeset PDFs).

Every sample is a pure function of (seed, split, index): make_sample(kind, seed, split, index) -> (record, image).
scripts/make_data.py writes such samples to disk; the dataloader can also draw them on the fly ("synth:" data).
"""

import functools
import glob
import math
import random

from PIL import Image, ImageDraw

from nanovlm.textlines import (UPPER, cased, degrade, font_faces, get_font,  # get_font: one font cache
                               installed_fonts, lexicon, number_like, render_read, render_read_fonts, symbolic,
                               text_item)

MAX_ANSWER_CHARS = 600

# A <|grounding|> prompt asks for boxes: only answers in the grounding format get one. Plain-text answers get a
# prompt without it (DeepSeek-OCR's "<image>\n<|grounding|>OCR this image." answers with a box for every line).
PROMPT_OCR = "<image>\nOCR this image."
PROMPT_GROUNDING_OCR = "<image>\n<|grounding|>OCR this image."
PROMPT_FIGURE = "<image>\nParse the figure."
PROMPT_DESCRIBE = "<image>\nDescribe this image in detail."
PROMPT_LOCATE = "<image>\n<|grounding|>Locate every word."
PROMPT_FREE_OCR = "<image>\nFree OCR."  # DeepSeek-OCR's plain-text prompt: an answer without boxes

# -----------------------------------------------------------------------------
# word pools

COMMON_WORDS = """
time year people way day man thing woman life child world school state family student group country problem hand
part place case week company system program question work government number night point home water room mother
area money story fact month lot right study book eye job word business issue side kind head house service friend
father power hour game line end member law car city community name president team minute idea body information
back parent face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education foot boy age policy music market sense nation plan college
interest death experience effect use class control care field development role effort rate heart drug show
leader light voice wife police mind price report decision son view relationship town road arm difference value
building action model season society tax director position player record paper space ground form event official
matter center couple site project activity star table need court oil situation cost industry figure street image
phone data picture practice piece land product doctor wall patient worker news test movie north love support
technology step baby computer type attention film tree source organization hair window evidence population
small large early young important public bad same able old new good high little great long last different
local late hard major better economic strong possible whole free military true federal international full
special easy clear recent certain personal open red difficult available likely short single medical current
wrong private past foreign fine common poor natural significant similar hot dead central happy serious ready
simple left physical general environmental financial blue democratic dark various entire close legal
religious cold final main green nice huge popular traditional cultural quiet bright quick slow soft warm dry
""".split()

ITEMS = """
Apples|Bananas|Oat milk|Whole milk|Sourdough loaf|Croissant|Butter|Cheddar|Eggs 12pk|Rice 1kg|Pasta|Tomatoes|
Olive oil|Coffee beans|Green tea|Orange juice|Yogurt|Honey|Carrots|Onions|Potatoes 2kg|Chicken breast|Salmon|
Dark chocolate|Cookies|Granola|Lemons|Spinach|Avocado|Peanut butter|Soap bar|Toothpaste|Shampoo|Paper towels|
Batteries AA|Light bulb|Notebook|Pens 3pk|Sparkling water|Cola 6pk|Ice cream|Frozen peas|Bagels|Muffin|Espresso|
Cappuccino|Flat white|Sandwich|Soup of day|Salad bowl|Tape|Glue stick|Dish soap|Trash bags|Sponges|Flour 1kg
""".replace("\n", "").split("|")

SHOP_FIRST = ["GREEN LEAF", "CORNER", "SUNNY", "NORTH STAR", "BLUE DOOR", "OLD MILL", "RIVERSIDE", "MAPLE",
              "HARBOR", "CITY", "LITTLE", "GOLDEN", "HILLTOP", "DAILY", "FRESH WAY", "PARKSIDE", "SILVER", "OAKWOOD"]
SHOP_SECOND = ["MARKET", "BAKERY", "GROCER", "CAFE", "DELI", "PHARMACY", "HARDWARE", "BOOKS", "KIOSK", "FOODS",
               "STORE", "PANTRY"]
STREETS = ["Oak", "Elm", "Pine", "Maple", "Cedar", "Birch", "Willow", "Mill", "Station", "Church", "Park", "Lake",
           "Hill", "River", "Bridge", "King", "Queen", "High", "Market", "Garden"]
STREET_TYPES = ["Street", "Road", "Avenue", "Lane"]
TOWNS = ["Springfield", "Riverton", "Fairview", "Lakeside", "Brookfield", "Greenville", "Milton", "Ashford",
         "Westbury", "Norwood", "Kingsley", "Redhill"]
CASHIERS = ["Anna", "Ben", "Carla", "Dev", "Eli", "Fatima", "Greg", "Hana", "Ivan", "June", "Kofi", "Lena"]

SIGN_PHRASES = ["OPEN", "CLOSED", "EXIT", "NO ENTRY", "FRESH BREAD", "HOT COFFEE", "PARKING", "PHARMACY",
                "WET PAINT", "KEEP LEFT", "BUS STOP", "TICKETS", "PUSH", "PULL", "RESTROOMS", "INFORMATION", "DANGER",
                "STAFF ONLY", "FOOD HALL", "ICE CREAM", "FLOWERS", "TAXI", "HOTEL", "BIKE LANE", "SLOW DOWN"]

CHART_METRICS = [("Sales", "units"), ("Revenue", "k$"), ("Rainfall", "mm"), ("Visitors", "thousands"),
                 ("Orders", "count"), ("Downloads", "k"), ("Temperature", "C"), ("Profit", "k$"),
                 ("Energy use", "kWh"), ("Students", "count"), ("Traffic", "cars/h"), ("Crop yield", "t/ha")]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
CHART_DIMENSIONS = [("Month", MONTHS, True), ("Year", [str(y) for y in range(2012, 2025)], True),
                    ("Quarter", ["Q1", "Q2", "Q3", "Q4"], True), ("Day", ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat",
                                                                           "Sun"], True),
                    ("Region", ["North", "South", "East", "West", "Central", "Coast", "Valley"], False),
                    ("Store", ["Store " + letter for letter in "ABCDEFG"], False)]
SERIES_PAIRS = [("2023", "2024"), ("Online", "Store"), ("Plan", "Actual"), ("Team A", "Team B"), ("Day", "Night")]

# named colours, so that scene descriptions can say what they show
SIGN_COLORS = {"red": (200, 40, 40), "blue": (40, 80, 190), "green": (40, 140, 60), "yellow": (240, 210, 40),
               "orange": (240, 140, 30), "purple": (120, 60, 160), "white": (245, 245, 245), "black": (25, 25, 25)}
BACKDROP_COLORS = {"beige": (225, 215, 190), "gray": (170, 170, 170), "pale blue": (190, 210, 230),
                   "pale green": (200, 225, 195), "brown": (150, 120, 90), "dark gray": (95, 95, 95),
                   "olive": (150, 150, 100), "pink": (230, 200, 205)}
SERIES_COLORS = [(50, 100, 200), (230, 120, 40)]

# -----------------------------------------------------------------------------
# drawing helpers

FONT_FACES = [None]  # None is Pillow's bundled font; main() may add system font files


def system_font_files():
    return sorted(glob.glob("/usr/share/fonts/**/DejaVuSans*.ttf", recursive=True))


def text_width(face, size, text):
    return get_font(face, size).getlength(text)


def fit_size(face, text, max_width, largest, smallest=10):
    """The largest font size <= largest at which text fits in max_width (never below smallest)."""
    size = largest
    while size > smallest and text_width(face, size, text) > max_width:
        size -= 1
    return size


def draw_text(draw, xy, text, face, size, fill):
    """Draw text with its ink box's top-left corner at xy; return the ink box (x1, y1, x2, y2)."""
    font = get_font(face, size)
    left, top, _, _ = font.getbbox(text)
    x, y = xy[0] - left, xy[1] - top
    draw.text((x, y), text, font=font, fill=fill)
    return draw.textbbox((x, y), text, font=font)


def stamp_text(image, xy, text, face, size, fill):
    """Draw text with its ink near xy and return its exact ink box, measured on the rendered glyphs (the font's
    bbox includes advance and bearing space, a few pixels too wide for a grounding target)."""
    font = get_font(face, size)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left + 4, bottom - top + 4))
    ImageDraw.Draw(mask).text((2 - left, 2 - top), text, font=font, fill=255)
    x, y = xy[0] - 2, xy[1] - 2
    image.paste(fill, (x, y, x + mask.width, y + mask.height), mask)
    ink_left, ink_top, ink_right, ink_bottom = mask.getbbox()
    return x + ink_left, y + ink_top, x + ink_right, y + ink_bottom


def ink_size(face, size, text):
    left, top, right, bottom = get_font(face, size).getbbox(text)
    return right - left, bottom - top


def text_color_on(rgb):
    """Black or white, whichever reads better on the background rgb."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (20, 20, 20) if luminance > 140 else (250, 250, 250)


def paper_color(rng):
    return tuple(rng.randint(238, 255) for _ in range(3))


def ink_color(rng):
    return tuple(rng.randint(0, 70) for _ in range(3))


def place_boxes(rng, sizes, width, height, margin=8, tries=60):
    """Non-overlapping random top-left corners for boxes of the given (w, h); None for a box that did not fit."""
    placed, corners = [], []
    for w, h in sizes:
        corner = None
        for _ in range(tries):
            if w + 2 * margin > width or h + 2 * margin > height:
                break
            x, y = rng.randint(margin, width - w - margin), rng.randint(margin, height - h - margin)
            if all(x + w + margin <= px or px + pw + margin <= x or y + h + margin <= py or py + ph + margin <= y
                   for px, py, pw, ph in placed):
                corner = (x, y)
                placed.append((x, y, w, h))
                break
        corners.append(corner)
    return corners


def where(cx, cy, width, height):
    """'at the top left', 'on the right', 'in the center', ... for a point on the canvas."""
    row = ["top", "", "bottom"][min(2, int(3 * cy / height))]
    col = ["left", "", "right"][min(2, int(3 * cx / width))]
    if not row:
        return f"on the {col}" if col else "in the center"
    return f"at the {row} {col}".strip()


def money(cents):
    return f"{cents // 100}.{cents % 100:02d}"

# -----------------------------------------------------------------------------
# text generators


def sentence(rng, min_words=5, max_words=11):
    picked = [rng.choice(COMMON_WORDS) for _ in range(rng.randint(min_words, max_words))]
    if rng.random() < 0.3:
        picked.insert(rng.randint(1, len(picked)), str(rng.choice([rng.randint(2, 99), rng.randint(1900, 2030)])))
    if len(picked) > 6 and rng.random() < 0.4:
        picked[rng.randint(2, len(picked) - 3)] += ","
    return " ".join(picked).capitalize() + rng.choice([".", ".", ".", "?", "!"])


def sign_text(rng):
    street = rng.choice(STREETS).upper()
    return rng.choice([
        rng.choice(SIGN_PHRASES), rng.choice(SIGN_PHRASES), rng.choice(SIGN_PHRASES),
        f"ROOM {rng.randint(100, 499)}", f"GATE {rng.choice('ABCDEF')}{rng.randint(1, 30)}",
        f"PLATFORM {rng.randint(1, 12)}", f"{street} ST", f"SALE {rng.choice([10, 20, 25, 30, 50])}% OFF",
        f"${rng.randint(1, 19)}.{rng.choice(['00', '49', '99'])}", f"FLOOR {rng.randint(1, 9)}",
        f"OPEN {rng.randint(6, 10)}AM-{rng.randint(5, 11)}PM",
    ])

# -----------------------------------------------------------------------------
# renderers: rng (and short, for the tier-1 set's shorter answers) -> (image, answer)


def receipt_lines(rng, short):
    """The receipt's content as (left, right) pairs; right is None for centred header/footer lines."""
    shop = f"{rng.choice(SHOP_FIRST)} {rng.choice(SHOP_SECOND)}"
    address = f"{rng.randint(1, 250)} {rng.choice(STREETS)} {rng.choice(STREET_TYPES)}, {rng.choice(TOWNS)}"
    stamp = f"20{rng.randint(19, 25)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} " \
            f"{rng.randint(7, 21):02d}:{rng.randint(0, 59):02d}"
    items, subtotal = [], 0
    for name in rng.sample(ITEMS, rng.randint(3, 4) if short else rng.randint(4, 7)):
        quantity, unit = rng.choice([1, 1, 1, 2, 3]), rng.randint(49, 1299)
        subtotal += quantity * unit
        label = name if quantity == 1 else f"{name} {quantity} x {money(unit)}"
        items.append((label, money(quantity * unit)))
    tax_rate = rng.choice([5, 7, 8, 10, 20])
    tax = (subtotal * tax_rate + 50) // 100
    total = subtotal + tax
    header = [(shop, None), (address, None), (stamp, None)]
    if not short:
        header.append((f"Receipt #{rng.randint(1000, 9999)} Till {rng.randint(1, 6)}", None))
    totals = [("SUBTOTAL", money(subtotal)), (f"TAX {tax_rate}%", money(tax)), ("TOTAL", money(total))]
    if rng.random() < 0.5:
        paid = -(-total // 500) * 500  # cash, rounded up to the next 5.00
        totals += [("CASH", money(paid)), ("CHANGE", money(paid - total))]
    else:
        totals.append(("CARD", money(total)))
    footer = [] if short else [(f"Served by {rng.choice(CASHIERS)}", None)]
    footer.append((rng.choice(["THANK YOU!", "THANK YOU, COME AGAIN", "HAVE A NICE DAY"]), None))
    return header, items, totals, footer


def render_receipt(rng, short=False):
    return draw_receipt(rng, receipt_lines(rng, short), width=320, max_height=512)


def shop_template(rng):
    """What every receipt of one shop shares: its header and footer lines."""
    shop = f"{rng.choice(SHOP_FIRST)} {rng.choice(SHOP_SECOND)}"
    address = f"{rng.randint(1, 250)} {rng.choice(STREETS)} {rng.choice(STREET_TYPES)}, {rng.choice(TOWNS)}"
    phone = f"Tel 0{rng.randint(100, 999)} {rng.randint(100000, 999999)}"
    vat = f"VAT No GB{rng.randint(100000000, 999999999)}"
    return [(shop, None), (address, None), (phone, None), (vat, None)], [(rng.choice(
        ["THANK YOU!", "THANK YOU, COME AGAIN", "HAVE A NICE DAY"]), None), ("Keep this receipt", None)]


def templated_receipt_lines(template, rng, n_items):
    """One receipt of a shop: the template's header and footer around its own date, items and totals, so that
    receipts of the same shop differ only where real ones do."""
    header, footer = template
    stamp = f"20{rng.randint(19, 25)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} " \
            f"{rng.randint(7, 21):02d}:{rng.randint(0, 59):02d}"
    items, subtotal = [], 0
    for name in [rng.choice(ITEMS) for _ in range(n_items)]:
        quantity, unit = rng.choice([1, 1, 1, 2, 3]), rng.randint(49, 1299)
        subtotal += quantity * unit
        label = name if quantity == 1 else f"{name} {quantity} x {money(unit)}"
        items.append((label, money(quantity * unit)))
    tax = (subtotal * 20 + 50) // 100
    totals = [("SUBTOTAL", money(subtotal)), ("TAX 20%", money(tax)), ("TOTAL", money(subtotal + tax)),
              ("CARD", money(subtotal + tax))]
    when = [(stamp, None), (f"Receipt #{rng.randint(1000, 9999)} Till {rng.randint(1, 6)}", None)]
    return header + when, items, totals, [(f"Served by {rng.choice(CASHIERS)}", None)] + footer


def draw_receipt(rng, blocks, width, max_height, largest=20):
    """Draw (left, right) line blocks as a receipt: centred header/footer lines, items with right-aligned prices,
    dashed rules between blocks. Returns (image, answer)."""
    margin, face = 16, rng.choice(FONT_FACES)
    num_lines = sum(len(b) for b in blocks)
    longest = max((f"{left}    {right}" if right else left) for b in blocks for left, right in b)
    # a font that fits the widest line, and small enough that the receipt stays within max_height
    largest_for_height = int((max_height - 2 * margin - 8 * num_lines) / (num_lines + 1.5))
    size = fit_size(face, longest, width - 2 * margin, min(rng.randint(largest - 3, largest), largest_for_height))
    step, gap = size + 8, size // 2  # line pitch, and the extra space where a dashed rule separates blocks
    height = 2 * margin + num_lines * step + (len(blocks) - 1) * gap
    image = Image.new("RGB", (width, height), paper_color(rng))
    draw, ink, y = ImageDraw.Draw(image), ink_color(rng), margin
    for i, block in enumerate(blocks):
        if i > 0:  # a dashed rule between blocks; drawn, not text, so it is not part of the answer
            for x in range(margin, width - margin, 8):
                draw.line([(x, y + gap // 2 - 2), (x + 4, y + gap // 2 - 2)], fill=ink, width=1)
            y += gap
        for left, right in block:
            if right is None:
                draw.text(((width - text_width(face, size, left)) / 2, y), left, font=get_font(face, size), fill=ink)
            else:
                draw.text((margin, y), left, font=get_font(face, size), fill=ink)
                draw.text((width - margin - text_width(face, size, right), y), right, font=get_font(face, size),
                          fill=ink)
            y += step
    answer = "\n".join(left if right is None else f"{left} {right}" for b in blocks for left, right in b)
    return image, answer


def chart_data(rng, short):
    """Title, axis names and the table (categories x series) a chart shows."""
    metric, unit = rng.choice(CHART_METRICS)
    dimension, categories, ordered = rng.choice(CHART_DIMENSIONS)
    two_series = rng.random() < (0.3 if short else 0.5)
    if two_series:
        count = rng.randint(3, 4) if short else rng.randint(3, 5)
    else:
        count = rng.randint(4, 5) if short else rng.randint(5, 8)
    count = min(count, len(categories))
    if ordered:  # months, years, ... stay a consecutive run
        start = rng.randint(0, len(categories) - count)
        categories = categories[start:start + count]
    else:
        categories = rng.sample(categories, count)
    series = list(rng.choice(SERIES_PAIRS)) if two_series else [metric]
    scale = rng.choice([1, 1, 10])
    values = [[rng.randint(2, 95) * scale for _ in series] for _ in categories]
    title = rng.choice([f"{metric} by {dimension.lower()}", f"{rng.choice(TOWNS)} {metric.lower()}",
                        f"{metric} per {dimension.lower()}, {rng.choice(TOWNS)}"])
    source = f"Source: {rng.choice(TOWNS)} {rng.choice(['city office', 'survey', 'annual report', 'records'])}, " \
             f"{rng.randint(2015, 2025)}"
    return title, dimension, f"{metric} ({unit})", categories, series, values, source


def chart_axis_max(values):
    top = max(max(row) for row in values) * 1.08  # headroom, so the top value label stays inside the plot
    step = 10 if top <= 100 else 100
    return int(-(-top // step) * step)


def render_chart(rng, short=False, width=384, height=384):
    title, x_name, y_name, categories, series, values, source = chart_data(rng, short)
    style = rng.choice(["bar", "line"])
    face = rng.choice(FONT_FACES)
    image = Image.new("RGB", (width, height), paper_color(rng))
    draw, ink = ImageDraw.Draw(image), (30, 30, 30)
    left, right, top, bottom = 52, width - 14, 78, height - 78  # the plot area
    draw_text(draw, ((width - ink_size(face, 22, title)[0]) // 2, 12), title, face, fit_size(face, title, width - 20,
                                                                                               22), ink)
    draw_text(draw, (8, 46), y_name, face, 15, ink)
    draw_text(draw, ((left + right - ink_size(face, 15, x_name)[0]) // 2, bottom + 32), x_name, face, 15, ink)
    draw_text(draw, (8, height - 22), source, face, 14, (90, 90, 90))
    axis_max = chart_axis_max(values)
    to_y = lambda v: bottom - (bottom - top) * v / axis_max
    for tick in (0, axis_max // 2, axis_max):  # gridlines and tick labels
        draw.line([(left, to_y(tick)), (right, to_y(tick))], fill=(215, 215, 215))
        label_w, label_h = ink_size(face, 14, str(tick))
        draw_text(draw, (left - 6 - label_w, to_y(tick) - label_h // 2), str(tick), face, 14, ink)
    draw.line([(left, top - 4), (left, bottom), (right, bottom)], fill=ink, width=2)
    slot = (right - left) / len(categories)
    bar = slot * 0.7 / len(series)
    value_size = fit_size(face, "000", bar - 1, 14, smallest=11)  # neighbouring bars' labels must not touch
    for i, category in enumerate(categories):
        size = fit_size(face, category, slot - 4, 15)
        draw_text(draw, (left + slot * (i + 0.5) - ink_size(face, size, category)[0] / 2, bottom + 8), category,
                  face, size, ink)
    if style == "bar":
        for i, row in enumerate(values):
            for s, value in enumerate(row):
                x0 = left + slot * i + slot * 0.15 + bar * s
                draw.rectangle([x0, to_y(value), x0 + bar - 2, bottom - 1], fill=SERIES_COLORS[s])
                w, h = ink_size(face, value_size, str(value))
                draw_text(draw, (x0 + (bar - 2 - w) / 2, to_y(value) - h - 4), str(value), face, value_size, ink)
    else:
        paper = image.getpixel((1, 1))
        lines = [[(left + slot * (i + 0.5), to_y(row[s])) for i, row in enumerate(values)] for s in range(len(series))]
        for s, points in enumerate(lines):
            draw.line(points, fill=SERIES_COLORS[s], width=3)
            for x, y in points:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=SERIES_COLORS[s])
        for s, points in enumerate(lines):  # labels after all lines, on a patch of paper so no line crosses them
            for i, (x, y) in enumerate(points):
                value = values[i][s]
                if len(series) == 2:  # the lower series labels below, so the two labels never meet
                    below = value < values[i][1 - s]
                else:  # a dip labels below, a peak above: away from the line's neighbours
                    neighbours = [values[j][s] for j in (i - 1, i + 1) if 0 <= j < len(values)]
                    below = value < sum(neighbours) / len(neighbours)
                w, h = ink_size(face, value_size, str(value))
                corner = (x - w / 2, y + 9 if below else y - h - 9)
                draw.rectangle([corner[0] - 2, corner[1] - 2, corner[0] + w + 2, corner[1] + h + 2], fill=paper)
                draw_text(draw, corner, str(value), face, value_size, SERIES_COLORS[s])
    if len(series) == 2:  # legend, top right
        x = right - 8 - sum(ink_size(face, 14, name)[0] + 30 for name in series)
        for s, name in enumerate(series):
            draw.rectangle([x, 50, x + 12, 62], fill=SERIES_COLORS[s])
            x = draw_text(draw, (x + 17, 50), name, face, 14, ink)[2] + 13
    header = f"| {x_name} | " + " | ".join(series) + " |"
    rows = [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(categories, values)]
    rule = "|" + " --- |" * (len(series) + 1)
    answer = "\n".join([title, f"{style.capitalize()} chart. x: {x_name}. y: {y_name}.", header, rule] + rows
                       + [source])
    return image, answer


def scene_backdrop(rng, width, height):
    """A gradient backdrop with random clutter shapes; returns the image, its colour name and the shape names."""
    backdrop_name = rng.choice(sorted(BACKDROP_COLORS))
    base = BACKDROP_COLORS[backdrop_name]
    delta = rng.randint(-35, 35)  # the same shift on every channel: lighter or darker, same hue
    shade = tuple(max(0, min(255, c + delta)) for c in base)
    mask = Image.linear_gradient("L").resize((width, height)).rotate(rng.choice([0, 90, 180, 270]))
    image = Image.composite(Image.new("RGB", (width, height), base), Image.new("RGB", (width, height), shade), mask)
    draw, shapes = ImageDraw.Draw(image), sorted(rng.sample(["circles", "rectangles", "lines", "triangles"],
                                                            rng.randint(2, 3)))
    for _ in range(rng.randint(12, 24)):
        color = tuple((c + rng.randint(0, 255)) // 2 for c in base)  # muted: halfway towards the backdrop
        x, y, w, h = rng.randint(-20, width), rng.randint(-20, height), rng.randint(15, 110), rng.randint(15, 110)
        shape = rng.choice(shapes)
        if shape == "circles":
            draw.ellipse([x, y, x + w, y + w], fill=color if rng.random() < 0.5 else None, outline=color, width=3)
        elif shape == "rectangles":
            draw.rectangle([x, y, x + w, y + h], fill=color)
        elif shape == "lines":
            draw.line([(x, y), (x + rng.randint(-150, 150), y + rng.randint(-150, 150))], fill=color, width=4)
        else:
            draw.polygon([(x, y + h), (x + w, y + h), (x + w // 2, y)], fill=color)
    return image, backdrop_name, shapes


def render_scene(rng, short=False, width=384, height=384):
    face, scale = rng.choice(FONT_FACES), min(width, height) / 384  # signs grow with the canvas
    image, backdrop_name, shapes = scene_backdrop(rng, width, height)
    draw = ImageDraw.Draw(image)
    # the first sign is big; the others are signs or small labels
    specs = [("sign", int(scale * rng.randint(28, 36)))]
    for _ in range(rng.randint(1, 2)):
        specs.append(("sign", int(scale * rng.randint(22, 28))) if rng.random() < 0.5
                     else ("label", int(scale * rng.randint(17, 20))))
    texts = [sign_text(rng) for _ in specs]
    sizes = [fit_size(face, t, width - 60, s) for t, (_, s) in zip(texts, specs)]
    boxes = [tuple(d + int(0.8 * s) for d in ink_size(face, s, t)) for t, s in zip(texts, sizes)]
    sentences = []
    for text, (kind, _), size, box, corner in zip(texts, specs, sizes, boxes, place_boxes(rng, boxes, width, height)):
        if corner is None:
            continue  # no room left: the sign is neither drawn nor described
        color_name = rng.choice(sorted(SIGN_COLORS))
        fill, x, y = SIGN_COLORS[color_name], corner[0], corner[1]
        draw.rounded_rectangle([x, y, x + box[0], y + box[1]], radius=4 if kind == "sign" else 2, fill=fill,
                               outline=(30, 30, 30), width=3 if kind == "sign" else 1)
        text_fill = text_color_on(fill)
        draw_text(draw, (x + int(0.4 * size), y + int(0.4 * size)), text, face, size, text_fill)
        place = where(x + box[0] / 2, y + box[1] / 2, width, height)
        letters = "white" if text_fill[0] > 128 else "black"
        noun = "small " + color_name + " label" if kind == "label" else color_name + " sign"
        if not sentences:  # lead with the most prominent text
            sentences.append(f'"{text}" is written in {letters} letters on a large {noun} {place}.')
        else:
            sentences.append(rng.choice([f'A {noun} {place} reads "{text}".',
                                         f'{place[0].upper() + place[1:]}, a {noun} says "{text}".',
                                         f'There is a {noun} {place} with the words "{text}".']))
    shape_list = ", ".join(shapes[:-1]) + " and " + shapes[-1]
    sentences.append(f"The background is a cluttered {backdrop_name} backdrop with {shape_list}.")
    return image, " ".join(sentences)


def render_line(rng, short=False):
    face = rng.choice(FONT_FACES)
    text = " ".join(rng.choice(COMMON_WORDS) for _ in range(rng.randint(2, 4)))
    text = text.capitalize() if rng.random() < 0.5 else text
    return draw_line(rng, face, text), text


def draw_line(rng, face, text, width=320, height=128):
    """One line of text, as large as fits (26-40 px), at a random place on plain paper."""
    size = fit_size(face, text, width - 24, rng.randint(26, 40))
    image = Image.new("RGB", (width, height), paper_color(rng))
    w, h = ink_size(face, size, text)
    corner = (rng.randint(8, max(8, width - w - 8)), rng.randint(8, max(8, height - h - 8)))
    draw_text(ImageDraw.Draw(image), corner, text, face, size, ink_color(rng))
    return image


SYLLABLES = ["ka", "lo", "mi", "ber", "tan", "vel", "ro", "su", "dim", "or", "ex", "qua", "zen", "pha", "gru", "bel",
             "nor", "ish", "ul", "tre", "wy", "jo", "cas", "fen", "ib", "mor", "al", "stri", "po", "hu"]
UPPERCASE = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LINE2_MAX_CHARS = 26


def line2_item(rng):
    """One item of a line2 text line: a pool word, a number, a price, a date, a time, a code or a made-up name."""
    kind = rng.random()
    if kind < 0.35:
        word = rng.choice(COMMON_WORDS)
        return word.capitalize() if rng.random() < 0.3 else word
    if kind < 0.47:
        return str(rng.choice([rng.randint(0, 99), rng.randint(0, 9999)]))
    if kind < 0.59:
        return f"${rng.randint(0, 999)}.{rng.randint(0, 99):02d}"
    if kind < 0.69:
        return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if kind < 0.77:
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    if kind < 0.88:
        letters = "".join(rng.choice(UPPERCASE) for _ in range(rng.randint(1, 3)))
        return f"{letters}-{rng.randint(0, 10 ** rng.randint(2, 4) - 1):0{rng.randint(2, 4)}d}"
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()


def line2_text(rng):
    """2-4 items, at most LINE2_MAX_CHARS characters: content a word pool alone cannot predict."""
    items = [line2_item(rng)]
    for _ in range(rng.randint(1, 3)):
        item = line2_item(rng)
        if len(" ".join(items + [item])) <= LINE2_MAX_CHARS:
            items.append(item)
    return " ".join(items)[:LINE2_MAX_CHARS]


def render_line2(rng, short=False):
    """A line2 text line on the same canvas, font sizes and placement as render_line."""
    face = rng.choice(FONT_FACES)
    text = line2_text(rng)
    return draw_line(rng, face, text), text


def wrap(face, size, text, max_width):
    """Greedy word wrap into lines no wider than max_width."""
    lines = []
    for word in text.split():
        if lines and text_width(face, size, lines[-1] + " " + word) <= max_width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def render_paragraph(rng, short=False):
    width, height, margin, face = 384, 384, 18, rng.choice(FONT_FACES)
    size = rng.randint(17, 21)
    step = size + 8
    title = " ".join(rng.choice(COMMON_WORDS) for _ in range(rng.randint(2, 4))).title()
    lines = [title, ""]  # a heading and a blank line, then paragraphs separated by blank lines
    max_lines = (height - 2 * margin - 10) // step
    while len(lines) < max_lines - 1:
        paragraph = wrap(face, size, " ".join(sentence(rng) for _ in range(rng.randint(2, 4))), width - 2 * margin)
        room = max_lines - len(lines)
        chars = sum(len(l) + 1 for l in lines)
        paragraph = paragraph[:room]
        while paragraph and chars + sum(len(l) + 1 for l in paragraph) > MAX_ANSWER_CHARS - 50:
            paragraph.pop()
        if not paragraph:
            break
        lines += paragraph + [""]
    lines = lines[:-1] if lines[-1] == "" else lines
    image = Image.new("RGB", (width, height), paper_color(rng))
    draw, ink = ImageDraw.Draw(image), ink_color(rng)
    draw.text((margin, margin), title, font=get_font(face, size + 5), fill=ink)
    for i, line in enumerate(lines[1:], 1):
        draw.text((margin, margin + 10 + i * step), line, font=get_font(face, size), fill=ink)
    return image, "\n".join(lines)


def render_grounding(rng, short=False):
    width, height, face = 384, 384, rng.choice(FONT_FACES)
    image = Image.new("RGB", (width, height), paper_color(rng))
    words = rng.sample(COMMON_WORDS, rng.randint(4, 8))
    sizes = [rng.randint(20, 34) for _ in words]
    corners = place_boxes(rng, [ink_size(face, s, w) for w, s in zip(words, sizes)], width, height)
    found = []
    for word, size, corner in zip(words, sizes, corners):
        if corner is not None:
            x1, y1, x2, y2 = stamp_text(image, corner, word, face, size, ink_color(rng))
            found.append((word, [round(x1 / width * 999), round(y1 / height * 999),
                                 round(x2 / width * 999), round(y2 / height * 999)]))
    found.sort(key=lambda item: (item[1][1], item[1][0]))  # reading order: top to bottom, then left to right
    answer = "\n".join(f"<|ref|>{word}<|/ref|><|det|>[[{b[0]}, {b[1]}, {b[2]}, {b[3]}]]<|/det|>" for word, b in found)
    return image, answer


# -----------------------------------------------------------------------------
# pages: windows of documents with every text line grounded, DeepSeek-OCR's way
#
# The answer lists each text line as <|ref|>text<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>: the line's ink box on
# the 0-999 scale of the image's width and height, lines in reading order. A line is a run of text without a gap
# wider than about 1.5 of its height (so a receipt's item and its price are two lines, as the cells of a table in
# real print are). Reading order is a reader's: blocks from top to bottom, a two-column block's whole left column
# before its right column, the cells of one row from left to right; so every line lies below the line before it
# or wholly to its right (the next cell of a row, or the top of the next column).

PAGE_WIDTHS = (640, 1024)  # a window's width in pixels, drawn uniformly (real print: as near as the dpi allows)
PAGE_MAX_HEIGHT = 1024
PAGE_LINES = (6, 12)  # text lines per window, drawn uniformly (fewer where the window is full first)
PAGE_DPI = (100, 300)  # 9-12 pt text at these resolutions: 12-50 px
PAGE_MAX_ANSWER_CHARS = 1600
LINE_MARKUP = len("<|ref|><|/ref|><|det|>[[999, 999, 999, 999]]<|/det|>\n")  # a line's answer, less its text
LIST_STYLES = ["-", "*", "+", "o", "1.", "1)", "(1)", "a)", "(a)", "a.", "i."]
ROMAN = ["i", "ii", "iii", "iv", "v", "vi", "vii", "viii"]


def grounding_answer(lines, width, height):
    """One `<|ref|>text<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>` per (text, pixel box), coordinates on the 0-999
    scale of the image's width and height, rounded as render_grounding rounds them."""
    def scale(v, size):
        return min(999, max(0, round(v / size * 999)))
    return "\n".join(f"<|ref|>{text}<|/ref|><|det|>[[{scale(x1, width)}, {scale(y1, height)}, {scale(x2, width)}, "
                     f"{scale(y2, height)}]]<|/det|>" for text, (x1, y1, x2, y2) in lines)


def page_words(split):
    """Pages are drawn for 'train' (the training lexicon, in training fonts) or 'val' (the validation lexicon, in
    the held-out fonts); the flag says which fonts."""
    if split not in ("train", "val"):
        raise ValueError(f"pages are drawn for split 'train' or 'val', not '{split}'")
    return lexicon(split), split == "val"


@functools.lru_cache(maxsize=None)
def page_fonts(held_out):
    """The side's upright faces, those of regular weight (most body text), its monospaced ones (code), and each
    face's bold relatives in its family."""
    installed, faces = installed_fonts(), font_faces(held_out)
    family = {path: name for name, paths in installed.items() for path in paths}
    style = {face: "Regular" if face is None else get_font(face, 12).getname()[1] for face in faces}
    upright = [face for face in faces if not any(s in style[face] for s in ("Italic", "Oblique"))]
    regular = [face for face in upright if not any(s in style[face] for s in ("Bold", "Black", "Heavy", "Light", "Thin",
                                                                              "Hairline"))]
    mono = [face for face in upright if face is not None
            and get_font(face, 20).getlength("i" * 8) == get_font(face, 20).getlength("W" * 8)]
    bold = {face: [f for f in installed.get(family.get(face), []) if f in upright and "Bold" in style[f]] or [face]
            for face in upright}
    return upright, regular or upright, mono or upright, bold


def prose(rng, words, n, capital=True):
    """n items of running text: the lexicon's words in sentences, with numbers, letter strings and symbols."""
    items = []
    for i in range(n):
        item = rng.choice(words) if rng.random() < 0.8 else text_item(rng, words)
        if capital:
            item = item[:1].upper() + item[1:]
        capital = False
        if i == n - 1 or rng.random() < 0.1:
            item += rng.choice(".....?!:")
            capital = True
        elif rng.random() < 0.07:
            item += rng.choice(",,,;")
        items.append(item)
    return " ".join(items).split()  # number-like and symbolic items may hold spaces


def code_line(rng, words):
    """A line of code or a shell session from the lexicon's words, numbers and the symbols of code."""
    w = lambda: rng.choice(words).lower()  # noqa: E731
    n = lambda: str(rng.randint(0, 999))  # noqa: E731
    return rng.choice([
        lambda: f"{w()} = {w()}({w()}, {n()});", lambda: f"{w()}.{w()}({w()})", lambda: f"{w()}[{n()}] += {w()};",
        lambda: f"# {w()} {w()} {w()}", lambda: f"// {w()} {w()}", lambda: f"{w()}_{w()} = \"{w()}\"",
        lambda: f"$ {w()} -{rng.choice('abcdefgilnqrvx')} {w()}/{w()}.{rng.choice(['txt', 'c', 'py', 'h', 'sh'])}",
        lambda: "}", lambda: f"{w()}({w()}) {{", lambda: f"<{w()}>{w()}</{w()}>", lambda: f"{w()}: {n()}",
        lambda: f"{w()} {rng.choice(['==', '!=', '<=', '>=', '&&', '||'])} {n()}",
        lambda: symbolic(rng, words), lambda: f"{w()} = {number_like(rng)}",
    ])()


def wrap_tokens(font, tokens, width, first_width=None):
    """Greedy wrap into lines no wider than width (the first line: first_width); a token wider than a whole line
    is cut to fit."""
    lines = []
    for token in tokens:
        last_room = first_width if len(lines) == 1 and first_width is not None else width
        if lines and font.getlength(lines[-1] + " " + token) <= last_room:
            lines[-1] += " " + token
        else:
            lines.append(fit(font, token, first_width if not lines and first_width is not None else width))
    return lines


def fit(font, text, width):
    """The text, its last characters dropped until it is no wider than width (one character at least)."""
    while len(text) > 1 and font.getlength(text) > width:
        text = text[:-1].rstrip()
    return text


def stamp_words(image, x, baseline, placed, face, size, fill):
    """Draw (offset, text) pieces on one baseline from x; return their ink box, measured on the rendered glyphs
    (exact: a font's bbox includes bearings, a few pixels too wide for a grounding target)."""
    font = get_font(face, size)
    ascent, descent = font.getmetrics()
    pad = size  # room for overhangs and accents beyond the font's ascent and descent
    mask = Image.new("L", (math.ceil(max(dx + font.getlength(text) for dx, text in placed)) + 2 * pad,
                           ascent + descent + 2 * pad))
    draw = ImageDraw.Draw(mask)
    for dx, text in placed:
        draw.text((pad + dx, pad + ascent), text, font=font, fill=255, anchor="ls")
    left, top = round(x) - pad, round(baseline) - ascent - pad
    image.paste(fill, (left, top, left + mask.width, top + mask.height), mask)
    x1, y1, x2, y2 = mask.getbbox()
    return left + x1, top + y1, left + x2, top + y2


class Full(Exception):
    """The window has no room for another line."""


def check_room(page, texts, baseline, face, size):
    descent = get_font(face, size).getmetrics()[1]
    if (len(page["lines"]) + len(texts) > page["max_lines"] or baseline + descent > page["bottom"]
            or page["chars"] + sum(len(t) + LINE_MARKUP for t in texts) > page["max_chars"]):
        raise Full


def put(page, x, baseline, placed, face, size):
    """Draw one text line and record its text and ink box; raise Full when the window has no room for it."""
    text = " ".join(t for _, t in placed)
    check_room(page, [text], baseline, face, size)
    page["lines"].append((text, stamp_words(page["image"], x, baseline, placed, face, size, page["ink"])))
    page["chars"] += len(text) + LINE_MARKUP


def heading_block(page, x, width, y):
    """A heading in a larger (bold where the family has one) face, maybe numbered, maybe centred."""
    rng, size = page["rng"], page["size"]
    face, hsize = rng.choice(page["bold"]), round(size * rng.uniform(1.1, 1.8))
    tokens = [rng.choice(page["words"]) for _ in range(rng.randint(1, 6))]
    tokens = [t.upper() for t in tokens] if rng.random() < 0.15 else [tokens[0].capitalize()] + (
        [t.capitalize() for t in tokens[1:]] if rng.random() < 0.5 else tokens[1:])
    if rng.random() < 0.4:  # a section number
        tokens.insert(0, ".".join(str(rng.randint(1, 12)) for _ in range(rng.randint(1, 3))) + rng.choice(["", "."])
                      if rng.random() < 0.8 else rng.choice(UPPER) + ".")
    font, centred = get_font(face, hsize), rng.random() < 0.2
    y += hsize - size + round(size * rng.uniform(0.2, 1.0))  # the larger face, and space above
    for line in wrap_tokens(font, tokens, width)[:2]:
        dx = (width - font.getlength(line)) / 2 if centred else 0
        put(page, x + dx, y, [(0, line)], face, hsize)
        y += round(hsize * 1.2)
    return y - round(hsize * 1.2) + round(page["leading"] * rng.uniform(1.0, 1.6))


def paragraph_block(page, x, width, y, continued=False):
    """Running text, ragged or justified (never stretched past half an em between words), its first line
    indented or the paragraphs spaced; continued: the window starts inside the paragraph."""
    rng, face, size = page["rng"], page["face"], page["size"]
    font = get_font(face, size)
    tokens = prose(rng, page["words"], rng.randint(6, 60), capital=not continued)
    indent = 0 if continued else page["indent"]
    lines = wrap_tokens(font, tokens, width, width - indent)
    space = font.getlength(" ")
    for i, line in enumerate(lines):
        dx, words = (indent if i == 0 else 0), line.split(" ")
        placed = [(0, line)]
        if page["justify"] and i < len(lines) - 1 and len(words) > 1:
            widths = [font.getlength(w) for w in words]
            gap = (width - dx - sum(widths)) / (len(words) - 1)
            if gap <= space + 0.5 * size:
                offsets = [sum(widths[:k]) + k * gap for k in range(len(words))]
                placed = list(zip(offsets, words))
        put(page, x + dx, y, placed, face, size)
        y += page["leading"]
    return y + page["paragraph_gap"]


def list_marker(style, k):
    """The k-th item's marker in a list style: a bullet, or 1. 1) (1) a) (a) a. i. counted on."""
    if "1" in style:
        return style.replace("1", str(k + 1))
    if "a" in style:
        return style.replace("a", "abcdefghijklmnopqrstuvwxyz"[k % 26])
    return style.replace("i", ROMAN[k % len(ROMAN)])


def list_block(page, x, width, y):
    """Bulleted or numbered items; an item's continuation lines hang under its text."""
    rng, face, size = page["rng"], page["face"], page["size"]
    font, style, n = get_font(face, size), rng.choice(LIST_STYLES), rng.randint(2, 6)
    markers = [list_marker(style, k) for k in range(n)]
    left = round(size * rng.uniform(0, 2))  # the list's own indent
    indent = max(font.getlength(m) for m in markers) + font.getlength(" ") * rng.uniform(1, 2.5)
    y += round(page["leading"] * rng.uniform(0, 0.5))
    for marker in markers:
        lines = wrap_tokens(font, prose(rng, page["words"], rng.randint(2, 24)), width - left - indent)
        for i, line in enumerate(lines):
            placed = [(0, marker), (indent, line)] if i == 0 else [(0, line)]
            put(page, x + left + (0 if i == 0 else indent), y, placed, face, size)
            y += page["leading"]
        y += round(page["leading"] * rng.choice([0, 0, 0.3]))
    return y + page["paragraph_gap"]


def code_block(page, x, width, y):
    """Lines of code in a monospaced face, indented by levels, sometimes on a shaded panel. A line's text is what
    it shows, without the indentation (its box says where it starts)."""
    rng = page["rng"]
    face, size = rng.choice(page["mono"]), max(10, round(page["size"] * rng.uniform(0.8, 1.0)))
    font = get_font(face, size)
    leading, pad, step = round(size * rng.uniform(1.1, 1.4)), round(size * rng.uniform(0.3, 1.0)), rng.choice([2, 4])
    n, char = rng.randint(3, 10), font.getlength("x")
    y += round(page["leading"] * rng.uniform(0.3, 0.8)) + pad  # the panel keeps clear of the line above
    if rng.random() < 0.4:  # a panel a little darker than the paper: not ink
        shade = tuple(max(0, c - rng.randint(8, 20)) for c in page["paper"])
        top = y - font.getmetrics()[0] - pad
        ImageDraw.Draw(page["image"]).rectangle([x, top, x + width, top + n * leading + 2 * pad], fill=shade)
    level = 0
    for _ in range(n):
        level = max(0, min(3, level + rng.choice([-1, 0, 0, 1])))
        indent = level * step * char if level * step * char < width / 2 else 0
        put(page, x + pad + indent, y, [(0, fit(font, code_line(rng, page["words"]), width - 2 * pad - indent))],
            face, size)
        y += leading
    return y + pad + page["paragraph_gap"]


def receipt_block(page, x, width, y):
    """A receipt: centred header lines, items with their prices right-aligned (two lines a row: at least two ems
    apart), totals, a footer."""
    rng, words = page["rng"], page["words"]
    face = rng.choice(page["mono"]) if rng.random() < 0.5 else page["face"]
    size = page["size"]
    font, leading = get_font(face, size), round(size * rng.uniform(1.15, 1.5))
    rw = min(width, round(size * rng.uniform(14, 24)))
    x += rng.randint(0, width - rw)
    amount = lambda: f"{rng.randint(0, 99)}.{rng.randint(0, 99):02d}"  # noqa: E731
    header = [" ".join(rng.choice(words).upper() for _ in range(rng.randint(1, 3))),
              f"{rng.randint(1, 999)} {' '.join(rng.choice(words).capitalize() for _ in range(rng.randint(1, 2)))}",
              f"{number_like(rng)} {number_like(rng)}"]
    rows = []
    for _ in range(rng.randint(2, 8)):
        label = " ".join(cased(rng, rng.choice(words)) for _ in range(rng.randint(1, 3)))
        rows.append((label + (f" {rng.randint(2, 5)} x {amount()}" if rng.random() < 0.2 else ""), amount()))
    totals = [(rng.choice(words).upper(), amount()) for _ in range(rng.randint(1, 3))]
    footer = [" ".join(rng.choice(words).upper() for _ in range(rng.randint(1, 4)))]
    for line in header[:rng.randint(1, 3)]:
        line = fit(font, line, rw)
        put(page, x + (rw - font.getlength(line)) / 2, y, [(0, line)], face, size)
        y += leading
    for block in (rows, totals):
        y += round(leading * rng.uniform(0.3, 1.0))
        for label, price in block:
            price_width = font.getlength(price)
            tokens = label.split()
            while len(tokens) > 1 and font.getlength(" ".join(tokens)) + 2 * size > rw - price_width:
                tokens.pop()
            label = fit(font, " ".join(tokens), rw - price_width - 2 * size)
            check_room(page, [label, price], y, face, size)  # both cells of the row, or neither
            put(page, x, y, [(0, label)], face, size)
            put(page, x + rw - price_width, y, [(0, price)], face, size)
            y += leading
    y += round(leading * rng.uniform(0.3, 1.0))
    for line in footer:
        line = fit(font, line, rw)
        put(page, x + (rw - font.getlength(line)) / 2, y, [(0, line)], face, size)
        y += leading
    return y + page["paragraph_gap"]


def fill(page, x, width, y, blocks, weights, first=None):
    """Blocks one under another, the first one given, until the window is full."""
    try:
        y = first(page, x, width, y) if first else y
        for _ in range(100):
            y = page["rng"].choices(blocks, weights)[0](page, x, width, y)
    except Full:
        pass


def continued(page, x, width, y):
    return paragraph_block(page, x, width, y, continued=True)


def draw_page(rng, split, widths=PAGE_WIDTHS, max_height=PAGE_MAX_HEIGHT, lines=PAGE_LINES,
              max_chars=PAGE_MAX_ANSWER_CHARS):
    """A window of a document page as (image, [(text, ink box in pixels)] in reading order, page): running text
    with headings, lists and code, two columns, or a receipt, in one of the split's fonts at 100-300 dpi."""
    words, held_out = page_words(split)
    upright, regular, mono, bold = page_fonts(held_out)
    dpi, width = rng.randint(*PAGE_DPI), rng.randint(*widths)
    size = max(12, round(rng.uniform(9, 12) * dpi / 72))
    face = rng.choice(regular if rng.random() < 0.85 else upright)
    paper = tuple(rng.randint(232, 255) for _ in range(3))
    image = Image.new("RGB", (width, max_height), paper)
    margin = rng.randint(size // 2, 2 * size)
    page = {"rng": rng, "image": image, "words": words, "face": face, "bold": bold[face], "mono": mono,
            "size": size, "leading": round(size * rng.uniform(1.15, 1.6)), "paper": paper,
            "ink": tuple(rng.randint(0, 70) for _ in range(3)), "indent": rng.choice([0, 0, round(size * 1.5)]),
            "justify": rng.random() < 0.5, "lines": [], "chars": 0, "max_lines": rng.randint(*lines),
            "max_chars": max_chars, "bottom": max_height - margin}
    page["paragraph_gap"] = 0 if page["indent"] else round(page["leading"] * rng.uniform(0.3, 0.8))
    text_width = min(width - 2 * margin, round(rng.uniform(4.5, 6.5) * dpi))  # a page's text is at most 6.5 in
    x = rng.randint(margin, width - margin - text_width)
    y = margin + get_font(face, size).getmetrics()[0]  # the first baseline
    blocks = [paragraph_block, heading_block, list_block, code_block]
    weights = rng.choice([[6, 2, 1, 1], [2, 1, 6, 1], [2, 1, 1, 6], [3, 2, 2, 2]])  # prose, list, code, mixed
    layout = rng.choice(["text", "text", "text", "columns", "receipt"])
    if layout == "columns" and text_width < 2 * 12 * size:
        layout = "text"  # no room for two columns of a dozen ems
    if layout == "text":  # the window starts inside a paragraph, at a heading, or at a paragraph's start
        fill(page, x, text_width, y, blocks, weights, first=rng.choice([continued, heading_block, None]))
    elif layout == "receipt":
        fill(page, x, text_width, y, [receipt_block], [1])
    else:
        if rng.random() < 0.5:
            try:
                y = heading_block(page, x, text_width, y)  # across both columns
            except Full:
                pass
        gutter = round(size * rng.uniform(1.5, 3))
        column, total = (text_width - gutter) // 2, page["max_lines"]
        page["max_lines"] = len(page["lines"]) + (total - len(page["lines"]) + 1) // 2  # the left column's share
        fill(page, x, column, y, blocks[:2], [5, 1], first=rng.choice([continued, None]))
        page["max_lines"] = total
        fill(page, x + column + gutter, column, y, blocks[:2], [5, 1], first=rng.choice([continued, None]))
    assert page["lines"], "a page window without a line"
    bottom = max(box[3] for _, box in page["lines"]) + rng.randint(size // 3, 2 * size)
    page["layout"] = layout
    return image.crop((0, 0, width, min(max_height, bottom))), page["lines"], page


def render_page(rng, split, clean=False, **sizes):
    """A synthetic document window, degraded like a scan or render (clean: not), with every line grounded."""
    image, lines, page = draw_page(rng, split, **sizes)
    if not clean:
        image = degrade(rng, image, page["size"])
    return image, grounding_answer(lines, image.width, image.height)


def render_page_print(rng, split, widths=PAGE_WIDTHS, max_height=PAGE_MAX_HEIGHT, lines=PAGE_LINES,
                      max_chars=PAGE_MAX_ANSWER_CHARS):
    """A window of a real typeset page (nanovlm.realprint's documents of the split) with every line grounded."""
    from nanovlm.realprint import render_page_window
    image, found = render_page_window(rng, split, widths, max_height, lines, max_chars, LINE_MARKUP)
    return image, grounding_answer(found, image.width, image.height)


def render_print(rng, split):
    """A run of words cut from a real typeset PDF page (nanovlm.realprint; imported here, when first drawn, since
    it needs pypdfium2 and the PDF manuals)."""
    from nanovlm.realprint import render_print as render
    return render(rng, split)


RENDERERS = {"receipt": (render_receipt, PROMPT_OCR), "chart": (render_chart, PROMPT_FIGURE),
             "scene": (render_scene, PROMPT_DESCRIBE), "line": (render_line, PROMPT_OCR),
             "line2": (render_line2, PROMPT_FREE_OCR),
             "paragraph": (render_paragraph, PROMPT_OCR), "grounding": (render_grounding, PROMPT_LOCATE),
             "read": (render_read, PROMPT_FREE_OCR), "read_fonts": (render_read_fonts, PROMPT_FREE_OCR),
             "print": (render_print, PROMPT_FREE_OCR), "page": (render_page, PROMPT_GROUNDING_OCR),
             "page_print": (render_page_print, PROMPT_GROUNDING_OCR)}
# Kinds drawn from split-specific pools (lexicon, fonts, documents): their renderers take the split instead of
# `short`, so that a validation set shares no word, held-out font or document with training.
SPLIT_KINDS = {"read", "read_fonts", "print", "page", "page_print"}
PRINT_KINDS = {"print", "page_print"}  # cut from real typeset pages: their records' source is "print"
ANSWER_LIMITS = {"page": PAGE_MAX_ANSWER_CHARS, "page_print": PAGE_MAX_ANSWER_CHARS}  # others: MAX_ANSWER_CHARS

# -----------------------------------------------------------------------------
# datasets


def sample_rng(seed, split, index, attempt=0):
    # a string seed is hashed with SHA-512 by random.Random: stable across runs and machines
    return random.Random(f"{seed}:{split}:{index}:{attempt}")


def make_sample(kind, seed, split, index, short=False, attempt=0):
    """One sample as (record without its image path, image)."""
    render, prompt = RENDERERS[kind]
    rng = sample_rng(seed, split, index, attempt)
    image, answer = render(rng, split) if kind in SPLIT_KINDS else render(rng, short)
    limit = ANSWER_LIMITS.get(kind, MAX_ANSWER_CHARS)
    assert 0 < len(answer) <= limit, f"{kind} sample {index}: answer of {len(answer)} chars"
    record = {"id": f"{split}_{index:06d}_{kind}", "prompt": prompt, "answer": answer,
              "source": "print" if kind in PRINT_KINDS else "synth", "type": kind}
    return record, image


def make_shots(kind, seed, split, index, shots):
    """
    Record `index` of a K-shot set (K = shots) as (record, images): a conversation of the kind's samples
    index * (K + 1) + j, the first K as example turns (image -> answer), then the asked one, images in turn order.
    Each sample is one make_sample, so splits still never share one and no two records share one.
    """
    samples = [make_sample(kind, seed, split, index * (shots + 1) + j) for j in range(shots + 1)]
    conversation = []
    for record, _ in samples:
        conversation += [{"role": "user", "content": record["prompt"]},
                         {"role": "assistant", "content": record["answer"]}]
    record = {"id": f"{split}_{index:06d}_{kind}_{shots}shot", "conversation": conversation,
              "source": samples[-1][0]["source"], "type": kind}
    return record, [image for _, image in samples]




# -----------------------------------------------------------------------------
# Text-only conversations, for stage 2's mixing: small tasks on the same vocabulary, no image

def make_chat(seed, index):
    """One text-only conversation [{role, content}, ...] as a pure function of (seed, index): spell a word
    backwards, add two numbers, count a sentence's words, write a word in capitals, or total a small receipt."""
    rng = sample_rng(seed, "chat", index)
    word = rng.choice(COMMON_WORDS)
    text = sentence(rng, 4, 9)
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    prices = [rng.randint(50, 2000) for _ in range(rng.randint(2, 4))]
    question, answer = rng.choice([
        (f"Spell '{word}' backwards.", word[::-1]),
        (f"What is {a} + {b}?", f"{a} + {b} = {a + b}."),
        (f"How many words are in this sentence: {text}", f"{len(text.split())} words."),
        (f"Write '{word}' in capital letters.", word.upper()),
        (f"Add up these prices: {', '.join(money(p) for p in prices)}.", f"The total is {money(sum(prices))}."),
    ])
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
