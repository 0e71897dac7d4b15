"""
The vision-language model: a GPT that reads DeepEncoder features where its prompt holds <|image|> tokens.

A prompt carries N <|image|> ids per image (N = image_process.count_image_tokens for the image and mode). The
encoder turns each image into exactly N vectors in DeepSeek-OCR's layout, and those vectors replace the token
embeddings at the <|image|> positions, in order. The GPT then runs on the spliced embeddings (forward(embeds=)).
"""

import math
import re
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.deepencoder import DeepEncoder, DeepEncoderConfig
from nanovlm.detection import DetHead, detection_losses, pad_tokens
from nanovlm.gpt import GPT, GPTConfig
from nanovlm.image_process import global_shape, resolve_mode
from nanovlm.nf4 import param_elements

# Model presets. "tiny" trains on a CPU in minutes; "lines" is tiny made to read text lines (one row of 128 tokens
# in reading order, one per column of SAM's neck, each with the CTC read-out's reading of its column: room for 64
# characters; with --image_mode=line:2048:64 it is the earlier 32-token reader); "d20" is nanochat's d20 GPT with the
# real DeepEncoder. proj_norm and ctc are sized for the preset's image mode when the model is built (see preset_configs).
TINY_GPT = dict(sequence_len=512, n_layer=4, n_head=4, n_kv_head=4, n_embd=128)
PRESETS = {
    "tiny": dict(gpt=TINY_GPT, encoder=dict(tiny=True), image_mode="resize:256", proj_norm=True, ctc=False),
    "lines": dict(gpt=TINY_GPT, encoder=dict(tiny=True, sam_window=4, sam_conv_stem=(8, 16, 32)),
                  image_mode="line:2048:64:1", proj_norm=True, ctc=True),
    "d20": dict(gpt=dict(sequence_len=2048, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280), encoder=dict(),
                image_mode="base", proj_norm=False, ctc=False),
}


# Which component a parameter belongs to, by its full name in the VLM. The one home of this question: the
# optimizer's groups, stage 2's freezing, scripts/trainables and the FLOP count all read it. Every parameter
# matches exactly one pattern (component_of fails otherwise): a new module must be given a home.
NOT_LORA = r"(?!.*\.lora_[AB]\.)"
COMPONENTS = [
    ("sam", NOT_LORA + r"encoder\.sam\.(?!net_2\.|net_3\.).*"),
    ("compressor", NOT_LORA + r"encoder\.sam\.net_[23]\..*"),
    ("clip", NOT_LORA + r"encoder\.clip\..*"),
    ("projector", NOT_LORA + r"encoder\.(projector\..*|token_ctc_head\..*|ctc_embed\..*|image_newline|view_seperator)"),
    ("gpt_matrices", NOT_LORA + r"gpt\.transformer\.h\.\d+\..*"),
    ("embeddings", r"gpt\.transformer\.wte\.weight"),
    ("lm_head", r"gpt\.lm_head\.weight"),
    ("lora", r".*\.lora_[AB]\.weight"),
    ("det_head", NOT_LORA + r"det_head\..*"),
]


def component_of(name):
    """The component of a parameter (full name in the VLM); a ValueError when it matches none or several."""
    hits = [component for component, pattern in COMPONENTS if re.fullmatch(pattern, name)]
    if len(hits) != 1:
        raise ValueError(f"{name} ({'no component' if not hits else 'components ' + ', '.join(hits)})")
    return hits[0]


def freeze(model, freeze_sam=False, freeze_compressor=False):
    """Stage 2 freezes SAM and/or the compressor (adapters put on them on purpose keep training). Frozen
    parameters never reach the optimizer."""
    frozen = {name for name, wanted in (("sam", freeze_sam), ("compressor", freeze_compressor)) if wanted}
    for name, p in model.named_parameters():
        if component_of(name) in frozen:
            p.requires_grad_(False)


