"""
A DETR-style detection head (Carion et al. 2020): a fixed set of learned object queries reads the image's vision
tokens and the GPT's last hidden states through a small transformer decoder; each query says where a box is
(cx, cy, w, h, relative to the image) and whether it holds an object at all (one objectness logit). Training
matches queries to the target boxes one-to-one (Hungarian matching on DETR's cost), then scores the matched
boxes with L1 + GIoU and every query's objectness with a sigmoid focal loss (matched = 1, unmatched = 0).

    head = DetHead(DetHeadConfig(vision_dim=1280, text_dim=1280))
    out = head(vision_tokens, vision_mask, text_hidden, text_mask)   # dict(boxes=(B, Q, 4), logits=(B, Q))
    losses = detection_losses(out, [targets_from_answer(a) for a in answers], head.config)
    losses["det_total"].backward()                                   # det_l1, det_giou, det_obj are for the log
    lines = boxes_from_predictions(out["boxes"][0], out["logits"][0])  # 0-999 x1, y1, x2, y2 in reading order

Page OCR: the targets are the text lines' boxes of a grounding answer (0-999 x1, y1, x2, y2, as DeepSeek-OCR
writes them), so the head finds every line and the GPT reads them.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from nanovlm.metrics import parse_boxes


@dataclass
class DetHeadConfig:
    n_queries: int = 100  # DETR's; the most boxes one image can get (a dense page has fewer text lines than this)
    n_layers: int = 3  # DETR uses 6; the memory here is already deep features, a small decoder is enough to start
    n_heads: int = 8
    dim: int = 256
    vision_dim: int = 1280  # the encoder's out_dim (= the GPT's n_embd)
    text_dim: int = 1280  # the GPT's n_embd
    # loss weights, also the matching cost's (DETR matches on the same terms it trains on). L1 5 and GIoU 2 are
    # DETR's; objectness 2 is Deformable DETR's for the sigmoid focal loss, whose values (easy queries are
    # down-weighted by (1 - p_t)^gamma) run smaller than DETR's cross-entropy, weighted 1
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    obj_weight: float = 2.0
    focal_alpha: float = 0.25  # RetinaNet's: positives weigh 0.25, negatives 0.75
    focal_gamma: float = 2.0
    obj_prior: float = 0.01  # initial objectness: almost every query is empty, so start every p there (RetinaNet)

# -----------------------------------------------------------------------------
# Boxes: (cx, cy, w, h) is what the head predicts, (x1, y1, x2, y2) is what IoU and grounding answers use


def cxcywh_to_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes):
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def giou(a, b, eps=1e-7):
    """
    Generalized IoU (Rezatofighi et al. 2019) of xyxy boxes a and b, broadcasting over leading dims:
    giou(a, b) for matched pairs, giou(a[:, None], b[None]) for all pairs. IoU minus the share of the smallest
    enclosing box that neither box covers: in [-1, 1], and unlike IoU it still has a gradient for disjoint boxes.
    eps keeps zero-area boxes (a sigmoid width that underflows) finite.
    """
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter_w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    inter_h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = inter_w * inter_h
    union = area_a + area_b - inter
    hull_w = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    hull_h = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    hull = hull_w * hull_h
    return inter / (union + eps) - (hull - union) / (hull + eps)

# -----------------------------------------------------------------------------
# The head


def norm(x):
    # the two memories (encoder features, GPT hidden states) come at different scales that drift in training:
    # a parameter-free RMSNorm (nanochat's) puts both on one footing before their projections
    return F.rms_norm(x, (x.size(-1),))


class DecoderLayer(nn.Module):
    """Pre-LN DETR decoder layer: queries attend to each other (so two queries learn not to claim one box), then
    to the memory, then an MLP. The object queries are positional embeddings added to the attention queries (and
    the self-attention keys) at every layer, as in DETR."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, query_pos, memory, memory_padding):
        h = self.norm1(x)
        q = h + query_pos
        x = x + self.self_attn(q, q, h, need_weights=False)[0]
        h = self.norm2(x)
        x = x + self.cross_attn(h + query_pos, memory, memory, key_padding_mask=memory_padding, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


class DetHead(nn.Module):
    """
    Object queries -> decoder over memory = [vision tokens projected to dim; GPT hidden states through an adapter]
    -> a box (sigmoid cx, cy, w, h) and an objectness logit per query. Unlike DETR over a CNN, the memory gets no
    positional encoding here: DeepEncoder's tokens already carry where they are (SAM and CLIP add absolute position
    embeddings), and the head does not know each image mode's token layout (tiles, newlines, separators).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        self.queries = nn.Parameter(torch.randn(c.n_queries, c.dim))  # DETR's nn.Embedding init, N(0, 1)
        self.vision_proj = nn.Linear(c.vision_dim, c.dim)
        self.text_adapter = nn.Linear(c.text_dim, c.dim)
        self.layers = nn.ModuleList(DecoderLayer(c.dim, c.n_heads) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.dim)
        self.box_head = nn.Sequential(nn.Linear(c.dim, c.dim), nn.ReLU(), nn.Linear(c.dim, c.dim), nn.ReLU(),
                                      nn.Linear(c.dim, 4))  # DETR's 3-layer box MLP
        self.obj_head = nn.Linear(c.dim, 1)
        with torch.no_grad():
            self.obj_head.bias.fill_(-math.log((1 - c.obj_prior) / c.obj_prior))

    def forward(self, vision_tokens, vision_mask, text_hidden=None, text_mask=None):
        """
        vision_tokens (B, Nv, vision_dim) with vision_mask (B, Nv), True at real tokens (images give different
        numbers of tokens: pad_tokens pads them); text_hidden (B, T, text_dim) with text_mask (B, T), or None for
        the image alone. Each sample needs at least one real token. Returns dict(boxes=(B, Q, 4) cx, cy, w, h in
        [0, 1] of the image, logits=(B, Q) objectness logits).
        """
        dtype = self.vision_proj.weight.dtype  # the inputs may be bf16 activations of the model around the head
        memory, mask = [self.vision_proj(norm(vision_tokens.to(dtype)))], [vision_mask]
        if text_hidden is not None:
            memory.append(self.text_adapter(norm(text_hidden.to(dtype))))
            mask.append(text_mask if text_mask is not None else torch.ones(text_hidden.shape[:2], dtype=torch.bool,
                                                                           device=text_hidden.device))
        memory, padding = torch.cat(memory, dim=1), ~torch.cat(mask, dim=1).bool()
        query_pos = self.queries.unsqueeze(0).expand(memory.size(0), -1, -1)
        # the content starts at the queries too: DETR starts it at zero, which gives the first layer's
        # self-attention Q identical vectors to look at (and its first LayerNorm nothing to learn)
        x = query_pos
        for layer in self.layers:
            x = layer(x, query_pos, memory, padding)
        x = self.norm(x)
        return dict(boxes=self.box_head(x).sigmoid(), logits=self.obj_head(x).squeeze(-1))


def pad_tokens(sequences):
    """A list of (N_i, D) sequences (e.g. encoder.encode_images' per-image features) -> (B, max N_i, D) padded
    with zeros, and the (B, max N_i) mask that is True at real tokens."""
    padded = nn.utils.rnn.pad_sequence(list(sequences), batch_first=True)
    lengths = torch.tensor([len(s) for s in sequences], device=padded.device)
    return padded, torch.arange(padded.size(1), device=padded.device) < lengths[:, None]

# -----------------------------------------------------------------------------
# Matching and losses


@torch.no_grad()
def match_cost(pred_boxes, pred_logits, target_boxes, config):
    """
    DETR's matching cost of one sample, (Q, T): obj_weight * -p(object) + l1_weight * L1 + giou_weight * -GIoU.
    A query is a cheap match for a target when it is confident, close in cx, cy, w, h and overlapping.
    """
    prob = pred_logits.float().sigmoid()
    l1 = torch.cdist(pred_boxes.float(), target_boxes.float(), p=1)
    overlap = giou(cxcywh_to_xyxy(pred_boxes.float())[:, None], cxcywh_to_xyxy(target_boxes.float())[None])
    return -config.obj_weight * prob[:, None] + config.l1_weight * l1 - config.giou_weight * overlap


def hungarian_match(pred_boxes, pred_logits, target_boxes, config):
    """
    The one-to-one assignment of queries to targets with the least total match_cost, per sample (scipy's
    linear_sum_assignment). pred_boxes (B, Q, 4), pred_logits (B, Q), target_boxes a list of B (T_i, 4) tensors,
    all cx, cy, w, h. Returns a list of B (query_idx, target_idx) long tensor pairs, min(Q, T_i) long (a sample
    with more targets than queries leaves its costliest targets unmatched).
    """
    matches = []
    for boxes, logits, targets in zip(pred_boxes, pred_logits, target_boxes):
        if len(targets) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
            matches.append((empty, empty))
            continue
        # NaN predictions would make scipy raise; let them through to a NaN loss, which training skips
        cost = torch.nan_to_num(match_cost(boxes, logits, targets.to(boxes.device), config), nan=1e6)
        query_idx, target_idx = linear_sum_assignment(cost.cpu().numpy())
        matches.append((torch.as_tensor(query_idx, dtype=torch.long, device=boxes.device),
                        torch.as_tensor(target_idx, dtype=torch.long, device=boxes.device)))
    return matches


def sigmoid_focal_loss(logits, targets, alpha, gamma):
    """Per-element focal loss (Lin et al. 2017): BCE scaled by (1 - p_t)^gamma, so the many easy empty queries
    weigh little, and by alpha_t (alpha for positives, 1 - alpha for negatives)."""
    p = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * bce


def detection_losses(out, targets, config):
    """
    out: the head's dict(boxes=(B, Q, 4), logits=(B, Q)); targets: a list of B (T_i, 4) cx, cy, w, h tensors in
    [0, 1] (targets_from_boxes). Returns scalar losses: det_l1 (sum of |dcx| + |dcy| + |dw| + |dh|), det_giou
    (sum of 1 - GIoU), det_obj (focal loss summed over every query), each divided by the number of matched boxes
    in the batch (at least 1; DETR's num_boxes, RetinaNet's for the focal sum: the scale of a loss then does not
    depend on the number of queries or images), and det_total, their weighted sum.
    """
    boxes, logits = out["boxes"].float(), out["logits"].float()
    matches = hungarian_match(boxes, logits, targets, config)
    batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)])
    query_idx = torch.cat([q for q, _ in matches])
    matched = boxes[batch_idx, query_idx]
    wanted = torch.cat([t.to(boxes.device).float()[j] for t, (_, j) in zip(targets, matches)]).reshape(-1, 4)
    num_boxes = max(len(query_idx), 1)
    l1 = (matched - wanted).abs().sum() / num_boxes
    overlap = (1 - giou(cxcywh_to_xyxy(matched), cxcywh_to_xyxy(wanted))).sum() / num_boxes
    is_object = torch.zeros_like(logits)
    is_object[batch_idx, query_idx] = 1.0
    obj = sigmoid_focal_loss(logits, is_object, config.focal_alpha, config.focal_gamma).sum() / num_boxes
    total = config.l1_weight * l1 + config.giou_weight * overlap + config.obj_weight * obj
    return dict(det_l1=l1, det_giou=overlap, det_obj=obj, det_total=total)

# -----------------------------------------------------------------------------
# Grounding answers (0-999 x1, y1, x2, y2 integers, DeepSeek-OCR's) <-> the head's boxes


def targets_from_boxes(boxes):
    """[[x1, y1, x2, y2], ...] in 0-999 -> (T, 4) cx, cy, w, h in [0, 1]. Corners are put in order and clamped
    (a generated answer may swap them or run past the page)."""
    t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4).clamp(0, 999) / 999
    t = torch.cat([torch.minimum(t[:, :2], t[:, 2:]), torch.maximum(t[:, :2], t[:, 2:])], dim=1)
    return xyxy_to_cxcywh(t)


def targets_from_answer(answer):
    """Every box of a grounding answer (metrics.parse_boxes), as targets_from_boxes."""
    return targets_from_boxes([box for _, box in parse_boxes(answer)])


# a text column spans at least this share of its block's width: two or three columns do, a table's narrow cells (a
# receipt's prices, 12-21% of it) do not, so a receipt reads row by row as its answer does
COLUMN_SHARE = 0.25


def reading_order(boxes):
    """
    xyxy boxes (y down) in the page answers' reading order (synth's `page` kinds): blocks from top to bottom, a
    two-column block's whole left column before its right column, the boxes of one row from left to right; so
    every box lies below the one before it or wholly to its right. The boxes are cut into bands at the heights no
    box spans. A column block is the longest run of bands from the current one that a vertical gap splits into two
    columns (column_split) with lines of both side by side in some band: its left side, then its right side, each
    read the same way. Any other band is one row, or a few (row_order).
    """
    rows = bands(boxes)
    order, i = [], 0
    while i < len(rows):
        block = None
        for j in range(i + 1, len(rows) + 1):
            run = [b for row in rows[i:j] for b in row]
            splits = vertical_gaps(run)
            if not splits and j > i + 1:
                break  # a line across the run so far (a heading, a full-width line): no column runs past it
            split = column_split(run, splits)
            if split is not None and any(side_by_side(row, split) for row in rows[i:j]):
                block = (j, split)
        if block is None:
            order += row_order(rows[i])
            i += 1
            continue
        j, split = block
        order += reading_order([b for row in rows[i:j] for b in row if b[0] < split])
        order += reading_order([b for row in rows[i:j] for b in row if b[0] >= split])
        i = j
    return order


def bands(boxes):
    """Boxes top to bottom in bands that overlap vertically: a band ends where the next box starts below all of it."""
    found, bottom = [], None
    for box in sorted(boxes, key=lambda b: b[1]):
        if found and box[1] < bottom:
            found[-1].append(box)
            bottom = max(bottom, box[3])
        else:
            found.append([box])
            bottom = box[3]
    return found


def vertical_gaps(boxes):
    """The left edges of the boxes that start right of every box further left: the x of each vertical gap that no
    box crosses."""
    found, edge = [], None
    for box in sorted(boxes, key=lambda b: b[0]):
        if edge is not None and box[0] >= edge:
            found.append(box[0])
        edge = box[2] if edge is None else max(edge, box[2])
    return found


def column_split(boxes, splits):
    """The first of the gaps whose two sides are both columns: two boxes or more (one box beside a line is a row,
    or a centred heading over one) spanning at least COLUMN_SHARE of all the boxes' width; None if none is."""
    width = max(b[2] for b in boxes) - min(b[0] for b in boxes)

    def is_column(side):
        return len(side) >= 2 and max(b[2] for b in side) - min(b[0] for b in side) >= COLUMN_SHARE * width
    for split in splits:
        if is_column([b for b in boxes if b[0] < split]) and is_column([b for b in boxes if b[0] >= split]):
            return split
    return None


def side_by_side(row, split):
    """Whether a band holds a box left of the split and one that starts at it (give or take a quarter of the line's
    height, for rounding): two columns' lines side by side. Boxes that only stack left and right of a gap (a
    scatter), or a centred line over a row's right-hand cell, are no columns."""
    right = [b[0] for b in row if b[0] >= split]
    height = max(b[3] - b[1] for b in row)
    return bool(right) and min(right) - split <= height / 4 and min(b[0] for b in row) < split


def row_order(boxes):
    """
    One band's boxes row by row, each row left to right. Boxes are taken by their vertical centre; a box whose
    centre lies above the bottom of the row's first box joins that row, so two boxes of one text line whose tops
    differ by a few units still come out left, then right.
    """
    rows = []
    for box in sorted(boxes, key=lambda b: (b[1] + b[3]) / 2):
        if rows and (box[1] + box[3]) / 2 < rows[-1][0][3]:
            rows[-1].append(box)
        else:
            rows.append([box])
    return [box for row in rows for box in sorted(row, key=lambda b: b[0])]


@torch.no_grad()
def boxes_from_predictions(boxes, logits, threshold=0.5):
    """One image's predictions, boxes (Q, 4) cx, cy, w, h and logits (Q,) -> the boxes whose objectness
    probability exceeds threshold, as 0-999 integer [x1, y1, x2, y2] in reading order (grounding's format)."""
    keep = logits.float().sigmoid() > threshold
    corners = (cxcywh_to_xyxy(boxes[keep].float()).clamp(0, 1) * 999).round().int().tolist()
    return reading_order(corners)
