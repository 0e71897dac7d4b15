"""The detection head: box utilities, Hungarian matching and each loss against hand arithmetic, masking, gradients,
a toy fit, and the grounding <-> head box conversions."""

import math
import random
import time

import pytest
import torch

from nanovlm import textlines
from nanovlm.detection import (DetHead, DetHeadConfig, boxes_from_predictions, cxcywh_to_xyxy, detection_losses, giou,
                               hungarian_match, match_cost, pad_tokens, reading_order, targets_from_answer,
                               targets_from_boxes, xyxy_to_cxcywh)
from nanovlm.metrics import parse_boxes
from nanovlm.synth import draw_page, grounding_answer

CONFIG = DetHeadConfig(n_queries=3, n_layers=1, n_heads=2, dim=16, vision_dim=8, text_dim=6)

# The hand case: 2 targets, 3 queries, cx, cy, w, h.
#   target 0: centre (0.25, 0.25), 0.2 x 0.2 -> xyxy (0.15, 0.15, 0.35, 0.35)
#   target 1: centre (0.75, 0.75), 0.2 x 0.2 -> xyxy (0.65, 0.65, 0.85, 0.85)
#   query 0: target 1 moved left by 0.05     -> xyxy (0.60, 0.65, 0.80, 0.85), p = sigmoid(ln 3) = 3/4
#   query 1: the page centre, near neither   -> xyxy (0.40, 0.40, 0.60, 0.60), p = sigmoid(-ln 3) = 1/4
#   query 2: target 0 made 0.1 taller        -> xyxy (0.15, 0.10, 0.35, 0.40), p = sigmoid(0) = 1/2
TARGETS = torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]])
PRED_BOXES = torch.tensor([[0.70, 0.75, 0.2, 0.2], [0.50, 0.50, 0.2, 0.2], [0.25, 0.25, 0.2, 0.3]])
PRED_LOGITS = torch.tensor([math.log(3), -math.log(3), 0.0])


@pytest.fixture
def word_list(tmp_path, monkeypatch):
    """Made-up words in place of the system's word list (as tests/test_pages does): pages draw without it."""
    rng = random.Random(0)
    words = sorted({"".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(4))
                    for _ in range(400)})
    (tmp_path / "words").write_text("\n".join(words) + "\n")
    monkeypatch.setattr(textlines, "LEXICON_FILES", [str(tmp_path / "words")])
    textlines.lexicon.cache_clear()
    yield
    textlines.lexicon.cache_clear()


def close(a, b, tol=1e-5):
    return abs(float(a) - float(b)) < tol


def test_box_conversions_round_trip():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    assert torch.allclose(cxcywh_to_xyxy(boxes), torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.8, 0.2, 1.0]]))
    assert torch.allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(boxes)), boxes)


def test_giou_by_hand():
    a = torch.tensor([0.0, 0.0, 2.0, 2.0])
    assert close(giou(a, a), 1.0)  # identical boxes
    # half-overlapping: inter 1 x 2 = 2, union 4 + 4 - 2 = 6, hull 3 x 2 = 6 -> IoU 1/3, nothing outside: 1/3
    assert close(giou(a, torch.tensor([1.0, 0.0, 3.0, 2.0])), 1 / 3)
    # disjoint: [0, 2]^2 and [3, 5] x [0, 2]: inter 0, union 8, hull 5 x 2 = 10 -> 0 - (10 - 8) / 10 = -0.2
    assert close(giou(a, torch.tensor([3.0, 0.0, 5.0, 2.0])), -0.2)
    # far apart corners: [0, 2]^2 and [8, 10]^2: hull 100, union 8 -> -(100 - 8) / 100 = -0.92, towards -1
    assert close(giou(a, torch.tensor([8.0, 8.0, 10.0, 10.0])), -0.92)
    # broadcasting gives the pairwise matrix, each entry the pair's own value
    pairs = giou(torch.stack([a, a])[:, None], torch.tensor([[0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 5.0, 2.0]])[None])
    assert torch.allclose(pairs, torch.tensor([[1.0, -0.2], [1.0, -0.2]]), atol=1e-6)