def preset_configs(name, vocab_size, image_mode="", sequence_len=0):
    """
    (GPTConfig, DeepEncoderConfig, image_mode) of a preset; the projector width follows the GPT's n_embd.
    image_mode: empty for the preset's own; sequence_len: 0 for the preset's own. The projector-output norm and
    the CTC read-out are built for this mode's grid (they fix its shape), so a model with them reads in the mode
    it was trained in.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}', choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    image_mode = resolve_mode(image_mode or preset["image_mode"])
    gpt_config = GPTConfig(vocab_size=vocab_size, **dict(preset["gpt"], sequence_len=sequence_len or
                                                         preset["gpt"]["sequence_len"]))
    encoder_kwargs = dict(preset["encoder"])
    make = DeepEncoderConfig.tiny if encoder_kwargs.pop("tiny", False) else DeepEncoderConfig
    encoder_config = make(out_dim=gpt_config.n_embd, cols_per_token=image_mode.cols_per_token, **encoder_kwargs)
    width, height = global_shape(image_mode)
    if preset["proj_norm"]:
        if image_mode.tile_size:
            raise ValueError(f"preset {name} normalises a fixed token grid; a tiling mode ({image_mode}) has none")
        encoder_config.proj_norm_grid = encoder_config.token_grid(height, width)
    if preset["ctc"]:
        encoder_config.ctc_rows = encoder_config.patches_per_side(height)
        # one token per neck column: each token also gets SAM's reading of its column (what made the GPT read)
        encoder_config.ctc_to_tokens = image_mode.cols_per_token == 1
    return gpt_config, encoder_config, image_mode


def ctc_loss(log_probs, texts):
    """CTC of one read-out's (steps, B, classes) log-probabilities against each row's text bytes (class 0 is the
    blank, byte b is class b + 1), every row using all steps. Impossible alignments (text longer than the steps)
    count zero instead of infinity."""
    T, B = log_probs.shape[:2]
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)
    flat = torch.cat([t.to(torch.long) + 1 for t in texts]).to(log_probs.device)
    return F.ctc_loss(log_probs, flat, torch.full((B,), T, dtype=torch.long), lengths, blank=0, zero_infinity=True)


def ctc_greedy(log_probs):
    """The text of each row of a (steps, B, classes) read-out, decoded greedily: the best class per step, repeats
    merged, blanks dropped, classes back to bytes (class b + 1 is byte b)."""
    texts = []
    for row in log_probs.argmax(-1).t().tolist():
        kept = [c - 1 for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
        texts.append(bytes(kept).decode("utf-8", errors="replace"))
    return texts


def image_contexts(idx, lengths, image_token_id, targets=None, doc_ids=None):
    """
    The GPT hidden states the detection head reads beside each image of a batch: (row, start, end) columns, its
    sample's tokens from the first up to the last before the answer to the image (the first position at or after
    the image's <|image|> run whose target is supervised: <|assistant_start|>, which has read the whole prompt).
    Later states have read the answer, boxes and all, which a prompt at inference does not show; targets None (a
    prompt) gives the whole sample. lengths: each image's number of <|image|> positions, in the batch's image
    order; doc_ids: GPT.forward's (a sample's columns), None for one sample per row.
    """
    positions = (idx == image_token_id).nonzero().tolist()  # row-major: the batch's image order
    contexts, first = [], 0
    for length in lengths:
        row, col = positions[first]
        first += length
        start, end = 0, idx.size(1)
        if doc_ids is not None:
            same = (doc_ids[row] == doc_ids[row, col]).nonzero().flatten().tolist()
            start, end = same[0], same[-1] + 1
        if targets is not None:
            answer = (targets[row, col:end] != -1).nonzero().flatten().tolist()
            end = col + answer[0] + 1 if answer else end
        contexts.append((row, start, end))
    return contexts


class VLM(nn.Module):
    def __init__(self, gpt, encoder, image_token_id, det_head=None):
        super().__init__()
        assert encoder.config.out_dim == gpt.config.n_embd, \
            f"encoder out_dim {encoder.config.out_dim} != GPT n_embd {gpt.config.n_embd}"
        self.gpt = gpt
        self.encoder = encoder
        self.image_token_id = image_token_id
        self.det_head = det_head  # a detection.DetHead, or None (most models)

    @property
    def config(self):
        return self.gpt.config

    def get_device(self):
        return self.gpt.get_device()

    def embed(self, idx, images=None, return_readouts=False, features=None):
        """
        Token embeddings (B, T, n_embd) with image features spliced in.
        images: preprocessed images (global_view, tiles, tiling) in the order their <|image|> runs appear in idx,
        row by row: the i-th image fills the i-th run. None or [] for text only.
        features: instead of images, their sequences as encoder.encode_images returned them (an image encoded
        once can then serve several forwards: a loss, a swapped-image loss, a generation).
        """
        x = self.gpt.transformer.wte(idx)
        is_image = idx == self.image_token_id
        num_slots = int(is_image.sum())
        if not images and not features:
            if num_slots:
                raise ValueError(f"the tokens hold {num_slots} <|image|> positions but no images were given")
            return (x, []) if return_readouts else x
        readouts = []
        if features:
            sequences = features
        elif return_readouts:
            sequences, readouts = self.encoder.encode_images(images, return_readouts=True)
        else:
            sequences = self.encoder.encode_images(images)
        features = torch.cat(list(sequences))  # (sum of N_i, n_embd)
        if features.size(0) != num_slots:
            raise ValueError(f"{len(sequences)} image(s) give {features.size(0)} feature vectors but the tokens "
                             f"hold {num_slots} <|image|> positions (prompt built for another image mode or size?)")
        # masked_scatter fills the True positions in row-major order: the image order of the batch
        x = x.masked_scatter(is_image.unsqueeze(-1), features.to(x.dtype))
        return (x, readouts) if return_readouts else x

    def forward(self, idx, images=None, targets=None, kv_cache=None, loss_reduction="mean", ctc_targets=None,
                features=None, doc_ids=None, det_targets=None):
        """
        Logits (B, T, vocab) or the loss, as GPT.forward, for token ids with images spliced in (or their encoded
        features, see embed); doc_ids for rows packed with several samples (GPT.forward).
        ctc_targets (training with a CTC read-out): one byte tensor per image, the text it shows; then the result
        is (language-model loss, CTC loss), from one pass of the encoder.
        det_targets (training with a detection head): one (T_i, 4) cx, cy, w, h tensor per image (detection's
        targets, empty for an image without boxes); then the result also ends with the head's losses dict
        (detection.detection_losses), from the same one pass of the encoder and the GPT.
        """
        if det_targets is not None:
            return self.forward_detection(idx, images, targets, loss_reduction, ctc_targets, features, doc_ids,
                                          det_targets)
        if ctc_targets is None:
            return self.gpt(None, targets=targets, kv_cache=kv_cache, loss_reduction=loss_reduction,
                            embeds=self.embed(idx, images, features=features), doc_ids=doc_ids)
        embeds, readouts = self.embed(idx, images, return_readouts=True)
        lm_loss = self.gpt(None, targets=targets, embeds=embeds, doc_ids=doc_ids, loss_reduction=loss_reduction)
        return lm_loss, self.ctc_loss(readouts, ctc_targets)

    def forward_detection(self, idx, images, targets, loss_reduction, ctc_targets, features, doc_ids, det_targets):
        """forward with det_targets: (LM loss[, CTC loss], detection losses). The head reads each image's own
        encoder tokens, as the GPT gets them, and the GPT's last hidden states of its sample before its answer."""
        if images:
            sequences, readouts = self.encoder.encode_images(images, return_readouts=True)
        else:
            sequences, readouts = list(features or []), []
        if len(det_targets) != len(sequences):
            raise ValueError(f"detection targets for {len(det_targets)} image(s), but the batch holds "
                             f"{len(sequences)}")
        lm_loss, hidden = self.gpt(None, targets=targets, embeds=self.embed(idx, features=sequences), doc_ids=doc_ids,
                                   loss_reduction=loss_reduction, return_hidden=True)
        if sequences:
            out = self.detect_from(idx, sequences, hidden, targets, doc_ids)
            det = detection_losses(out, det_targets, self.det_head.config)
        else:  # text alone: nothing to detect (DDP is told to expect unused parameters when text is mixed in)
            zero = torch.zeros((), device=hidden.device)
            det = dict(det_l1=zero, det_giou=zero, det_obj=zero, det_total=zero)
        if ctc_targets is None:
            return lm_loss, det
        return lm_loss, self.ctc_loss(readouts, ctc_targets), det

    def detect_from(self, idx, sequences, hidden, targets=None, doc_ids=None):
        """The detection head's outputs (DetHead.forward: boxes (N, Q, 4), logits (N, Q)) for the N images of a
        batch: each image's encoder sequence (encode_images) and the GPT's last hidden states of its context
        (image_contexts)."""
        contexts = image_contexts(idx, [len(s) for s in sequences], self.image_token_id, targets, doc_ids)
        vision, vision_mask = pad_tokens(sequences)
        text, text_mask = pad_tokens([hidden[row, start:end] for row, start, end in contexts])
        return self.det_head(vision, vision_mask, text, text_mask)

    @torch.no_grad()
    def detect(self, idx, features, doc_ids=None):
        """The detection head's outputs for prompts (B, T), each ending where the answer would start, given their
        images' encoded sequences (encode_images, in the batch's image order); doc_ids marks each row's own tokens
        (1) from its right padding (0), or None for rows without padding."""
        _, hidden = self.gpt(None, embeds=self.embed(idx, features=features), doc_ids=doc_ids, return_hidden=True)
        return self.detect_from(idx, features, hidden, doc_ids=doc_ids)

    def ctc_loss(self, readouts, ctc_targets):
        """
        CTC of the read-outs against each image's text bytes (class 0 is the blank, byte b is class b + 1): the
        SAM neck's columns (ctc_rows > 0) plus the projected tokens (token_ctc_split > 0), summed. Impossible
        alignments (text longer than the steps) count zero instead of infinity.
        """
        loss = torch.zeros((), device=self.get_device())
        if not readouts:
            return loss
        necks, grids = zip(*readouts)
        config = self.encoder.config
        heads = []
        if config.ctc_rows > 0:
            heads.append(self.encoder.sam.ctc_logits(torch.stack(necks)))
        if config.token_ctc_split > 0:
            heads.append(self.encoder.token_ctc_logits(torch.stack(grids)))
        for log_probs in heads:
            loss = loss + ctc_loss(log_probs, ctc_targets)
        return loss

    def training_flops(self, rows, seq_len, views, scored_tokens, stages=None, det=None):
        """
        FLOPs of one training micro-batch: `rows` sequences of seq_len tokens (the padded length that runs),
        lm_head applied at scored_tokens positions (our loss runs it on supervised tokens only), and the image
        views the encoder ran on, as (height, width): each global view and each tile at its own size. det, with a
        detection head: (images, their <|image|> tokens, GPT states they read with them (image_contexts)).

        A weight element costs 2 FLOPs per position it is applied at, forward; +2 for the gradient of its input
        when anything at or before its stage trains; +2 for its own gradient when it trains (6 = nanochat's 6N).
        4-bit weights count by their elements, not their packed bytes. Stages, in forward order: SAM body, net_2,
        net_3, CLIP, projector, each GPT block, lm_head (read-out heads beside their stage). Plus the GPT's
        attention scores, nanochat's 12 x layers x heads x head_dim x seq_len per token. Attention inside the
        encoder is left out. Packed rows (several samples each) count the same: their block-diagonal mask goes to
        SDPA as a dense (T, T) mask, which scores every pair of the row and discards the masked ones, so what runs
        is the row's seq_len, not each sample's. The detection head last (its attention scores left out too).
        """
        stages = weight_elements_by_stage(self)
        positions = dict.fromkeys(stages, 0)
        geometry = self.encoder.config
        for height, width in views:
            patches = geometry.patches_per_side(height) * geometry.patches_per_side(width)
            net_2 = math.prod(geometry.token_grid(height, width, convs=1))
            token_rows, token_cols = geometry.token_grid(height, width)
            grid = token_rows * token_cols
            for i in range(len(geometry.sam_conv_stem)):  # stem layer i runs at 1/2^(i+1) of the pixels per side
                positions[f"sam_stem{i}"] += math.ceil(height / 2 ** (i + 1)) * math.ceil(width / 2 ** (i + 1))
            for stage, count in (("sam", patches), ("sam_ctc", geometry.patches_per_side(width)), ("net_2", net_2),
                                 ("net_3", grid), ("clip", grid + 1), ("projector", grid),
                                 ("token_ctc", token_cols)):
                if stage in positions:
                    positions[stage] += count
        for stage in positions:
            if stage.startswith("gpt_h"):
                positions[stage] = rows * seq_len
        positions["lm_head"] = int(scored_tokens)  # a count (train_step passes a tensor): FLOPs stay a number
        if det is not None:
            # the memory's projections run at its tokens, the decoder at the queries; the cross-attention's
            # in_proj is q (at the queries), k and v (at the memory) in one weight: 1/3 of it at each
            images, image_tokens, text_tokens = det
            queries, memory = images * self.det_head.config.n_queries, image_tokens + text_tokens
            positions.update(det_vision=image_tokens, det_text=text_tokens, det_queries=queries,
                             det_cross=(queries + 2 * memory) / 3)
        flops, upstream_trains = 0, False
        for stage, (trainable, frozen) in stages.items():
            upstream_trains = upstream_trains or trainable > 0
            per_position = 6 * trainable + (4 if upstream_trains else 2) * frozen
            flops += per_position * positions[stage]
        c = self.gpt.config
        flops += 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * seq_len * rows * seq_len
        return flops


