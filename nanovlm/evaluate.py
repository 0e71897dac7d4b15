"""
Evaluate a model on dataset records: greedy answers through the engine, teacher-forced loss on the reference
answer, the image gap and feature spread, and the metrics of nanovlm.metrics. Shared by scripts/vision_sample.py
and training-time eval. read_images answers loaded images in batches (scripts/ocr.py, scripts/bench_read.py).

The image gap says whether the model uses the image at all: the teacher-forced answer loss with each record's
image swapped for another record's, minus the loss with its own image. A model that reads has a large gap (the
wrong image makes the right answer unlikely); one that ignores the image, whatever it answers, has a gap of ~0.
"""

import contextlib
import itertools

import torch

from nanovlm.dataloader import (asked, collate, conversation_prompt_ids, image_to, load_record_images, prompt_ids,
                                record_turns, render_record)
from nanovlm.detection import boxes_from_predictions
from nanovlm.engine import Engine, room_to_generate
from nanovlm.image_process import preprocess
from nanovlm.metrics import cer, detection_rate, mean_iou, ned, parse_boxes, word_precision
from nanovlm.tokenizer import STUDENT, TEACHER
from nanovlm.vlm import ctc_greedy

IMAGE_GAP_WARN = 0.05  # nats per answer token: below this the model barely looks at its images
FEATURE_SPREAD_WARN = 0.01  # below this, different images give the same SAM features: the encoder collapsed
# new tokens past the longest reference: one goes to the stop token, and a wrong answer may spell the same text in
# more tokens or run on past the reference's end, which the CER should see rather than a cut
ANSWER_ROOM = 8


def score(pred, ref):
    """Per-sample measures of a predicted answer against the reference."""
    result = {"exact": pred.strip() == ref.strip(), "cer": cer(pred, ref), "ned": ned(pred, ref),
              "word_precision": word_precision(pred, ref)}
    ref_boxes = parse_boxes(ref)
    if ref_boxes:
        pred_boxes = parse_boxes(pred)
        result["det_rate"] = detection_rate(pred_boxes, ref_boxes)
        result["iou"] = mean_iou(pred_boxes, ref_boxes)
    return result


def head_score(boxes, ref):
    """The detection head's boxes against the reference's, as score() measures an answer's: its detection rate
    and mean IoU (with the boxes themselves); nothing to score for a reference without boxes."""
    ref_boxes = parse_boxes(ref)
    if not ref_boxes:
        return {"head_boxes": boxes}
    return {"head_boxes": boxes, "head_det_rate": detection_rate(boxes, ref_boxes),
            "head_iou": mean_iou(boxes, ref_boxes)}


def image_runs(row, image_token_id):
    """The lengths of a row's <|image|> runs, in order."""
    is_image = (row == image_token_id).int()
    edges = torch.diff(is_image, prepend=is_image.new_zeros(1), append=is_image.new_zeros(1))
    return ((edges == -1).nonzero() - (edges == 1).nonzero()).flatten().tolist()


def swapped_images(inputs, images, image_token_id):
    """
    The batch's images with each row's rolled by one among the rows whose image runs have the same lengths (so
    each row gets other records' images in their own slots), and the mask of rows that got some. A row holds one
    image per run (several: a K-shot record); a batch where that fails (two <image> with nothing between make one
    run) is left as it is, with no row swapped.
    """
    runs = [tuple(image_runs(row, image_token_id)) for row in inputs]
    got_other = torch.zeros(len(runs), dtype=torch.bool)
    if sum(map(len, runs)) != len(images):
        return list(images), got_other
    starts = list(itertools.accumulate(map(len, runs), initial=0))
    own = [images[a:b] for a, b in zip(starts, starts[1:])]
    swapped = list(own)
    for key in set(runs) - {()}:
        group = [r for r, row_runs in enumerate(runs) if row_runs == key]
        if len(group) > 1:
            for r, donor in zip(group, group[1:] + group[:1]):
                swapped[r] = own[donor]
                got_other[r] = True
    return [image for row in swapped for image in row], got_other


