"""
Evaluate a model on dataset records: greedy answers through the engine, teacher-forced loss on the reference
answer, and the metrics of nanovlm.metrics. Shared by scripts/vision_sample.py and training-time eval.
"""

import contextlib

import torch

from nanovlm.dataloader import collate, render_record
from nanovlm.engine import Engine
from nanovlm.image_process import count_image_tokens, load_image
from nanovlm.metrics import cer, detection_rate, mean_iou, ned, parse_boxes, word_precision


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


def prompt_ids(tokenizer, prompt, image, image_mode):
    """The generation prompt for one image: the user turn with its <|image|> run, then <|assistant_start|>."""
    n_image = count_image_tokens(image.width, image.height, image_mode)
    return tokenizer.render_for_completion([{"role": "user", "content": prompt}], image_tokens=[n_image])


def evaluate_records(model, tokenizer, records, image_mode, max_new_tokens=512, autocast=None):
    """One dict per record: id, prediction, reference, loss and the measures of score()."""
    engine = Engine(model, tokenizer)
    device = model.get_device()
    max_tokens = model.config.sequence_len + 1
    samples = []
    was_training = model.training
    model.eval()
    for record in records:
        try:
            image = load_image(record["image"])
        except ValueError as e:  # an unreadable image scores as an empty answer, it does not stop the eval
            print(f"record {record['id']}: {e}")
            samples.append(dict(id=record["id"], prediction="", reference=record["answer"], loss=None, error=str(e),
                                **score("", record["answer"])))
            continue
        # the image is decoded and preprocessed once: for the teacher-forced loss and for generation
        inputs, targets, images = collate([render_record(record, tokenizer, image_mode, max_tokens, image)],
                                          tokenizer.encode_special("<|assistant_end|>"), device)
        ids = prompt_ids(tokenizer, record["prompt"], image, image_mode)
        budget = min(max_new_tokens, model.config.sequence_len * 10 - len(ids))
        with torch.no_grad(), autocast or contextlib.nullcontext():
            loss = model(inputs, images=images, targets=targets).item()  # mean cross-entropy of the answer
            out, _ = engine.generate_batch(ids, images=images, max_tokens=budget, temperature=0.0)
        pred = tokenizer.decode(out[0][len(ids):])
        samples.append(dict(id=record["id"], prediction=pred, reference=record["answer"], loss=loss,
                            **score(pred, record["answer"])))
    model.train(was_training)
    return samples


def summarize(samples):
    """The summary of a list of scored samples (means over samples; box measures over samples with boxes)."""
    n = len(samples)
    def mean(key, rows):
        values = [s[key] for s in rows if s.get(key) is not None]
        return sum(values) / len(values) if values else None
    boxed = [s for s in samples if "det_rate" in s]
    exact = sum(bool(s["exact"]) for s in samples)
    return {"n": n, "exact": exact, "exact_rate": exact / n if n else 0.0, "cer": mean("cer", samples),
            "ned": mean("ned", samples), "word_precision": mean("word_precision", samples),
            "loss": mean("loss", samples), "det_rate": mean("det_rate", boxed), "iou": mean("iou", boxed),
            "samples": samples}