def test_giou_matches_torchvision():
    ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(0)
    a = cxcywh_to_xyxy(torch.rand(5, 4) * 0.5 + 0.1)
    b = cxcywh_to_xyxy(torch.rand(7, 4) * 0.5 + 0.1)
    assert torch.allclose(giou(a[:, None], b[None]), ops.generalized_box_iou(a, b), atol=1e-5)


def test_match_cost_and_assignment_by_hand():
    # L1 over (cx, cy, w, h):       target 0                          target 1
    #   query 0:   |.70-.25| + |.75-.25|       = .95     |.70-.75|                     = .05
    #   query 1:   .25 + .25                   = .50     .25 + .25                     = .50
    #   query 2:   |.3-.2| (height)            = .10     .5 + .5 + |.3-.2|             = 1.1
    # GIoU:
    #   q0, t1: inter (.80-.65) x .2 = .03, union .04 + .04 - .03 = .05, hull (.85-.60) x .2 = .05 -> .6
    #   q2, t0: t0 lies inside q2: inter .04, union .06 = hull -> 2/3
    #   q1, t0: disjoint, union .08, hull (.60-.15)^2 = .2025 -> -(.2025 - .08) / .2025
    cost = match_cost(PRED_BOXES, PRED_LOGITS, TARGETS, CONFIG)
    w_obj, w_l1, w_giou = CONFIG.obj_weight, CONFIG.l1_weight, CONFIG.giou_weight
    assert close(cost[0, 1], -w_obj * 0.75 + w_l1 * 0.05 - w_giou * 0.6)
    assert close(cost[2, 0], -w_obj * 0.5 + w_l1 * 0.10 - w_giou * 2 / 3)
    assert close(cost[1, 0], -w_obj * 0.25 + w_l1 * 0.50 - w_giou * -(0.2025 - 0.08) / 0.2025)
    # the least total: query 0 -> target 1, query 2 -> target 0; query 1 stays empty
    (queries, targets), = hungarian_match(PRED_BOXES[None], PRED_LOGITS[None], [TARGETS], CONFIG)
    assert dict(zip(queries.tolist(), targets.tolist())) == {0: 1, 2: 0}


def test_matching_is_global_and_uses_objectness():
    # cx alone differs (L1 only in this cost). Greedy, target by target, gives target 0 (cx .5) its nearest
    # query 0 (cx .45, cost .05) and leaves target 1 (cx .4) query 1 (cx .9, cost .5): .55 in all. The global
    # optimum swaps them: target 0 <- query 1 (.4) and target 1 <- query 0 (.05), .45 in all
    config = DetHeadConfig(l1_weight=1.0, giou_weight=0.0, obj_weight=0.0)
    targets = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.5, 0.2, 0.2]])
    preds = torch.tensor([[0.45, 0.5, 0.2, 0.2], [0.9, 0.5, 0.2, 0.2]])
    (q, t), = hungarian_match(preds[None], torch.zeros(1, 2), [targets], config)
    assert dict(zip(q.tolist(), t.tolist())) == {1: 0, 0: 1}
    # two queries on the same box: the more confident one takes it
    preds = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
    (q, t), = hungarian_match(preds[None], torch.tensor([[-2.0, 2.0]]), [targets[:1]], CONFIG)
    assert q.tolist() == [1] and t.tolist() == [0]