def span_sums(losses, spans):
    """[teacher loss sum, teacher tokens, student loss sum, student tokens] of per-token losses and their span ids
    (tokenizer.TEACHER / STUDENT, same shapes; other tokens count nowhere), as one tensor: ready to add up over
    micro-batches and all-reduce over ranks."""
    teacher, student = spans == TEACHER, spans == STUDENT
    return torch.stack([torch.where(teacher, losses, 0).sum(), teacher.sum().to(losses.dtype),
                        torch.where(student, losses, 0).sum(), student.sum().to(losses.dtype)])


@torch.no_grad()
def feature_spread(encoder, images):
    """
    Whether the encoder still tells images apart, centered (the part every image shares is taken out first): the
    std across images of SAM's output map, per position and channel, over the map's overall std. ~0 is a
    collapsed encoder (a fixed "soft prompt"); a fresh one fed different images is far above. Global views of the
    first shape in `images` only; None for fewer than two.
    """
    views = [img[0] for img in images if img[0].shape == images[0][0].shape] if images else []
    if len(views) < 2:
        return None
    sam_map = encoder.sam(torch.stack(views)).float()  # (B, C, h, w)
    return (sam_map.std(dim=0).mean() / sam_map.std().clamp(min=1e-12)).item()


@torch.no_grad()
def answer_losses(model, inputs, targets, images=None, features=None):
    """(B, T) per-token cross-entropy of the batch with these images, or their encoded features (0 where the
    target is -1)."""
    B, T = targets.shape
    return model(inputs, images=images, features=features, targets=targets, loss_reduction="none").view(B, T).float()


@torch.no_grad()
def validation_sums(model, batches, device):
    """
    Over eval batches: (sums, spread). sums = [answer loss x tokens, answer tokens, image gap x tokens, tokens with
    a swapped image, then span_sums: teacher loss x tokens, teacher tokens, student loss x tokens, student tokens]
    (float64, ready to all-reduce across ranks); spread = feature_spread of the first batch.
    One forward gives the loss, the span losses and the gap's reference; the swapped images take one more.
    """
    sums = torch.zeros(8, device=device, dtype=torch.float64)
    spread = None
    for inputs, targets, images, spans in batches:
        if spread is None:
            spread = feature_spread(model.encoder, images)
        own = answer_losses(model, inputs, targets, images)
        answer = targets != -1
        sums[0] += own[answer].sum()
        sums[1] += answer.sum()
        sums[4:] += span_sums(own, spans)
        other, got_other = swapped_images(inputs, images, model.image_token_id)
        swapped_rows = answer & got_other.to(answer.device)[:, None]
        if swapped_rows.any():
            sums[2] += (answer_losses(model, inputs, targets, other) - own)[swapped_rows].sum()
            sums[3] += swapped_rows.sum()
    return sums, spread


def answer_budget(model, tokenizer, records, max_new_tokens=-1):
    """
    New tokens each answer may take: max_new_tokens when > 0; else enough for the longest reference of `records`
    plus ANSWER_ROOM, and at least the model's training sequence length (an answer as long as the longest sample
    it trained on is never cut). The engine caps it further by what the rotary table leaves after each prompt.
    """
    if max_new_tokens > 0:
        return max_new_tokens
    longest = max((len(tokenizer.encode(asked(record)[1])) for record in records), default=0)
    return max(longest + ANSWER_ROOM, model.config.sequence_len)


def record_losses(model, rendered, features, pad_id, device):
    """
    (loss, swapped_loss) per rendered record (ids, spans, _): the mean loss of its asked answer (the student span)
    with its own image features (flat in record order), and with another record's (swapped_images; None where no
    other record's runs are as long).
    """
    if not rendered:
        return []
    inputs, targets, _, _, spans = collate([(ids, mask, None) for ids, mask, _ in rendered], pad_id, device)
    own = answer_losses(model, inputs, targets, features=features)
    other, got_other = swapped_images(inputs, features, model.image_token_id)
    swapped = answer_losses(model, inputs, targets, features=other) if got_other.any() else None
    losses = []
    for row in range(len(rendered)):
        keep = spans[row] == STUDENT
        swapped_loss = swapped[row][keep].mean().item() if got_other[row] and keep.any() else None
        losses.append((own[row][keep].mean().item(), swapped_loss))
    return losses


