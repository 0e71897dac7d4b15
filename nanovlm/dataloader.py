"""
Data: dataset records -> ready batches (inputs, targets, images, doc_ids, state) on the device.

A record is {id, image, prompt, answer, ...}; `image` is relative to the dataset JSON and the prompt holds one
`<image>`. One sample is the two-turn conversation [user: prompt, assistant: answer] rendered with N <|image|>
ids (N from the image's size and the image mode); targets are -1 everywhere the render mask is 0, so labels sit
on the answer tokens whatever the image's length. A record may instead hold {id, conversation, images}: user and
assistant turns (a K-shot record: K example image -> answer turns, then the asked image), each user turn with
zero or more `<image>`, `images` the paths in marker order. Every assistant turn is learned; the batch's spans
tensor says which: STUDENT (1) for a sample's last turn (the asked answer), TEACHER (2) for those before it (a
single-turn record has no teacher span, and renders as it always did). Optional text-only conversations (JSONL)
are mixed in at text_ratio.

`--data=synth:KIND[,KIND...]:N[:SEED[:SHOTS]]` needs no files: record i is drawn by nanovlm.synth when the loader
reaches it (kinds taken in turn, split "train"), so a long run sees N different images, never one twice per
epoch. SHOTS > 0 makes each record a SHOTS-shot conversation (synth.make_shots).

Order is a pure function of (seed, epoch, rank, position): every epoch is a fresh shuffle of all records, the
same on every rank, and rank r takes every world_size-th of it. The yielded state (epoch, position, ...) is
what a resumed run passes back to continue with exactly the next batch. Images are decoded and preprocessed
by a thread pool a few samples ahead of the training loop.
"""

import json
import os
import random
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from nanovlm.image_process import PreprocessedImage, count_image_tokens, load_image, preprocess, resolve_mode
from nanovlm.synth import RENDERERS, make_sample, make_shots
from nanovlm.tokenizer import IMAGE_PLACEHOLDER

REQUIRED_FIELDS = ("id", "image", "prompt", "answer")


class SynthRecords(Sequence):
    """N synthetic records drawn on demand: records[i] renders sample i (its image is a PIL image in the record),
    or with shots > 0 the conversation record i of a K-shot set (its images PIL images)."""

    def __init__(self, spec):
        parts = spec.split(":")
        kinds = parts[1].split(",") if len(parts) > 1 else []
        try:
            self.n, self.seed = int(parts[2]), int(parts[3]) if len(parts) > 3 else 0
            self.shots = int(parts[4]) if len(parts) > 4 else 0
        except (IndexError, ValueError):
            self.n = 0
        if len(parts) > 5 or self.n < 1 or self.shots < 0 or not kinds or any(k not in RENDERERS for k in kinds):
            raise ValueError(f"bad synthetic data spec {spec!r}: use synth:KIND[,KIND...]:N[:SEED[:SHOTS]] with "
                             f"N >= 1, SHOTS >= 0 and kinds from {', '.join(RENDERERS)}")
        self.kinds = kinds

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if not 0 <= index < self.n:
            raise IndexError(index)
        kind = self.kinds[index % len(self.kinds)]
        if self.shots:
            record, images = make_shots(kind, self.seed, "train", index, self.shots)
            return dict(record, images=images)
        record, image = make_sample(kind, self.seed, "train", index)
        return dict(record, image=image)


def load_records(path, strict=False, need_prompt=True):
    """The records of a dataset JSON, image paths made absolute, or SynthRecords for a "synth:" spec. A malformed
    record is reported and skipped (strict: raises). need_prompt=False keeps records without a prompt (an eval
    asks them one of its own)."""
    if path.startswith("synth:"):
        return SynthRecords(path)
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset not found: {path}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, list):
        raise ValueError(f"{path}: a dataset is a JSON list of records, found {type(raw).__name__}")
    root = os.path.dirname(os.path.abspath(path))
    records = []
    for i, record in enumerate(raw):
        problem = record_problem(record, need_prompt)
        if problem:
            name = record.get("id", f"#{i}") if isinstance(record, dict) else f"#{i}"
            report(f"{path}: record {name}: {problem}", strict)
            continue
        if "conversation" in record:
            records.append(dict(record, images=[os.path.join(root, image) for image in record["images"]]))
        else:
            records.append(dict(record, image=os.path.join(root, record["image"])))
    if not records:
        raise ValueError(f"{path}: no usable records")
    return records