# Parameters that are not weights applied at every position: lookups and added tables (the token embedding,
# position tables, SAM's rel-pos tables, CLIP's class token, the detection head's object queries) and CLIP's patch
# conv, which never runs here
NOT_MATMUL = r"gpt\.transformer\.wte\.weight|encoder\.sam\.pos_embed|.*\.rel_pos_[hw]|" \
             r"encoder\.clip\.embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)|" \
             r"det_head\.queries"
ENCODER_ORDER = ["sam", "sam_ctc", "net_2", "net_3", "clip", "projector", "token_ctc"]
DET_ORDER = ["det_vision", "det_text", "det_cross", "det_queries"]  # after lm_head: it reads the GPT's last states


def flop_stage(name):
    """The stage of a weight for the FLOP count: its component, split where positions differ (the two compressor
    convs, the read-out heads, each GPT block). A LoRA weight counts with the layer it adapts."""
    base_name = re.sub(r"\.lora_[AB]\.weight$", ".weight", name)
    component = component_of(base_name if base_name != name else name)
    if component == "compressor":
        return "net_2" if ".net_2." in name else "net_3"
    if component == "sam" and ".ctc_head." in name:
        return "sam_ctc"
    if component == "sam" and ".patch_embed.stem." in name:  # stem.{3i, 3i+1} = layer i's conv, BatchNorm
        layer = int(re.search(r"\.stem\.(\d+)\.", name).group(1)) // 3
        return f"sam_stem{layer}"
    if component == "projector" and ".token_ctc_head." in name:
        return "token_ctc"
    if component == "gpt_matrices":
        block = int(re.match(r"gpt\.transformer\.h\.(\d+)\.", name).group(1))
        return f"gpt_h{block:04d}"
    if component == "det_head":  # by where it runs (training_flops): image tokens, GPT states, both, the queries
        if ".vision_proj." in name or ".text_adapter." in name:
            return "det_vision" if ".vision_proj." in name else "det_text"
        return "det_cross" if ".cross_attn.in_proj_" in name else "det_queries"
    return component


