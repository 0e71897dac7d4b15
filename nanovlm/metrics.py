"""
How close is a predicted answer to the reference? The measures of the eval script and of training-time eval.

Text (both strings are NFC-normalized first, so a precomposed "é" and "e" + combining acute are the same text):
- cer(pred, ref): Levenshtein distance over Unicode code points / len(ref). May exceed 1 (insertions).
- ned(pred, ref): the same distance / max(len(pred), len(ref)), always in [0, 1].
- word_precision(pred, ref): Fox-style, the share of predicted words that the reference also holds, counting
  multiplicity. Words are whitespace-separated runs, except that CJK ideographs, kana and hangul syllables are
  one word each (those scripts do not put spaces between words).

Boxes, from grounding answers `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` (0-999 coordinates):
- parse_boxes(text): a list of (label, [x1, y1, x2, y2]); text that does not parse as a box is skipped.
- box_iou(a, b): intersection over union of two boxes.
- match_boxes / detection_rate / mean_iou: greedy one-to-one matching of predictions to references.
"""

import re
import unicodedata
from collections import Counter

import numpy as np

# -----------------------------------------------------------------------------
# text


def edit_distance(a, b):
    """Levenshtein distance (insert, delete, substitute cost 1) between two strings, over code points."""
    if len(a) < len(b):
        a, b = b, a  # the row runs over the shorter string
    if not b:
        return len(a)
    b_codes = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    offsets = np.arange(len(b) + 1)
    row = offsets.copy()  # distances from a[:0] to every prefix of b
    for i, ch in enumerate(a, 1):
        mismatch = b_codes != ord(ch)
        best = np.empty_like(row)
        best[0] = i
        best[1:] = np.minimum(row[:-1] + mismatch, row[1:] + 1)  # substitute/match, or delete a[i-1]
        # inserting b[j-1] chains along the row: new[j] = min(best[j], new[j-1] + 1) = j + min_{k<=j}(best[k] - k).
        # the running minimum makes that chain one vectorized op instead of a Python loop over j
        row = np.minimum.accumulate(best - offsets) + offsets
    return int(row[-1])


def wrong_characters(pred, ref):
    """
    For each character of pred, whether a minimal edit script from pred to ref changes it (substituted or
    deleted), from a full Levenshtein table: what a picture marks in red. Also the number of characters of ref the
    script inserts (missing from pred). Quadratic; meant for short answers.
    """
    n, m = len(pred), len(ref)
    table = np.zeros((n + 1, m + 1), dtype=np.int64)
    table[:, 0], table[0, :] = np.arange(n + 1), np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            table[i, j] = min(table[i - 1, j - 1] + (pred[i - 1] != ref[j - 1]), table[i - 1, j] + 1,
                              table[i, j - 1] + 1)
    wrong, missing, i, j = [False] * n, 0, n, m
    while i > 0 or j > 0:  # walk back along one optimal path
        if i > 0 and j > 0 and table[i, j] == table[i - 1, j - 1] + (pred[i - 1] != ref[j - 1]):
            wrong[i - 1] = pred[i - 1] != ref[j - 1]
            i, j = i - 1, j - 1
        elif i > 0 and table[i, j] == table[i - 1, j] + 1:
            wrong[i - 1] = True  # a character ref does not have
            i -= 1
        else:
            missing += 1
            j -= 1
    return wrong, missing


def normalize(text):
    return unicodedata.normalize("NFC", text)


def cer(pred, ref):
    """
    Character error rate: edit distance / len(ref). Empty reference: 0.0 for an empty prediction, else 1.0
    (every predicted character is wrong; capping it keeps a mean over samples finite).
    """
    pred, ref = normalize(pred), normalize(ref)
    if not ref:
        return 0.0 if not pred else 1.0
    return edit_distance(pred, ref) / len(ref)


def ned(pred, ref):
    """Normalized edit distance: edit distance / max(len(pred), len(ref)); 0.0 for two empty strings."""
    pred, ref = normalize(pred), normalize(ref)
    longest = max(len(pred), len(ref))
    return edit_distance(pred, ref) / longest if longest else 0.0


# one CJK character is one word; anything else is split on whitespace
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
WORD_PATTERN = re.compile(f"[{CJK}]|[^\\s{CJK}]+")


def words(text):
    return WORD_PATTERN.findall(normalize(text))


