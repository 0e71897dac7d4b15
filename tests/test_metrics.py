"""Metrics on hand-worked examples."""

import random

import pytest

from nanovlm.metrics import (box_iou, cer, detection_rate, edit_distance, match_boxes, mean_iou, ned, parse_boxes,
                             word_precision, words)


def slow_edit_distance(a, b):
    # the textbook full-table recurrence, as a reference for the vectorized one
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[-1][-1]

# -----------------------------------------------------------------------------
# edit distance, CER, NED


def test_edit_distance_hand_worked():
    assert edit_distance("kitten", "sitting") == 3  # k->s, e->i, +g
    assert edit_distance("flaw", "lawn") == 2  # -f, +n
    assert edit_distance("", "abc") == 3
    assert edit_distance("abc", "") == 3
    assert edit_distance("", "") == 0
    assert edit_distance("same", "same") == 0


def test_edit_distance_matches_textbook_recurrence():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 12)))
        assert edit_distance(a, b) == slow_edit_distance(a, b), (a, b)


def test_edit_distance_on_long_strings():
    rng = random.Random(0)
    a = "".join(rng.choice("abcdef ") for _ in range(300))
    b = "".join(rng.choice("abcdef ") for _ in range(260))
    assert edit_distance(a, b) == slow_edit_distance(a, b)
    assert edit_distance(a * 10, a * 10) == 0 and edit_distance(a * 10, "") == 3000


def test_cer():
    assert cer("kitten", "sitting") == pytest.approx(3 / 7)
    assert cer("total 12.50", "total 12.50") == 0.0
    assert cer("", "abcd") == 1.0  # four deletions over four characters
    assert cer("abcdabcd", "abcd") == 1.0  # four insertions
    assert cer("xxxxxxxxxx", "ab") == 5.0  # CER is not capped at 1 when the reference is non-empty


def test_cer_empty_reference():
    assert cer("", "") == 0.0
    assert cer("anything", "") == 1.0


def test_ned():
    assert ned("kitten", "sitting") == pytest.approx(3 / 7)
    assert ned("xxxxxxxxxx", "ab") == 1.0  # bounded by the longer string
    assert ned("", "") == 0.0
    assert ned("", "abc") == 1.0
    assert ned("abc", "") == 1.0


def test_unicode_counts_code_points_after_nfc():
    # precomposed é vs e + combining acute: the same text after NFC
    assert cer("caf\u00e9", "cafe\u0301") == 0.0
    assert cer("cafe", "caf\u00e9") == pytest.approx(1 / 4)
    # a combining mark with no precomposed form stays its own code point: q + U+0307 is two characters
    assert edit_distance("q\u0307", "q") == 1
    # CJK and emoji are one code point each
    assert cer("東京都", "東京府") == pytest.approx(1 / 3)
    assert cer("price 🍕", "price 🍔") == pytest.approx(1 / 7)
    assert ned("🍕🍕", "🍕") == pytest.approx(1 / 2)

# -----------------------------------------------------------------------------
# word precision


def test_word_precision_hand_worked():
    assert word_precision("the cat sat", "the cat sat on the mat") == 1.0
    assert word_precision("the dog sat", "the cat sat") == pytest.approx(2 / 3)
    # multiplicity: "the" is predicted three times but the reference holds it twice, so 2 + 1 ("cat") of 4 match
    assert word_precision("the the the cat", "the cat the") == pytest.approx(3 / 4)
    assert word_precision("a b", "b a") == 1.0  # order does not matter


def test_word_precision_empty_cases():
    assert word_precision("", "") == 1.0
    assert word_precision("", "some words") == 0.0
    assert word_precision("   ", "some words") == 0.0  # whitespace only is empty
    assert word_precision("some words", "") == 0.0


def test_words_split_cjk_per_character():
    assert words("総額 1,200円 paid") == ["総", "額", "1,200", "円", "paid"]
    assert word_precision("東京都", "東京府") == pytest.approx(2 / 3)
    assert word_precision("coffee ☕ 3.50", "coffee ☕ 3.50") == 1.0

# -----------------------------------------------------------------------------
# box parsing


def test_parse_boxes_several_refs_and_boxes():
    text = ("<|ref|>TOTAL<|/ref|><|det|>[[10, 20, 110, 60]]<|/det|>\n"
            "<|ref|>apple<|/ref|><|det|>[[1, 2, 3, 4], [5.5, 6, 7, 8]]<|/det|>")
    assert parse_boxes(text) == [("TOTAL", [10, 20, 110, 60]), ("apple", [1, 2, 3, 4]), ("apple", [5.5, 6, 7, 8])]


def test_parse_boxes_det_without_ref_has_no_label():
    assert parse_boxes("<|det|>[[0, 0, 999, 999]]<|/det|>") == [(None, [0, 0, 999, 999])]