def weight_elements_by_stage(model):
    """{stage: (trainable elements, frozen elements)} in forward order (see flop_stage); 4-bit weights by
    their elements."""
    counts = {}
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}"
            if re.fullmatch(NOT_MATMUL, name):
                continue
            stage, elements = flop_stage(name), param_elements(module, pname, p)
            trainable, frozen = counts.get(stage, (0, 0))
            counts[stage] = (trainable + elements, frozen) if p.requires_grad else (trainable, frozen + elements)
    order = sorted(s for s in counts if s.startswith("sam_stem")) + ENCODER_ORDER + \
        sorted(s for s in counts if s.startswith("gpt_h")) + ["lm_head"] + DET_ORDER
    return {stage: counts[stage] for stage in order if stage in counts}


def build_vlm(gpt_config, encoder_config, image_token_id, device="cpu", init=True, det_config=None):
    """A fresh VLM on `device` (built on the meta device first, so no memory is spent on a throwaway init), with
    a detection head when det_config (a DetHeadConfig) is given."""
    with torch.device("meta"):
        gpt = GPT(gpt_config)
        encoder = DeepEncoder(encoder_config)
    model = VLM(gpt, encoder, image_token_id)
    model.to_empty(device=device)
    if init:
        gpt.init_weights()
        encoder.init_weights()
    else:
        gpt.init_rotary()
    if det_config is not None:
        model.det_head = DetHead(det_config).to(device)  # small: initialised where it is built
    return model


def model_meta(model):
    """What a checkpoint needs to rebuild the model: both configs and the image token id, and the detection
    head's config for a model with one."""
    meta = {"model_config": asdict(model.gpt.config), "encoder_config": asdict(model.encoder.config),
            "image_token_id": model.image_token_id}
    if model.det_head is not None:
        meta["det_head_config"] = asdict(model.det_head.config)
    return meta