def head_boxes(model, prompts, features, pad_id, threshold=0.5):
    """
    The detection head's boxes (0-999 [x1, y1, x2, y2] in reading order, detection.boxes_from_predictions, those
    whose objectness probability exceeds threshold) for
    the last image of each prompt (ids ending at <|assistant_start|>; features: each prompt's images' sequences,
    encode_images'). The GPT reads the prompts once more for the hidden states the head takes with them.
    """
    device = model.get_device()
    idx = torch.full((len(prompts), max(map(len, prompts))), pad_id, dtype=torch.long, device=device)
    doc_ids = torch.zeros_like(idx)  # 1 on each prompt's tokens, 0 on its right padding
    for row, ids in enumerate(prompts):
        idx[row, :len(ids)] = torch.tensor(ids, device=device)
        doc_ids[row, :len(ids)] = 1
    out = model.detect(idx, [f for row in features for f in row], doc_ids)
    ends = itertools.accumulate(map(len, features))  # one past each prompt's last image
    return [boxes_from_predictions(out["boxes"][end - 1], out["logits"][end - 1], threshold) for end in ends]


def ctc_read(model, images):
    """What SAM's CTC read-out (a training-only head of the lines models) reads in each image's global view: how
    much of the text the encoder sees, whatever the GPT makes of it. None for models without the read-out."""
    if model.encoder.config.ctc_rows == 0:
        return [None] * len(images)
    _, neck = model.encoder.sam(torch.stack([views[0] for views in images]), return_neck=True)
    return ctc_greedy(model.encoder.sam.ctc_logits(neck))


def read_images(engine, pictures, prompts, image_mode, max_new_tokens, batch_size=8, temperature=0.0, top_k=None,
                seed=42):
    """
    The answers (text) to loaded images, each asked its own prompt (text holding one <image>): batch_size images
    at a time through Engine.generate_many, one batch after another. Each batch is preprocessed when its turn
    comes, so only one batch of views is on the device. Greedy answers do not depend on batch_size.
    """
    device = engine.model.get_device()
    answers = []
    for start in range(0, len(pictures), batch_size):
        batch = pictures[start:start + batch_size]
        ids = [prompt_ids(engine.tokenizer, prompt, picture, image_mode)
               for prompt, picture in zip(prompts[start:start + batch_size], batch)]
        views = [[image_to(preprocess(picture, image_mode), device)] for picture in batch]
        outputs = engine.generate_many(ids, images=views, max_tokens=max_new_tokens, temperature=temperature,
                                       top_k=top_k, seed=seed)
        answers += [engine.tokenizer.decode(out) for out in outputs]
    return answers