def record_problem(record, need_prompt=True):
    if not isinstance(record, dict):
        return f"not an object ({type(record).__name__})"
    if "conversation" in record:
        return conversation_problem(record)
    for field in REQUIRED_FIELDS:
        if field == "prompt" and not need_prompt and field not in record:
            continue
        if field not in record:
            return f"missing field '{field}'"
        if not isinstance(record[field], (str, int)) or (field != "id" and not isinstance(record[field], str)):
            return f"field '{field}' must be a string"
    if "prompt" in record and record["prompt"].count(IMAGE_PLACEHOLDER) != 1:
        return f"prompt must hold exactly one {IMAGE_PLACEHOLDER}"
    return None


def conversation_problem(record):
    """What is wrong with a conversation record {id, conversation, images}, or None."""
    if not isinstance(record.get("id"), (str, int)):
        return "missing field 'id'"
    mixed = [field for field in ("image", "prompt", "answer") if field in record]
    if mixed:
        return f"a conversation record has no {', '.join(repr(f) for f in mixed)} (its turns and images say it all)"
    conversation, images = record["conversation"], record.get("images")
    if not isinstance(conversation, list) or not conversation:
        return "field 'conversation' must be a non-empty list of {role, content} messages"
    if not isinstance(images, list) or not images or not all(isinstance(path, str) for path in images):
        return "field 'images' must be a list of image paths (text-only conversations go to --text_data)"
    for i, message in enumerate(conversation):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {i} must be {{role, content}} with a string content"
        if message.get("role") != want:
            return f"message {i} has role {message.get('role')!r}, expected {want!r} (roles alternate from user)"
    if len(conversation) % 2:
        return "the conversation must end with an assistant message"
    markers = sum(message["content"].count(IMAGE_PLACEHOLDER) for message in conversation[::2])
    if markers != len(images):
        return f"{markers} {IMAGE_PLACEHOLDER} in the user messages but {len(images)} images"
    return None


def record_turns(record):
    """(messages, images) of a record: its conversation and images, or [user: prompt, assistant: answer] and its
    one image. An image is a path or a PIL image."""
    if "conversation" in record:
        return record["conversation"], record["images"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["answer"]}], \
        [record["image"]]


def asked(record):
    """(prompt, answer) a record asks and answers last: the last user and assistant turns of a conversation. None
    for a field a plain record lacks (prompt_counts reads prompts alone, answer_budget answers alone)."""
    if "conversation" in record:
        return record["conversation"][-2]["content"], record["conversation"][-1]["content"]
    return record.get("prompt"), record.get("answer")


def prompt_counts(records):
    """{prompt: how many records ask it}, most common first. A synthetic stream's come from its kinds (taken in
    turn, each with its renderer's prompt) without drawing a sample."""
    if isinstance(records, SynthRecords):
        counts = Counter()
        for first, kind in enumerate(records.kinds):
            counts[RENDERERS[kind][1]] += len(range(first, records.n, len(records.kinds)))
    else:
        counts = Counter(asked(record)[0] for record in records)
    return dict(counts.most_common())