def word_precision(pred, ref):
    """
    Fox-style word precision: |words(pred) & words(ref)| as multisets / |words(pred)|. A word predicted twice
    counts twice only if the reference holds it twice. Empty cases: 1.0 when both are empty; 0.0 when only the
    prediction is empty (saying nothing must not score as perfectly precise) or only the reference is.
    """
    pred_words, ref_words = words(pred), words(ref)
    if not pred_words:
        return 1.0 if not ref_words else 0.0
    matched = sum((Counter(pred_words) & Counter(ref_words)).values())
    return matched / len(pred_words)

# -----------------------------------------------------------------------------
# boxes

# an optional <|ref|>label<|/ref|> followed by <|det|>...<|/det|>; a det without a ref gets the label None.
# neither part may run over another markup tag, so one unclosed tag spoils only its own box, not its neighbours'
NO_TAG = r"(?:(?!<\|/?(?:ref|det)\|>).)*?"
GROUNDING_PATTERN = re.compile(rf"(?:<\|ref\|>({NO_TAG})<\|/ref\|>\s*)?<\|det\|>({NO_TAG})<\|/det\|>", re.DOTALL)
INNER_LIST_PATTERN = re.compile(r"\[([^\[\]]*)\]")
NUMBER_PATTERN = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")


def parse_box(text):
    """'x1, y1, x2, y2' -> [x1, y1, x2, y2] as floats, or None when it is not exactly four plain numbers."""
    parts = text.split(",")
    if len(parts) != 4 or not all(NUMBER_PATTERN.fullmatch(p) for p in parts):
        return None
    return [float(p) for p in parts]


def parse_boxes(text):
    """Every box of a grounding answer, in order of appearance, as (label, [x1, y1, x2, y2]). Never raises."""
    boxes = []
    for match in GROUNDING_PATTERN.finditer(text):
        label, det = match.group(1), match.group(2)
        label = label.strip() if label is not None else None
        for inner in INNER_LIST_PATTERN.findall(det):
            box = parse_box(inner)
            if box is not None:
                boxes.append((label, box))
    return boxes


def box_iou(a, b):
    """Intersection over union of two [x1, y1, x2, y2] boxes; 0.0 when either has no area."""
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0 or area_a <= 0 or area_b <= 0:
        return 0.0
    inter = inter_w * inter_h
    return inter / (area_a + area_b - inter)


def label_and_box(item):
    """Boxes come as (label, box) pairs from parse_boxes, or bare [x1, y1, x2, y2] lists (no label)."""
    if len(item) == 2:
        return item[0], item[1]
    assert len(item) == 4, f"expected (label, box) or [x1, y1, x2, y2], got {item!r}"
    return None, item


def match_boxes(pred_boxes, ref_boxes, iou=0.5):
    """
    Greedy one-to-one matching: take candidate pairs from the highest IoU down, keep a pair when neither box is
    already used. A pair is a candidate when its IoU is >= iou (and > 0) and the labels agree (a None label agrees
    with anything). Returns [(pred_index, ref_index, pair_iou)]. Each prediction matches at most one reference, so a
    duplicated prediction counts once.
    """
    preds = [label_and_box(p) for p in pred_boxes]
    refs = [label_and_box(r) for r in ref_boxes]
    candidates = []
    for i, (pred_label, pred_box) in enumerate(preds):
        for j, (ref_label, ref_box) in enumerate(refs):
            if pred_label is not None and ref_label is not None and pred_label != ref_label:
                continue
            pair_iou = box_iou(pred_box, ref_box)
            if pair_iou > 0 and pair_iou >= iou:
                candidates.append((-pair_iou, j, i))  # sort key: best IoU first, ties in a fixed order
    used_preds, used_refs, matches = set(), set(), []
    for neg_iou, j, i in sorted(candidates):
        if i not in used_preds and j not in used_refs:
            used_preds.add(i)
            used_refs.add(j)
            matches.append((i, j, -neg_iou))
    return matches


def detection_rate(pred_boxes, ref_boxes, iou=0.5):
    """Fraction of reference boxes matched by a prediction at IoU >= iou. 1.0 when there are no references."""
    if not ref_boxes:
        return 1.0
    return len(match_boxes(pred_boxes, ref_boxes, iou)) / len(ref_boxes)


def mean_iou(pred_boxes, ref_boxes, iou=0.5):
    """Mean IoU of the pairs matched at IoU >= iou; 0.0 when nothing matched."""
    matches = match_boxes(pred_boxes, ref_boxes, iou)
    return sum(m[2] for m in matches) / len(matches) if matches else 0.0