def evaluate_records(model, tokenizer, records, image_mode, max_new_tokens=-1, autocast=None, batch_size=8,
                     gap_batch=16):
    """
    One dict per record: id, prompt, prediction, reference, loss, swapped_loss (its answer's loss under another
    record's image, None where no other record of its group of gap_batch has an image run of the same length) and
    the measures of score(). Every record is answered, with up to answer_budget(max_new_tokens) new tokens, and
    scored. The losses cover records that fit the model's training sequence length: positions past it were never
    trained, so a longer record's losses are None, said in one line. Each image is decoded, preprocessed and
    encoded once, for the losses and generation; generation runs batch_size records at a time (greedy: the same
    answers as one by one). A conversation record (K-shot) is asked its conversation up to its last answer, with
    all its images; prompt, reference and loss are those of its last turns.
    """
    engine = Engine(model, tokenizer)
    device = model.get_device()
    max_tokens = model.config.sequence_len + 1  # the longest sample the losses take: inputs plus the shifted target
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    wanted = answer_budget(model, tokenizer, records, max_new_tokens)
    samples, group = [None] * len(records), []  # group: (index, record, prompt, rendered), up to gap_batch of them
    was_training = model.training
    model.eval()
    context = autocast or contextlib.nullcontext()

    def flush():
        rendered = [r for *_, r in group]
        fits = [row for row, (ids, _, _) in enumerate(rendered) if len(ids) <= max_tokens]
        images = [[image_to(view, device) for view in views] for _, _, views in rendered]
        with torch.no_grad(), context:
            flat = model.encoder.encode_images([image for row in images for image in row])  # once, for all below
            starts = list(itertools.accumulate(map(len, images), initial=0))
            features = [flat[a:b] for a, b in zip(starts, starts[1:])]  # each record's
            losses = dict(zip(fits, record_losses(model, [rendered[r] for r in fits],
                                                  [f for r in fits for f in features[r]], pad_id, device)))
            ctc_texts = ctc_read(model, [row[-1] for row in images])  # the asked image
            prompts = [prompt for _, _, prompt, _ in group]
            answers, boxes = [], []
            for start in range(0, len(group), batch_size):
                answers += engine.generate_many(prompts[start:start + batch_size], max_tokens=wanted,
                                                features=[f for row in features[start:start + batch_size] for f in row])
                if model.det_head is not None:
                    boxes += head_boxes(model, prompts[start:start + batch_size], features[start:start + batch_size],
                                        pad_id)
        for row, ((index, record, _, (ids, _, _)), answer, ctc_text) in enumerate(zip(group, answers, ctc_texts)):
            if row not in losses:
                print(f"record {record['id']}: no loss: {len(ids) - 1} tokens with its reference, more than the "
                      f"{max_tokens - 1} this model trained on (answered and scored all the same)")
            loss, swapped_loss = losses.get(row, (None, None))
            pred = tokenizer.decode(answer)
            prompt, reference = asked(record)
            samples[index] = dict(id=record["id"], prompt=prompt, prediction=pred, reference=reference, loss=loss,
                                  swapped_loss=swapped_loss, **score(pred, reference))
            if ctc_text is not None:
                samples[index].update(ctc_prediction=ctc_text, ctc_cer=cer(ctc_text, reference))
            if boxes:
                samples[index].update(head_score(boxes[row], reference))
        group.clear()

    for index, record in enumerate(records):
        try:
            images = load_record_images(record)
            prompt = conversation_prompt_ids(tokenizer, record_turns(record)[0], images, image_mode)
            room_to_generate(model.gpt, len(prompt))  # a prompt longer than the rotary table cannot be answered
            group.append((index, record, prompt, render_record(record, tokenizer, image_mode, images=images)))
        except ValueError as e:  # an unreadable record scores as an empty answer, the eval goes on
            print(f"record {record['id']}: {e}")
            prompt, reference = asked(record)
            samples[index] = dict(id=record["id"], prompt=prompt, prediction="", reference=reference, loss=None,
                                  swapped_loss=None, error=str(e), **score("", reference))
            continue
        if len(group) == gap_batch:
            flush()
    if group:
        flush()
    model.train(was_training)
    return samples


def summarize(samples):
    """The summary of a list of scored samples (means over samples; box measures, the answers' and the detection
    head's, over samples with boxes; image_gap over samples with both losses)."""
    n = len(samples)
    def mean(key, rows):
        values = [s[key] for s in rows if s.get(key) is not None]
        return sum(values) / len(values) if values else None
    boxed = [s for s in samples if "det_rate" in s]
    exact = sum(bool(s["exact"]) for s in samples)
    gaps = [s["swapped_loss"] - s["loss"] for s in samples if s.get("swapped_loss") is not None]
    return {"n": n, "exact": exact, "exact_rate": exact / n if n else 0.0, "cer": mean("cer", samples),
            "ned": mean("ned", samples), "word_precision": mean("word_precision", samples),
            "loss": mean("loss", samples), "image_gap": sum(gaps) / len(gaps) if gaps else None,
            "det_rate": mean("det_rate", boxed), "iou": mean("iou", boxed), "ctc_cer": mean("ctc_cer", samples),
            "head_det_rate": mean("head_det_rate", samples), "head_iou": mean("head_iou", samples),
            "samples": samples}
