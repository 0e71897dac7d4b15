"""
Read images with a trained checkpoint. One image: the answer streams to the terminal as it is generated. Several
(comma-separated): they are read together in one batch (Engine.generate_many) and each answer is printed under its
file name.

    python -m scripts.ocr --image=receipt.png        # asks what the checkpoint trained on (its meta's prompts)
    python -m scripts.ocr --image=a.png,b.png,c.png
    python -m scripts.ocr --image=page.png --prompt="<image>\n<|grounding|>OCR this image." --boxes_out=boxes.png

A grounding answer (<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>, coordinates 0-999) is parsed
into boxes in pixels; --boxes_out draws them, labelled, on the image (with several images: a directory, one
<name>_boxes.png per image).

Pages: a page model (one trained on the grounding prompt, bash scripts/pages.sh) gives every line of the page in
reading order with its box (nanovlm/pageocr.py), by --page_mode: grounding (its grounding answer, parsed), head (its
detection head's boxes, each line crop read by the line reader --reader_tag in one batch) or auto (the default for
a page model: the path its meta says measured better, else grounding). --json writes {image: [{"text", "box",
"box_999"}, ...]}: box in pixels of the original image, box_999 on the 0-999 scale of grounding answers.

    python -m scripts.ocr --image=page.png --model_tag=pages --json=lines.json --boxes_out=boxes.png
    python -m scripts.ocr --image=page.png --model_tag=pages --page_mode=head --reader_tag=lines
"""

import json as jsonlib
import os

from PIL import ImageDraw

from configurator import configure
from nanovlm.checkpoint import image_mode_of, load_vlm, reading_prompt, training_prompt
from nanovlm.common import autocast_context, compute_init, get_base_dir
from nanovlm.dataloader import image_to, prompt_ids
from nanovlm.engine import Engine, room_to_generate
from nanovlm.evaluate import read_images
from nanovlm.image_process import load_image, preprocess
from nanovlm.metrics import parse_boxes
from nanovlm.pageocr import load_reader, page_mode_of, read_page, reader_of

image = ""  # the image to read, or several, comma-separated
prompt = ""  # empty = the checkpoint's training prompt (older checkpoints: "<image>\nOCR this image.")
image_mode = ""  # empty = the checkpoint's
model_tag = "vis_tok"
checkpoint_dir = ""  # or an explicit checkpoint directory
step = -1  # -1 = latest
max_new_tokens = 1024
temperature = 0.0  # 0 = greedy
top_k = 0  # 0 = no top-k filtering
seed = 42
boxes_out = ""  # write the image with the parsed boxes drawn on it here
page_mode = ""  # grounding|head|auto: read every line of a page; empty = auto for a page model, else one answer
reader_tag = "lines"  # the head path's line reader, a run under checkpoints/
det_threshold = 0.5  # the head path: the objectness probability a box needs
json = ""  # pages: write every image's lines here
device_type = ""
user_config = configure(globals())


def fail(message):
    raise SystemExit(f"error: {message}")


def draw_boxes(picture, boxes, path):
    """Boxes in 0-999 coordinates -> rectangles in pixels, each with its label."""
    canvas = picture.copy()
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    for label, (x1, y1, x2, y2) in boxes:
        rect = [x1 / 999 * w, y1 / 999 * h, x2 / 999 * w, y2 / 999 * h]
        draw.rectangle(rect, outline=(220, 30, 30), width=2)
        draw.text((rect[0] + 2, max(0, rect[1] - 12)), label or "", fill=(220, 30, 30))
    canvas.save(path)


def show_boxes(picture, answer, out_path):
    boxes = parse_boxes(answer)
    w, h = picture.size
    for label, (x1, y1, x2, y2) in boxes:
        print(f"box {label!r}: ({x1 * w / 999:.0f}, {y1 * h / 999:.0f}) - ({x2 * w / 999:.0f}, {y2 * h / 999:.0f}) px")
    if out_path:
        draw_boxes(picture, boxes, out_path)
        print(f"wrote {out_path} with {len(boxes)} boxes")


