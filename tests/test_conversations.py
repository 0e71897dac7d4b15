"""Conversation records (K-shot: example image -> answer turns, then the asked image): validation, rendering with
teacher / student spans, packing, per-span losses, the engine, make_data --shots and a training run's lines."""

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from conftest import tiny_vlm, write_dataset
from nanovlm.dataloader import (collate, conversation_prompt_ids, load_record_images, load_records, prompt_counts,
                                prompt_ids, render_record)
from nanovlm.engine import Engine, generate_naive
from nanovlm.evaluate import evaluate_records, swapped_images, validation_sums
from nanovlm.image_process import count_image_tokens, preprocess
from nanovlm.synth import PROMPT_OCR, make_sample, make_shots
from nanovlm.tokenizer import STUDENT, TEACHER
from nanovlm.training import ctc_targets_of, lm_objective
from test_packing import packed_order
from test_training import run_script

MODE = "resize:128"
PROMPT = "<image>\nOCR this image."
END = "<|assistant_end|>"


def write_conversations(directory, answer_lists, prompt=PROMPT):
    """A dataset JSON of conversation records: per list of answers, one turn (a drawn image, then its answer)
    each. Returns the JSON path."""
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    records = []
    for i, answers in enumerate(answer_lists):
        conversation, images = [], []
        for j, answer in enumerate(answers):
            image = Image.new("RGB", (160, 96), "white")
            ImageDraw.Draw(image).text((6 + 11 * j, 20 + 9 * i), answer, fill="black")
            images.append(f"images/c{i}_{j}.png")
            image.save(os.path.join(directory, images[-1]))
            conversation += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        records.append({"id": f"c{i}", "conversation": conversation, "images": images, "source": "test",
                        "type": "doc"})
    path = os.path.join(directory, "dataset.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def pad_id(tokenizer):
    return tokenizer.encode_special(END)


def trained_looking(model):
    with torch.no_grad():  # the GPT's init zeroes its output layers: give them values so losses differ by token
        for name, p in model.gpt.named_parameters():
            if name.endswith("c_proj.weight") or name.startswith("lm_head"):
                p.normal_(0, 0.05)
    return model.eval()


def test_single_image_records_render_as_they_always_did(tokenizer, tmp_path):
    records = load_records(write_dataset(str(tmp_path), ["first answer", "second"]))
    n = count_image_tokens(160, 96, MODE)
    samples = []
    for record in records:
        ids, mask, views = render_record(record, tokenizer, MODE)
        turns = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["answer"]}]
        assert (ids, mask) == tokenizer.render_conversation(turns, image_tokens=[n]) and len(views) == 1
        samples.append((ids, mask, views))
    _, targets, images, _, spans = collate(samples, pad_id(tokenizer), "cpu")
    assert len(images) == 2 and torch.equal(spans, (targets != -1).long())  # all student: no teacher span


def test_every_answer_is_learned_and_the_last_is_the_student(tokenizer, tmp_path):
    path = write_conversations(str(tmp_path), [["one <|image|> two", "second example", "the asked answer"]])
    record = load_records(path)[0]
    record["conversation"][0]["content"] += " Not an image: <|image|>."
    ids, spans, views = render_record(record, tokenizer, MODE)
    assert len(views) == 3 and record["images"][0].startswith(str(tmp_path))  # paths relative to the JSON
    def text(span):
        return tokenizer.decode([t for t, s in zip(ids, spans) if s == span])
    assert text(TEACHER) == f"one <|image|> two{END}second example{END}"
    assert text(STUDENT) == f"the asked answer{END}"
    # typed <|image|> strings are plain text: only the three images' runs are image tokens
    assert ids.count(tokenizer.encode_special("<|image|>")) == 3 * count_image_tokens(160, 96, MODE)