def test_parse_boxes_skips_malformed_text():
    assert parse_boxes("") == []
    assert parse_boxes("no boxes here") == []
    assert parse_boxes("<|ref|>a<|/ref|><|det|>[[1, 2, 3]]<|/det|>") == []  # three numbers
    assert parse_boxes("<|ref|>a<|/ref|><|det|>[[1, 2, x, 4]]<|/det|>") == []  # not a number
    assert parse_boxes("<|ref|>a<|/ref|><|det|>[[nan, 2, 3, 4]]<|/det|>") == []
    assert parse_boxes("<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]]") == []  # unclosed det
    assert parse_boxes("<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4], [5, 6]]<|/det|>") == [("a", [1, 2, 3, 4])]
    # an unclosed det spoils its own box only, not the next ref's
    text = "<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]<|ref|>b<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>"
    assert parse_boxes(text) == [("b", [5, 6, 7, 8])]
    # a ref with no det, then a good one: the label does not swallow the first ref
    text = "<|ref|>a<|/ref|> junk <|ref|>b<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>"
    assert parse_boxes(text) == [("b", [5, 6, 7, 8])]
    for garbage in ["<|det|>[[[[<|/det|>", "<|ref|><|det|><|/det|>", "<|det|>]]]][[<|/det|>", "[[1,2,3,4]]"]:
        assert parse_boxes(garbage) == []

# -----------------------------------------------------------------------------
# IoU and detection


def test_box_iou():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([0, 0, 10, 10], [2, 2, 4, 4]) == pytest.approx(4 / 100)  # contained
    assert box_iou([5, 5, 5, 9], [0, 0, 10, 10]) == 0.0  # no area


def test_detection_rate_boxes_in_any_order():
    refs = [("a", [0, 0, 10, 10]), ("b", [20, 0, 30, 10]), ("c", [40, 0, 50, 10])]
    preds = [("c", [40, 0, 50, 10]), ("a", [1, 0, 10, 10]), ("b", [20, 0, 30, 10])]
    assert detection_rate(preds, refs) == 1.0
    assert detection_rate(preds[::-1], refs[::-1]) == 1.0
    assert mean_iou(preds, refs) == pytest.approx((1 + 0.9 + 1) / 3)


def test_detection_rate_duplicate_predictions_count_once():
    refs = [("a", [0, 0, 10, 10]), ("a", [100, 100, 110, 110])]
    preds = [("a", [0, 0, 10, 10])] * 3
    assert detection_rate(preds, refs) == 0.5
    assert len(match_boxes(preds, refs)) == 1


def test_detection_rate_labels_and_threshold():
    refs = [("apple", [0, 0, 10, 10])]
    assert detection_rate([("pear", [0, 0, 10, 10])], refs) == 0.0  # right place, wrong label
    assert detection_rate([(None, [0, 0, 10, 10])], refs) == 1.0  # no label: position alone decides
    assert detection_rate([[0, 0, 10, 10]], refs) == 1.0  # bare boxes work too
    half = [("apple", [5, 0, 15, 10])]  # IoU 1/3
    assert detection_rate(half, refs) == 0.0
    assert detection_rate(half, refs, iou=0.3) == 1.0
    assert mean_iou(half, refs) == 0.0
    assert mean_iou(half, refs, iou=0.3) == pytest.approx(1 / 3)


def test_greedy_matching_takes_the_best_pairs_first():
    # the first prediction overlaps both references (IoU 7/13 with A, 9/11 with B); the second is exactly B.
    # matching each prediction to its own best in list order would give B to the first and leave one match;
    # taking the globally best pair first gives B to the second and A to the first
    refs = [("A", [0, 0, 10, 10]), ("B", [4, 0, 14, 10])]
    preds = [[3, 0, 13, 10], [4, 0, 14, 10]]
    assert sorted((i, j) for i, j, _ in match_boxes(preds, refs)) == [(0, 0), (1, 1)]
    assert detection_rate(preds, refs) == 1.0
    assert mean_iou(preds, refs) == pytest.approx((7 / 13 + 1) / 2)


def test_detection_rate_empty_cases():
    assert detection_rate([], [("a", [0, 0, 10, 10])]) == 0.0
    assert detection_rate([("a", [0, 0, 10, 10])], []) == 1.0
    assert detection_rate([], []) == 1.0
    assert mean_iou([], []) == 0.0


def test_end_to_end_from_text():
    ref = "<|ref|>milk<|/ref|><|det|>[[10, 10, 100, 50]]<|/det|><|ref|>bread<|/ref|><|det|>[[10, 60, 100, 90]]<|/det|>"
    pred = "<|ref|>bread<|/ref|><|det|>[[10, 60, 100, 90]]<|/det|><|ref|>milk<|/ref|><|det|>[[10, 10, oops]]<|/det|>"
    assert detection_rate(parse_boxes(pred), parse_boxes(ref)) == 0.5  # malformed box: a miss, not a crash