def test_each_loss_by_hand():
    out = dict(boxes=PRED_BOXES[None], logits=PRED_LOGITS[None])
    losses = detection_losses(out, [TARGETS], CONFIG)
    num_boxes = 2
    # matched pairs (q0, t1) and (q2, t0): L1 .05 and .10, GIoU .6 and 2/3
    assert close(losses["det_l1"], (0.05 + 0.10) / num_boxes)
    assert close(losses["det_giou"], ((1 - 0.6) + (1 - 2 / 3)) / num_boxes)
    # focal, alpha .25, gamma 2: positive -alpha (1-p)^2 ln p, negative -(1-alpha) p^2 ln(1-p)
    #   q0 matched,   p = 3/4: .25 * (1/4)^2 * -ln(3/4)
    #   q1 unmatched, p = 1/4: .75 * (1/4)^2 * -ln(3/4)
    #   q2 matched,   p = 1/2: .25 * (1/2)^2 * ln 2
    focal = 0.25 * 0.0625 * -math.log(0.75) + 0.75 * 0.0625 * -math.log(0.75) + 0.25 * 0.25 * math.log(2)
    assert close(losses["det_obj"], focal / num_boxes)
    total = 5.0 * (0.15 / 2) + 2.0 * ((0.4 + 1 / 3) / 2) + 2.0 * (focal / 2)
    assert close(losses["det_total"], total)
    assert set(losses) == {"det_l1", "det_giou", "det_obj", "det_total"}


def test_zero_targets():
    out = dict(boxes=PRED_BOXES[None], logits=PRED_LOGITS[None])
    (q, t), = hungarian_match(out["boxes"], out["logits"], [torch.zeros(0, 4)], CONFIG)
    assert q.numel() == 0 and t.numel() == 0
    losses = detection_losses(out, [torch.zeros(0, 4)], CONFIG)
    assert losses["det_l1"].item() == 0 and losses["det_giou"].item() == 0
    # every query is a negative, and num_boxes is at least 1: .75 p^2 -ln(1-p) summed
    focal = sum(0.75 * p ** 2 * -math.log(1 - p) for p in (0.75, 0.25, 0.5))
    assert close(losses["det_obj"], focal)
    # an empty image beside the hand case adds its three negatives to the focal sum, and num_boxes stays 2
    both = dict(boxes=torch.stack([PRED_BOXES, PRED_BOXES]), logits=torch.stack([PRED_LOGITS, PRED_LOGITS]))
    losses2 = detection_losses(both, [TARGETS, torch.zeros(0, 4)], CONFIG)
    alone = detection_losses(out, [TARGETS], CONFIG)
    assert close(losses2["det_l1"], alone["det_l1"]) and close(losses2["det_giou"], alone["det_giou"])
    assert close(losses2["det_obj"], alone["det_obj"] + focal / 2)


def test_more_targets_than_queries():
    targets = torch.rand(5, 4) * 0.5 + 0.2
    (q, t), = hungarian_match(PRED_BOXES[None], PRED_LOGITS[None], [targets], CONFIG)
    assert len(q) == 3 and len(set(t.tolist())) == 3
    assert torch.isfinite(detection_losses(dict(boxes=PRED_BOXES[None], logits=PRED_LOGITS[None]), [targets],
                                           CONFIG)["det_total"])