def load_conversations(path, strict=False):
    """
    Text-only conversations, one JSON per line: a list of messages or {"messages": [...]}. A conversation with
    no assistant turn has nothing to learn (its loss would be 0/0): it is reported by line and skipped.
    """
    conversations = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                conversation = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
            messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
            if not (isinstance(messages, list) and messages and
                    all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
                raise ValueError(f"{path}:{line_no}: a conversation is a list of {{role, content}} messages")
            if not any(m["role"] == "assistant" and m["content"] for m in messages):
                report(f"{path}:{line_no}: no assistant turn (nothing to learn from)", strict)
                continue
            conversations.append(conversation)
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


def report(message, strict):
    if strict:
        raise ValueError(message)
    print(f"skipping: {message}")  # on every rank: each one sees its own records


def picture(image):
    """An image drawn already (synthetic records) or loaded from its file (ImageLoadError naming it)."""
    return image if isinstance(image, Image.Image) else load_image(image)


def load_record_image(record):
    """The record's image; a conversation's asked one (its last)."""
    return picture(record_turns(record)[1][-1])


def load_record_images(record):
    """All of a record's images, in the order of their <image> markers."""
    return [picture(image) for image in record_turns(record)[1]]


def render_ids(record, tokenizer, image_mode, images):
    """The record's conversation as (ids, spans) with each image's <|image|> run: spans is the render mask with
    span ids (tokenizer.render_conversation(spans=True); a single-turn record's is its plain mask)."""
    counts = [count_image_tokens(image.width, image.height, image_mode) for image in images]
    return tokenizer.render_conversation(record_turns(record)[0], image_tokens=counts, spans=True)


def conversation_prompt_ids(tokenizer, messages, images, image_mode):
    """The generation prompt for a conversation (its last assistant turn, if any, left out) with its images'
    <|image|> runs, then <|assistant_start|>: a K-shot prompt is the K example turns and the asked image."""
    counts = [count_image_tokens(image.width, image.height, image_mode) for image in images]
    return tokenizer.render_for_completion(messages, image_tokens=counts)


def prompt_ids(tokenizer, prompt, image, image_mode):
    """The generation prompt for one image: the user turn with its <|image|> run, then <|assistant_start|>."""
    return conversation_prompt_ids(tokenizer, [{"role": "user", "content": prompt}], [image], image_mode)


def render_record(record, tokenizer, image_mode, max_tokens=None, images=None):
    """
    One record -> (ids, spans, views) with views a list of (global_view, tiles, tiling), one per image. Raises
    ValueError naming it, also when the record does not fit in max_tokens (training's bound; None: no bound):
    nothing is cut silently. images: the record's images when the caller has already loaded them.
    """
    images = images or load_record_images(record)
    views = [preprocess(image, image_mode) for image in images]
    ids, mask = render_ids(record, tokenizer, image_mode, images)
    if max_tokens is not None and len(ids) > max_tokens:
        raise ValueError(f"{len(ids) - 1} tokens, more than the sequence length {max_tokens - 1} "
                         f"(raise --max_seq_len)")
    return ids, mask, views


def longest_record(records, tokenizer, image_mode, probe=2000):
    """(tokens, id) of the longest training sample (its input length, ids minus one). Every record of a dataset
    file (images opened for their size only); the first `probe` of a synthetic stream."""
    longest = (0, None)
    for index in range(min(len(records), probe) if isinstance(records, SynthRecords) else len(records)):
        record = records[index]
        try:
            sized = count_depends_on_size(image_mode)
            images = [image if isinstance(image, Image.Image) else load_image(image) if sized
                      else Image.new("RGB", (64, 64)) for image in record_turns(record)[1]]
            ids, _ = render_ids(record, tokenizer, image_mode, images)
        except ValueError:
            continue  # a bad record is reported and skipped where it is read
        longest = max(longest, (len(ids) - 1, record["id"]), key=lambda t: t[0])
    return longest


def count_depends_on_size(image_mode):
    """Whether an image's token count depends on its size: only in tiling modes."""
    return resolve_mode(image_mode).tile_size is not None


def render_text(conversation, tokenizer, max_tokens):
    ids, spans = tokenizer.render_conversation(conversation, spans=True)
    return ids[:max_tokens], spans[:max_tokens], []


def pack_rows(samples, row_len):
    """
    Samples into rows of at most row_len input tokens (a sample's is len(ids) - 1), first fit in loader order: a
    sample goes to the first row with room for all of it, or starts a new row. Samples are never split. Returns
    the rows as lists of samples; row_len 0: one sample per row (no packing).
    """
    if not row_len:
        return [[sample] for sample in samples]
    rows, room = [], []
    for sample in samples:
        n = len(sample[0]) - 1
        assert n <= row_len, f"a sample of {n} tokens does not fit a row of {row_len}"
        fits = next((r for r, left in enumerate(room) if n <= left), None)
        if fits is None:
            rows.append([])
            room.append(row_len)
            fits = len(rows) - 1
        rows[fits].append(sample)
        room[fits] -= n
    return rows


def collate(samples, pad_id, device, row_len=0):
    """
    samples: (ids, mask, images) triples -> inputs (B, L), targets (B, L), images, doc_ids (B, L), spans (B, L).
    Each sample gives its ids[:-1] as inputs and ids[1:] as targets (-1 where the mask is 0). row_len > 0 packs
    several samples into a row (pack_rows); 0 gives every sample its own row. L is the longest row; shorter
    rows are padded (input pad_id, target -1). doc_ids numbers the samples of each row 1, 2, ... and is 0 on
    padding (GPT.forward's doc_ids; (doc_ids == 0) counts the padding). images follow the rows in row-major order,
    the order of the <|image|> runs that VLM.embed fills. spans: each target's span id, the mask's value
    (TEACHER / STUDENT for a mask with span ids, 0 where the target is -1).
    """
    rows = pack_rows(samples, row_len)
    L = max(sum(len(ids) - 1 for ids, _, _ in row) for row in rows)
    inputs = torch.full((len(rows), L), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), L), -1, dtype=torch.long)
    doc_ids = torch.zeros((len(rows), L), dtype=torch.long)
    spans = torch.zeros((len(rows), L), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for doc, (ids, mask, _) in enumerate(row, 1):
            ids_t = torch.tensor(ids, dtype=torch.long)
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            end = start + len(ids) - 1
            inputs[r, start:end] = ids_t[:-1]
            targets[r, start:end] = torch.where(keep, ids_t[1:], -1)
            doc_ids[r, start:end] = doc
            spans[r, start:end] = torch.tensor(mask[1:], dtype=torch.long)
            start = end
    use_cuda = torch.device(device).type == "cuda"
    inputs, targets, doc_ids, spans = (t.to(device, non_blocking=use_cuda) for t in (inputs, targets, doc_ids, spans))
    images = [image_to(image, device) for row in rows for _, _, views in row for image in views or []]
    return inputs, targets, images, doc_ids, spans


def image_to(image, device):
    """A preprocessed image (global_view, tiles, tiling) with its tensors on the device."""
    use_cuda = torch.device(device).type == "cuda"
    return PreprocessedImage(*(t.to(device, non_blocking=use_cuda) if torch.is_tensor(t) else t for t in image))


def epoch_order(n, seed, epoch):
    """The same shuffle of range(n) on every rank for a given epoch."""
    order = list(range(n))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return order


def plan(num_records, num_texts, text_ratio, seed, rank, world_size, state):
    """
    The endless sequence of (kind, index, state_after) this rank will consume, starting from `state`.
    kind is "vision" or "text"; state_after is the state to save once this item is in a yielded batch.
    """
    if num_records < world_size:
        raise ValueError(f"{num_records} records cannot be shared by {world_size} ranks")
    state = dict(state)
    orders = {}  # (kind, epoch) -> this rank's order; shuffled once per epoch, not once per item

    def take(kind, n, order_seed, epoch_key, position_key):
        key = (kind, state[epoch_key])
        if key not in orders:
            orders.clear()
            orders[key] = epoch_order(n, order_seed, state[epoch_key])[rank::world_size] or [0]
        order = orders[key]
        index = order[state[position_key]]
        state[position_key] += 1
        if state[position_key] >= len(order):
            state[epoch_key], state[position_key] = state[epoch_key] + 1, 0
        return index

    while True:
        # whether this slot is text is a pure function of (seed, rank, item count): resumable without RNG state
        use_text = num_texts > 0 and random.Random(f"{seed}:{rank}:mix:{state['items']}").random() < text_ratio
        state["items"] += 1
        if use_text:
            index = take("text", num_texts, seed + 1, "text_epoch", "text_position")
            yield "text", index, dict(state)
        else:
            index = take("vision", num_records, seed, "epoch", "position")
            yield "vision", index, dict(state)


def initial_state():
    return {"epoch": 0, "position": 0, "text_epoch": 0, "text_position": 0, "items": 0}


def vision_batches(records, tokenizer, batch_size, max_tokens, image_mode, device="cpu", seed=0, rank=0,
                   world_size=1, texts=None, text_ratio=0.0, resume_state=None, strict=False, num_workers=4,
                   pack=False):
    """
    Endless generator of (inputs, targets, images, doc_ids, spans, state) for one rank (see collate).
    max_tokens bounds a sample's length (the model's sequence_len + 1 for the shifted targets).
    pack: the batch_size samples share rows of up to max_tokens - 1 tokens (fewer rows, less padding); the
    samples, and so the loss and the resume state, are those of the unpacked batch.
    """
    texts = texts or []
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    state = dict(initial_state(), **(resume_state or {}))
    items = plan(len(records), len(texts), text_ratio, seed, rank, world_size, state)

    def prepare(item):
        kind, index, state_after = item
        try:
            if kind == "text":
                return render_text(texts[index], tokenizer, max_tokens), state_after, None
            return render_record(records[index], tokenizer, image_mode, max_tokens), state_after, None
        except (ValueError, OSError, KeyError, TypeError) as e:
            name = records[index]["id"] if kind == "vision" else f"text #{index}"
            return None, state_after, f"record {name}: {e}"

    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        # keep a window of samples in flight so Pillow works while the model trains
        window = [pool.submit(prepare, next(items)) for _ in range(num_workers * batch_size)]
        batch = []
        bad_in_a_row = 0
        reported = set()
        while True:
            sample, state_after, error = window.pop(0).result()
            window.append(pool.submit(prepare, next(items)))
            if error:
                if error not in reported:  # once per bad record, not once per epoch
                    report(error, strict)
                    reported.add(error)
                bad_in_a_row += 1
                if bad_in_a_row > 100:
                    raise ValueError(f"more than 100 bad records in a row, last: {error}")
                continue
            bad_in_a_row = 0
            batch.append(sample)
            if len(batch) == batch_size:
                yield *collate(batch, pad_id, device, max_tokens - 1 if pack else 0), state_after
                batch = []


def eval_batches(records, tokenizer, batch_size, max_tokens, image_mode, device="cpu", rank=0, world_size=1):
    """
    One ordered pass over this rank's share of the records (for validation loss): (inputs, targets, images, spans),
    one record per row (unpacked: the per-row losses of evaluate.validation_sums need it).
    A bad record is reported and left out, as in training.
    """
    def render_or_none(record):
        try:
            return render_record(record, tokenizer, image_mode, max_tokens)
        except (ValueError, OSError) as e:
            report(f"record {record['id']}: {e}", strict=False)
            return None

    pad_id = tokenizer.encode_special("<|assistant_end|>")
    with ThreadPoolExecutor(max_workers=4) as pool:
        batch = []
        for sample in pool.map(render_or_none, records[rank::world_size]):
            if sample is not None:
                batch.append(sample)
            if len(batch) == batch_size:
                yield eval_batch(batch, pad_id, device)
                batch = []
        if batch:
            yield eval_batch(batch, pad_id, device)


def eval_batch(samples, pad_id, device):
    """One record per row: no doc_ids to pass on."""
    inputs, targets, images, _, spans = collate(samples, pad_id, device)
    return inputs, targets, images, spans