def test_malformed_conversation_records_are_named_and_skipped_or_stop_in_strict_mode(tmp_path, capsys):
    path = write_conversations(str(tmp_path), [["a", "b"]])
    good = json.load(open(path))[0]
    turns = good["conversation"]
    bad = [dict(good, id="one-image-short", images=good["images"][:1]),
           dict(good, id="two-users", conversation=[turns[0], dict(turns[1], role="user")] + turns[2:]),
           dict(good, id="ends-with-user", conversation=turns[:3], images=good["images"][:2]),
           dict(good, id="with-prompt", prompt=PROMPT),
           dict(good, id="no-images", conversation=[{"role": "user", "content": "hi"}, turns[1]], images=[])]
    json.dump([good] + bad, open(path, "w"))
    assert [r["id"] for r in load_records(path)] == ["c0"]
    out = capsys.readouterr().out
    for expected in ["one-image-short: 2 <image> in the user messages but 1 images",
                     "two-users: message 1 has role 'user', expected 'assistant'",
                     "ends-with-user: the conversation must end with an assistant message",
                     "with-prompt: a conversation record has no 'prompt'",
                     "no-images: field 'images' must be a list of image paths"]:
        assert f"record {expected}" in out, out
    with pytest.raises(ValueError, match="record one-image-short: 2 <image>"):
        load_records(path, strict=True)