def boxes_path(path):
    """Where --boxes_out draws this image: the flag itself, or with several images a file in that directory."""
    if not boxes_out or len(paths) == 1:
        return boxes_out
    os.makedirs(boxes_out, exist_ok=True)
    return os.path.join(boxes_out, os.path.splitext(os.path.basename(path))[0] + "_boxes.png")


def read_pages(directory):
    """Every line of each page with its box, printed (and drawn, and written to --json)."""
    try:
        page = reader_of(model, tokenizer, meta, directory, image_mode, prompt, max_new_tokens)
        mode = page_mode_of(meta, page_mode)
        reader = load_reader(os.path.join(get_base_dir(), reader_tag), device) if mode == "head" else None
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    print(f"page mode {mode}" + (f", lines read by {reader_tag}" if reader else ""))
    found = {}
    with autocast_context(device.type):
        for path, picture in zip(paths, pictures):
            lines = found[path] = read_page(page, picture, mode, reader, det_threshold)
            print(f"== {path}: {len(lines)} lines")
            for line in lines:
                print(f"{line['box']} px  {line['text']}")
            if boxes_out:
                draw_boxes(picture, [(line["text"], line["box_999"]) for line in lines], boxes_path(path))
                print(f"wrote {boxes_path(path)} with {len(lines)} boxes")
    if json:
        with open(json, "w") as f:
            jsonlib.dump(found, f, indent=2, ensure_ascii=False)
        print(f"wrote {json}")


def stream(engine, ids, views, max_tokens):
    """Print one answer as it is generated; returns its text."""
    generated, printed = [], ""
    for column, _ in engine.generate(ids, images=[views], max_tokens=max_tokens, temperature=temperature,
                                     top_k=top_k or None, seed=seed):
        if column[0] in engine.stop_ids:
            break
        generated.append(column[0])
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(printed):], end="", flush=True)
            printed = text
    print()
    return tokenizer.decode(generated)


paths = [p for p in image.split(",") if p]
if not paths:
    fail("give an image with --image=PATH (or several: --image=a.png,b.png)")
_, _, _, _, device = compute_init(device_type)
try:
    pictures = [load_image(path) for path in paths]
    directory = checkpoint_dir or os.path.join(get_base_dir(), model_tag)
    model, tokenizer, meta = load_vlm(directory, None if step < 0 else step, device=device)
    image_mode = image_mode_of(meta, image_mode)
except (FileNotFoundError, ValueError) as e:
    fail(e)
if page_mode or (not prompt and "<|grounding|>" in (training_prompt(meta) or "")):
    read_pages(directory)  # a page: its lines with their boxes, not one answer
    raise SystemExit(0)
prompt, note = reading_prompt(meta, prompt)
if note:
    print(f"prompt {prompt!r}: {note} (--prompt to ask another)")

prompts = [prompt_ids(tokenizer, prompt, picture, image_mode) for picture in pictures]
longest = max(len(ids) for ids in prompts)
try:
    room = room_to_generate(model.gpt, longest)
except ValueError as e:
    fail(f"{paths[[len(ids) for ids in prompts].index(longest)]}: {e}")
if max_new_tokens > room:
    print(f"note: --max_new_tokens={max_new_tokens} capped at {room}: the prompt is {longest} tokens and the model "
          f"reads at most {longest + room - 1}")
    max_new_tokens = room
engine = Engine(model, tokenizer)
with autocast_context(device.type):
    if len(paths) == 1:
        answers = [stream(engine, prompts[0], image_to(preprocess(pictures[0], image_mode), device), max_new_tokens)]
    else:  # all in one batch
        answers = read_images(engine, pictures, [prompt] * len(pictures), image_mode, max_new_tokens,
                              batch_size=len(pictures), temperature=temperature, top_k=top_k or None, seed=seed)
for path, picture, answer in zip(paths, pictures, answers):
    if len(paths) > 1:
        print(f"== {path}\n{answer}")
    show_boxes(picture, answer, boxes_path(path))
