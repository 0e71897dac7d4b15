"""
Evaluate a checkpoint on a dataset: per record the teacher-forced answer loss, then a greedy answer scored by
exact match, CER, NED, word precision and, for grounding answers, box IoU and detection rate. Every record is
answered and scored; one longer than the checkpoint's training length gets no loss (it says so). A conversation
record (K-shot: K example image -> answer turns, then the asked image) is asked its turns up to its last answer,
with all its images, and scored on that answer.

    python -m scripts.vision_sample --data=data/tier1/dataset.json --model_tag=vis_tok --json=eval.json
    python -m scripts.vision_sample --data=data/shots_val/dataset.json --model_tag=vis_tok    # make_data --shots=2
    python -m scripts.vision_sample --data=data/synth_lines_val/dataset.json --model_tag=lines --batch_size=32
    torchrun --standalone --nproc_per_node=2 -m scripts.vision_sample --data=data/synth_val/dataset.json

Under torchrun the records are split across ranks and rank 0 gathers, prints and writes the summary.
"""

import json as jsonlib
import os

import torch
import torch.distributed as dist

from configurator import configure
from nanovlm.checkpoint import image_mode_of, load_vlm, reading_prompt
from nanovlm.common import autocast_context, compute_cleanup, compute_init, get_base_dir, print0
from nanovlm.dataloader import load_records
from nanovlm.evaluate import ANSWER_ROOM, IMAGE_GAP_WARN, answer_budget, evaluate_records, summarize
from nanovlm.sheet import make_sheet

data = "data/tier1/dataset.json"
model_tag = "vis_tok"  # a run under checkpoints/
checkpoint_dir = ""  # or an explicit checkpoint directory
step = -1  # -1 = the latest
image_mode = ""  # empty = the one the checkpoint was trained with
max_new_tokens = -1  # -1 = the longest reference + a little, at least the checkpoint's sequence length
prompt = ""  # empty = each record's own (a record without one: the checkpoint's training prompt); else every
# single-image record's (a conversation record, K-shot, is always asked its own turns)
limit = -1  # evaluate only the first N records
batch_size = 8  # records generated together (greedy answers are the same at any batch size)
json = ""  # write the summary here
sheet = ""  # write a PNG of the first 24 records: image, prediction (wrong characters in red), reference
device_type = ""
user_config = configure(globals())

ddp, rank, local_rank, world_size, device = compute_init(device_type)
directory = checkpoint_dir or os.path.join(get_base_dir(), model_tag)
try:
    model, tokenizer, meta = load_vlm(directory, None if step < 0 else step, device=device)
    records = load_records(data, need_prompt=False)
    image_mode = image_mode_of(meta, image_mode)
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}")
records = records[:limit] if limit > 0 else records[:]  # a list: a synthetic set is drawn once, here
print0(f"evaluating {directory} step {meta['step']} on {len(records)} records of {data} (image mode {image_mode})")
asked, note = reading_prompt(meta, prompt)  # --prompt, else the checkpoint's, for records without their own
without_prompt = sum("prompt" not in r and "conversation" not in r for r in records)
if without_prompt and not prompt:
    print0(f"records without a prompt ({without_prompt}) are asked {asked!r}: {note}")
records = [dict(r, prompt=asked) if (prompt or "prompt" not in r) and "conversation" not in r else r for r in records]
# one budget for every rank: the longest reference among all the records, not among this rank's share
max_new_tokens = answer_budget(model, tokenizer, records, max_new_tokens)
print0(f"answers of up to {max_new_tokens} new tokens (--max_new_tokens; by default the longest reference + "
       f"{ANSWER_ROOM}, at least the sequence length {model.config.sequence_len})")

samples = evaluate_records(model, tokenizer, records[rank::world_size], image_mode, max_new_tokens,
                           autocast_context(device.type), batch_size=batch_size)
if ddp:
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(samples, gathered, dst=0)
    if rank == 0:
        samples = [s for part in gathered for s in part]

if rank == 0:
    summary = summarize(samples)
    print(f"{'id':<16} {'exact':>5} {'cer':>7} {'ned':>7} {'wprec':>7} {'loss':>8} {'det':>6}  prediction")
    for s in samples:
        det = f"{s['det_rate']:.2f}" if "det_rate" in s else "-"
        shown = s["prediction"].replace("\n", " ")[:48]
        loss = "-" if s["loss"] is None else f"{s['loss']:.4f}"
        print(f"{str(s['id']):<16} {'yes' if s['exact'] else 'no':>5} {s['cer']:7.4f} {s['ned']:7.4f} "
              f"{s['word_precision']:7.4f} {loss:>8} {det:>6}  {shown}")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    print(f"exact {summary['exact']}/{summary['n']} ({summary['exact_rate']:.1%}) | cer {fmt(summary['cer'])} | "
          f"ned {fmt(summary['ned'])} | word precision {fmt(summary['word_precision'])} | "
          f"loss {fmt(summary['loss'])} | image gap {fmt(summary['image_gap'])} | "
          f"det rate {fmt(summary['det_rate'])} | iou {fmt(summary['iou'])}")
    if summary["ctc_cer"] is not None:  # the lines models' training-only read-out: what the encoder itself reads
        print(f"SAM's CTC read-out (not the answer): cer {summary['ctc_cer']:.4f}")
    if summary["image_gap"] is not None and summary["image_gap"] < IMAGE_GAP_WARN:
        print(f"warning: image gap {summary['image_gap']:.4f}: the answers barely depend on the image")
    if json:
        with open(json, "w") as f:
            jsonlib.dump(summary, f, indent=2)
        print(f"wrote {json}")
    if sheet:
        print(f"wrote {make_sheet(records, samples, sheet)}")
compute_cleanup()