def memory(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    vision = torch.randn(batch, 10, CONFIG.vision_dim, generator=g)
    vision_mask = torch.ones(batch, 10, dtype=torch.bool)
    vision_mask[1, 7:] = False  # the second image has 7 tokens
    text = torch.randn(batch, 5, CONFIG.text_dim, generator=g)
    text_mask = torch.ones(batch, 5, dtype=torch.bool)
    text_mask[0, 3:] = False
    return vision, vision_mask, text, text_mask


def test_forward_shapes_and_padding_is_ignored(one_thread):
    torch.manual_seed(0)
    head = DetHead(CONFIG).eval()
    vision, vision_mask, text, text_mask = memory()
    out = head(vision, vision_mask, text, text_mask)
    assert out["boxes"].shape == (2, 3, 4) and out["logits"].shape == (2, 3)
    assert ((out["boxes"] > 0) & (out["boxes"] < 1)).all()
    # a fresh head says "almost surely empty" (the focal prior, p = 0.01): the logits start near -4.6
    assert (out["logits"].sigmoid() < 0.1).all()
    # padded positions do not change the output
    vision2, text2 = vision.clone(), text.clone()
    vision2[1, 7:] = 100.0
    text2[0, 3:] = -100.0
    again = head(vision2, vision_mask, text2, text_mask)
    assert torch.allclose(out["boxes"], again["boxes"], atol=1e-6)
    assert torch.allclose(out["logits"], again["logits"], atol=1e-6)
    # the text part is optional, and it matters when given
    alone = head(vision, vision_mask)
    assert alone["boxes"].shape == (2, 3, 4) and not torch.allclose(alone["boxes"], out["boxes"])
    # bf16 inputs (the model around the head under autocast) are taken in the head's dtype
    assert head(vision.bfloat16(), vision_mask, text.bfloat16(), text_mask)["boxes"].dtype == torch.float32


def test_pad_tokens():
    padded, mask = pad_tokens([torch.ones(3, 4), torch.ones(5, 4) * 2])
    assert padded.shape == (2, 5, 4) and mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert padded[0, 3:].abs().sum() == 0 and (padded[1] == 2).all()


def test_gradients_reach_every_part(one_thread):
    torch.manual_seed(0)
    head = DetHead(CONFIG)
    vision, vision_mask, text, text_mask = memory()
    losses = detection_losses(head(vision, vision_mask, text, text_mask), [TARGETS, TARGETS[:1]], CONFIG)
    losses["det_total"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    parts = ["queries", "layers.0.self_attn.in_proj_weight", "layers.0.cross_attn.in_proj_weight",
             "layers.0.mlp.0.weight", "vision_proj.weight", "text_adapter.weight", "box_head.4.weight", "obj_head.bias"]
    named = dict(head.named_parameters())
    assert all(named[part].grad.abs().sum() > 0 for part in parts)


def test_fits_a_toy_problem(one_thread):
    # fixed random memories, fixed boxes per image: the head must learn where each image's boxes are
    torch.manual_seed(0)
    config = DetHeadConfig(n_queries=6, n_layers=2, n_heads=2, dim=32, vision_dim=8, text_dim=6)
    head = DetHead(config)
    vision, vision_mask, text, text_mask = memory(seed=1)
    targets = [targets_from_boxes([[100, 100, 400, 200], [500, 600, 900, 700], [100, 800, 300, 950]]),
               targets_from_boxes([[200, 300, 800, 400]])]
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(200):
        losses = detection_losses(head(vision, vision_mask, text, text_mask), targets, config)
        if step == 0:
            first = {k: v.item() for k, v in losses.items()}
        optimizer.zero_grad()
        losses["det_total"].backward()
        optimizer.step()
    last = {k: v.item() for k, v in losses.items()}
    assert time.time() - t0 < 30
    # measured: total 9.5 -> 0.42, L1 0.99 -> 0.025, GIoU 1.17 -> 0.14, objectness 1.09 -> 0.003
    assert last["det_total"] < first["det_total"] / 10, (first, last)
    assert all(last[k] < first[k] / 5 for k in ("det_l1", "det_giou", "det_obj")), (first, last)
    head.eval()
    with torch.no_grad():
        out = head(vision, vision_mask, text, text_mask)
    # the fitted head finds exactly the target boxes, in reading order, each coordinate within 30 of 0-999 (3% of
    # the page; 12 to 20 measured over four seeds)
    for i, want in enumerate([[[100, 100, 400, 200], [500, 600, 900, 700], [100, 800, 300, 950]],
                              [[200, 300, 800, 400]]]):
        found = boxes_from_predictions(out["boxes"][i], out["logits"][i])
        assert len(found) == len(want)
        assert all(abs(a - b) <= 30 for f, w in zip(found, want) for a, b in zip(f, w)), (found, want)


def test_targets_from_grounding_answer():
    answer = ("<|ref|>Hello<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\n"
              "<|ref|>world<|/ref|><|det|>[[899, 400, 99, 600]]<|/det|>")  # corners swapped: put back in order
    t = targets_from_answer(answer)
    assert torch.allclose(t, torch.tensor([[0.5, 0.5, 1.0, 1.0], [499 / 999, 500 / 999, 800 / 999, 200 / 999]]))
    assert targets_from_answer("no boxes here").shape == (0, 4)
    assert targets_from_boxes([[0, 0, 2000, 500]])[0, 2].item() == 1.0  # past the page: clamped to it


def test_reading_order_and_back_to_grounding():
    # one line in two boxes, the right one's top 4 units lower; a second line; a box under the threshold
    lines = [[500, 104, 900, 140], [100, 100, 450, 138], [100, 200, 900, 240]]
    assert reading_order(lines) == [[100, 100, 450, 138], [500, 104, 900, 140], [100, 200, 900, 240]]
    boxes = torch.cat([targets_from_boxes(lines), targets_from_boxes([[0, 500, 999, 600]])])
    logits = torch.tensor([3.0, 2.0, 1.0, -1.0])  # p = .95, .88, .73, .27
    assert boxes_from_predictions(boxes, logits) == [[100, 100, 450, 138], [500, 104, 900, 140],
                                                     [100, 200, 900, 240]]
    assert boxes_from_predictions(boxes, logits, threshold=0.9) == [[500, 104, 900, 140]]
    assert boxes_from_predictions(boxes, torch.full((4,), -5.0)) == []


def in_reading_order(boxes):
    """The page answers' rule (tests/test_pages): each box below the one before (its centre lower) or wholly to
    its right."""
    return all((b[1] + b[3]) / 2 > (a[1] + a[3]) / 2 or b[0] >= a[2] for a, b in zip(boxes, boxes[1:]))


def test_reading_order_reads_the_left_column_before_the_right_one():
    # a heading across the page, two columns whose lines sit side by side, a line across the page under both
    heading = [200, 40, 800, 80]
    left = [[50, 120 + 60 * k, 460, 150 + 60 * k] for k in range(4)]
    right = [[520, 122 + 60 * k, 950, 150 + 60 * k] for k in range(3)]
    footer = [50, 400, 950, 430]
    page = [heading] + left + right + [footer]
    assert in_reading_order(page)
    for seed in range(5):
        shuffled = page[:]
        random.Random(seed).shuffle(shuffled)
        assert reading_order(shuffled) == page
    # row by row (what a sort by height gives) interleaves the columns; it keeps the rule too, so the rule alone
    # does not say which: the answers read a column to its end
    assert sorted(page, key=lambda b: (b[1], b[0]))[1:4] == [left[0], right[0], left[1]]
    # a receipt's items and right-aligned prices are rows, not columns: the prices are too narrow for a column
    receipt = [box for k in range(4) for box in ([100, 100 + 50 * k, 500, 130 + 50 * k],
                                                 [820 + 10 * (k % 2), 100 + 50 * k, 900, 130 + 50 * k])]
    assert reading_order(receipt[::-1]) == receipt
    # a centred heading over two columns stays above them (a column needs two lines side by side with the other)
    centred = [430, 20, 530, 60]
    assert reading_order([centred] + page[1:])[0] == centred


def test_reading_order_of_drawn_pages_is_their_answers(word_list):
    """Synthetic pages (kind `page`: running text, two columns, receipts): the lines of the answer, shuffled, come
    back in the answer's order."""
    layouts = set()
    for index in range(30):
        image, lines, page = draw_page(random.Random(index), "train")
        boxes = [box for _, box in parse_boxes(grounding_answer(lines, image.width, image.height))]
        shuffled = boxes[:]
        random.Random(index).shuffle(shuffled)
        assert reading_order(shuffled) == boxes, (index, page["layout"])
        layouts.add(page["layout"])
    assert layouts == {"text", "columns", "receipt"}
