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

Pages (--page_mode=grounding|head|auto, nanovlm/pageocr.py): each record's page is read line by line, by the page
model's grounding answer or by its detection head with the line reader --reader_tag reading the crops, and scored
end to end: det_rate (reference lines matched one-to-one by a box at IoU >= 0.5), iou (of those matches), cer of
the page text (lines joined by newlines, boxes dropped) and seconds per page. Each sample's prediction is the page
in the grounding format, whichever path found it. One process, one page at a time.

    python -m scripts.vision_sample --model_tag=pages --data=data/pages_val/dataset.json --page_mode=head --json=o.json
"""

import json as jsonlib
import os

import torch
import torch.distributed as dist

from configurator import configure
from nanovlm.checkpoint import image_mode_of, load_vlm, reading_prompt
from nanovlm.common import autocast_context, compute_cleanup, compute_init, get_base_dir, print0
from nanovlm.dataloader import load_record_image, load_records
from nanovlm.evaluate import ANSWER_ROOM, IMAGE_GAP_WARN, answer_budget, evaluate_records, summarize
from nanovlm.pageocr import load_reader, page_mode_of, reader_of, score_pages, summarize_pages
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
page_mode = ""  # grounding|head|auto: score pages line by line (see above); empty = score answers
reader_tag = "lines"  # the head path's line reader, a run under checkpoints/
det_threshold = 0.5  # the head path: the objectness probability a box needs
device_type = ""
user_config = configure(globals())



def load_page(record):
    """A record's page, or None (an empty reading) where its image cannot be read, said in one line."""
    try:
        return load_record_image(record)
    except ValueError as e:
        print(f"record {record['id']}: {e}")
        return None


def score_pages_and_exit():
    """Read and score every page by one path, print the table and the summary, write --json."""
    try:
        page = reader_of(model, tokenizer, meta, directory, image_mode, "", max_new_tokens)
        mode = page_mode_of(meta, page_mode)
        reader = load_reader(os.path.join(get_base_dir(), reader_tag), device) if mode == "head" else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"pages of {data} read by {mode}" + (f", lines by {reader_tag}" if reader else ""))
    with autocast_context(device.type):
        samples = score_pages(page, records, [load_page(r) for r in records], mode, reader, det_threshold)
    summary = summarize_pages(samples, mode)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    print(f"{'id':<16} {'lines':>5} {'ref':>4} {'det':>6} {'iou':>6} {'cer':>7} {'s':>6}")
    for s in samples:
        print(f"{str(s['id']):<16} {s['lines']:>5} {s['ref_lines']:>4} {fmt(s.get('det_rate')):>6} "
              f"{fmt(s.get('iou')):>6} {s['cer']:7.4f} {s['seconds']:6.2f}")
    print(f"{mode}: det rate {fmt(summary['det_rate'])} | iou {fmt(summary['iou'])} | cer {fmt(summary['cer'])} | "
          f"{fmt(summary['seconds_per_page'])} s/page over {summary['n']} pages")
    if json:
        with open(json, "w") as f:
            jsonlib.dump(summary, f, indent=2, ensure_ascii=False)
        print(f"wrote {json}")
    raise SystemExit(0)


ddp, rank, local_rank, world_size, device = compute_init(device_type)
directory = checkpoint_dir or os.path.join(get_base_dir(), model_tag)
try:
    model, tokenizer, meta = load_vlm(directory, None if step < 0 else step, device=device)
    records = load_records(data, need_prompt=False)
    image_mode = image_mode_of(meta, image_mode)
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}")
records = records[:limit] if limit > 0 else records[:]  # a list: a synthetic set is drawn once, here
if page_mode:
    score_pages_and_exit()
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