def test_each_image_fills_its_own_run_in_order(tokenizer, vlm, tmp_path):
    record = load_records(write_conversations(str(tmp_path), [["first", "second one", "third"]]))[0]
    inputs, _, images, _, _ = collate([render_record(record, tokenizer, MODE)], pad_id(tokenizer), "cpu")
    is_image = (inputs[0] == vlm.image_token_id).int()
    edges = torch.diff(is_image, prepend=torch.zeros(1, dtype=torch.int), append=torch.zeros(1, dtype=torch.int))
    runs = list(zip((edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()))
    with torch.no_grad():
        embeds = vlm.embed(inputs, images)
        alone = [vlm.encoder.encode_images([image])[0] for image in images]
    assert len(runs) == 3 and not torch.allclose(alone[0], alone[1])
    for (start, end), features in zip(runs, alone):
        assert torch.allclose(embeds[0, start:end], features, atol=1e-5)


def mixed_samples(tokenizer, tmp_path):
    """Rendered samples: two conversations (2-shot, 1-shot) and two single-image records, interleaved."""
    conversations = load_records(write_conversations(str(tmp_path / "c"), [["ex one", "ex two", "asked"],
                                                                            ["only example", "the last one"]]))
    singles = load_records(write_dataset(str(tmp_path / "s"), ["alpha 12", "beta"]))
    records = [conversations[0], singles[0], conversations[1], singles[1]]
    return records, [render_record(r, tokenizer, MODE) for r in records]


def test_packing_keeps_spans_with_their_tokens(tokenizer, tmp_path):
    _, samples = mixed_samples(tokenizer, tmp_path)
    inputs, targets, _, _, spans = collate(samples, pad_id(tokenizer), "cpu")
    row_len = 2 * inputs.size(1)
    p_inputs, p_targets, p_images, p_doc_ids, p_spans = collate(samples, pad_id(tokenizer), "cpu", row_len)
    assert p_inputs.size(0) < len(samples) and len(p_images) == 7
    segments = [(r, p_doc_ids[r] == d) for r in range(p_inputs.size(0)) for d in range(1, int(p_doc_ids[r].max()) + 1)]
    for (r, in_sample), i in zip(segments, packed_order(samples, row_len)):
        n = int(in_sample.sum())
        assert torch.equal(p_inputs[r, in_sample], inputs[i, :n]) and torch.equal(p_spans[r, in_sample], spans[i, :n])
        assert torch.equal(p_targets[r, in_sample], targets[i, :n])
    assert torch.equal(p_spans > 0, p_targets != -1) and (p_spans == TEACHER).any()


def test_span_losses_match_a_hand_computation(tokenizer, tmp_path, one_thread):
    _, samples = mixed_samples(tokenizer, tmp_path)
    model = trained_looking(tiny_vlm(tokenizer))
    inputs, targets, images, _, spans = collate(samples, pad_id(tokenizer), "cpu")
    with torch.no_grad():
        logits = model(inputs, images=images)
        losses = model(inputs, images=images, targets=targets, loss_reduction="supervised")
        mean = model(inputs, images=images, targets=targets)  # the loss without spans
        val = validation_sums(model, [(inputs, targets, images, spans)], "cpu")[0]
    def by_hand(span):
        where = spans == span
        return F.cross_entropy(logits[where], targets[where], reduction="sum"), where.sum().float()
    (teacher, n_teacher), (student, n_student) = by_hand(TEACHER), by_hand(STUDENT)
    assert n_teacher > 0 and n_student > 0
    expected = torch.stack([teacher, n_teacher, student, n_student])
    assert torch.allclose(val[4:].float(), expected, rtol=1e-5)
    for weight in (1.0, 0.5, 0.0, 3.0):
        total, sums = lm_objective(losses, spans[targets != -1], weight)
        assert torch.allclose(sums, expected, rtol=1e-5)
        assert torch.allclose(total, (weight * teacher + student) / (weight * n_teacher + n_student), rtol=1e-5)
    assert abs(lm_objective(losses, spans[targets != -1], 1.0)[0] - mean) <= 1e-6  # weight 1: the old loss
    # single-turn records have no teacher span: the old loss at any weight
    inputs, targets, images, _, spans = collate([samples[1], samples[3]], pad_id(tokenizer), "cpu")
    with torch.no_grad():
        losses = model(inputs, images=images, targets=targets, loss_reduction="supervised")
        mean = model(inputs, images=images, targets=targets)
    assert abs(lm_objective(losses, spans[targets != -1], 0.3)[0] - mean) <= 1e-6


def test_the_engine_answers_a_k_shot_prompt(tokenizer, vlm, tmp_path):
    record = load_records(write_conversations(str(tmp_path), [["first", "second one", "third"]]))[0]
    pictures = load_record_images(record)
    ids = conversation_prompt_ids(tokenizer, record["conversation"], pictures, MODE)
    assert ids[-1] == tokenizer.encode_special("<|assistant_start|>")
    assert ids.count(vlm.image_token_id) == 3 * count_image_tokens(160, 96, MODE)
    views = [preprocess(picture, MODE) for picture in pictures]
    single = prompt_ids(tokenizer, PROMPT, pictures[0], MODE)
    out = Engine(vlm, tokenizer).generate_many([ids, single], images=[views, views[:1]], max_tokens=12)
    naive = generate_naive(vlm, tokenizer, ids, views, max_tokens=12)
    assert out[0] == naive and len(naive) > 0
    assert out[1] == generate_naive(vlm, tokenizer, single, views[:1], max_tokens=12)


def test_evaluate_asks_a_conversation_its_turns_and_scores_its_last_answer(tokenizer, vlm, tmp_path):
    path = write_conversations(str(tmp_path), [["ex a", "asked a"], ["ex b", "asked b"]])
    records = load_records(path)
    samples = evaluate_records(vlm, tokenizer, records, MODE, max_new_tokens=6)
    pictures = load_record_images(records[0])
    naive = generate_naive(vlm, tokenizer, conversation_prompt_ids(tokenizer, records[0]["conversation"], pictures,
                                                                   MODE),
                           [preprocess(p, MODE) for p in pictures], max_tokens=6)
    assert samples[0]["prediction"] == tokenizer.decode(naive)
    assert [s["reference"] for s in samples] == ["asked a", "asked b"] and samples[0]["prompt"] == PROMPT
    assert all(s["loss"] is not None and s["swapped_loss"] is not None for s in samples)


def test_swapped_images_swap_whole_rows_of_several_images():
    inputs = torch.tensor([[9, 9, 1, 9, 2], [9, 9, 3, 9, 4], [9, 9, 9, 1, 1], [9, 9, 1, 1, 1]])  # runs 2+1, 2+1, 3, 2
    swapped, got_other = swapped_images(inputs, ["a1", "a2", "b1", "b2", "c", "d"], image_token_id=9)
    assert swapped == ["b1", "b2", "a1", "a2", "c", "d"] and got_other.tolist() == [True, True, False, False]
    # two images in one run (<image><image>): which image is whose cannot be told, so nothing is swapped
    swapped, got_other = swapped_images(inputs[:2], ["a1", "a2", "a3", "b1", "b2"], image_token_id=9)
    assert swapped == ["a1", "a2", "a3", "b1", "b2"] and not got_other.any()


def test_ctc_texts_are_each_images_own_answer(tokenizer, tmp_path):
    records, samples = mixed_samples(tokenizer, tmp_path)
    image_id = tokenizer.encode_special("<|image|>")
    inputs, targets, images, _, _ = collate(samples, pad_id(tokenizer), "cpu", 1000)
    texts = [bytes(t.tolist()).decode() for t in ctc_targets_of(inputs, targets, tokenizer, image_id)]
    answers = [["ex one", "ex two", "asked"], ["alpha 12"], ["only example", "the last one"], ["beta"]]
    assert texts == [a for i in packed_order(samples, 1000) for a in answers[i]] and len(texts) == len(images)


def test_make_data_shots_and_synthetic_shots(tmp_path):
    from scripts.make_data import generate
    records = load_records(generate(str(tmp_path), 2, "val", 0, ["line"], 1, shots=2))
    record = records[1]
    assert [m["role"] for m in record["conversation"]] == ["user", "assistant"] * 3
    assert [m["content"] for m in record["conversation"][1::2]] == \
        [make_sample("line", 0, "val", 3 + j)[0]["answer"] for j in range(3)]  # samples 3, 4, 5: none shared
    assert len(record["images"]) == 3 and all(os.path.isfile(p) for p in record["images"])
    assert record["id"] == "val_000001_line_2shot" and prompt_counts(records) == {PROMPT_OCR: 2}
    synthetic = load_records("synth:line:4:0:2")
    assert synthetic[1]["conversation"] == make_shots("line", 0, "train", 1, 2)[0]["conversation"]
    assert len(synthetic[1]["images"]) == 3 and isinstance(synthetic[1]["images"][0], Image.Image)


def test_a_k_shot_run_logs_teacher_and_student_losses(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "tokenizer"))
    data = write_conversations(str(tmp_path / "data"), [["ex one", "asked one"], ["ex two", "asked two"],
                                                         ["ex three", "asked three"], ["ex four", "asked four"]])
    out = run_script(tmp_path, "scripts.vis_tok_train", f"--data={data}", "--model_tag=shots", "--num_iterations=2",
                     "--total_batch_size=4", "--eval_every=-1", "--eval_samples=1", "--max_new_tokens=4",
                     "--image_mode=resize:128", "--teacher_weight=0.5")
    steps = re.findall(r"step \d+/00002 .*?\| loss [\d.]+ \| teacher ([\d.]+) student ([\d.]+) \|", out)
    assert len(steps) == 2, out
    assert re.search(r"Step 00002 \| val loss [\d.]+ \| teacher [\d.]+ student [\d.]+", out), out
    out = run_script(tmp_path, "scripts.vision_sample", f"--data={data}", "--model_tag=shots", "--max_new_tokens=4",
                     f"--json={tmp_path / 'eval.json'}")
    samples = json.loads((tmp_path / "eval.json").read_text())["samples"]
    assert [s["reference"] for s in samples] == ["asked one", "asked two", "asked three", "asked four"]
    assert all(s["prompt"] == PROMPT and s["loss"] is not None for s in samples)
