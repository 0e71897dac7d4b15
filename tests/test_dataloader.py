import json
import os

import pytest
import torch

from conftest import write_dataset
from nanovlm.dataloader import initial_state, load_records, plan, prompt_counts, vision_batches
from nanovlm.image_process import count_image_tokens

MODE = "resize:128"
ANSWERS = [f"answer number {i} says {'x' * i}" for i in range(8)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")), ANSWERS)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def answers_in(batch, tokenizer):
    """The supervised text of each row (what the targets teach)."""
    targets = batch[1]
    return [tokenizer.decode([t for t in row.tolist() if t != -1]) for row in targets]


def test_targets_are_the_answer_only(tokenizer, dataset):
    records = load_records(dataset)
    loader = vision_batches(records, tokenizer, 4, 256, MODE, seed=1)
    inputs, targets, images, doc_ids, spans, state = next(loader)
    end = "<|assistant_end|>"
    texts = answers_in((inputs, targets), tokenizer)
    assert all(t.endswith(end) and t[:-len(end)] in ANSWERS for t in texts)
    assert len(images) == 4 and images[0][0].shape == (3, 128, 128)
    # inputs and targets are shifted by one: where a target is set, it is the next input token
    for row_in, row_t in zip(inputs, targets):
        keep = (row_t != -1).nonzero().flatten()
        keep = keep[keep < len(row_in) - 1]
        assert torch.equal(row_t[keep], row_in[keep + 1])


def test_labels_stay_aligned_when_images_sit_at_different_positions(tokenizer, tmp_path):
    path = write_dataset(str(tmp_path), ["first", "second"], prompt="<image>\nOCR this image.")
    records = json.load(open(path))
    records[1]["prompt"] = "A much longer preamble before the picture, so the image starts later: <image>\nOCR."
    json.dump(records, open(path, "w"))
    loader = vision_batches(load_records(path), tokenizer, 2, 256, MODE, seed=0)
    inputs, targets, images, _, _, _ = next(loader)
    image_id = tokenizer.encode_special("<|image|>")
    starts = [(row == image_id).nonzero()[0].item() for row in inputs]
    assert starts[0] != starts[1]
    texts = sorted(answers_in((inputs, targets), tokenizer))
    assert texts == ["first<|assistant_end|>", "second<|assistant_end|>"]
    for row_in, row_t in zip(inputs, targets):  # no target ever lands on or before an image token
        last_image = (row_in == image_id).nonzero().max().item()
        assert torch.all(row_t[:last_image + 1] == -1)


def test_each_epoch_is_a_new_shuffle_covering_everything(tokenizer):
    seen = [index for _, (kind, index, _) in zip(range(16), plan(8, 0, 0.0, 3, 0, 1, initial_state()))]
    assert sorted(seen[:8]) == list(range(8)) and sorted(seen[8:]) == list(range(8))
    assert seen[:8] != seen[8:]
    other_seed = [index for _, (_, index, _) in zip(range(8), plan(8, 0, 0.0, 4, 0, 1, initial_state()))]
    assert other_seed != seen[:8]


def test_two_ranks_see_disjoint_records_that_cover_the_set():
    per_rank = [[index for _, (_, index, _) in zip(range(4), plan(8, 0, 0.0, 5, rank, 2, initial_state()))]
                for rank in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(8))


def test_text_mixing_ratio():
    kinds = [kind for _, (kind, _, _) in zip(range(2000), plan(8, 5, 0.25, 0, 0, 1, initial_state()))]
    assert 0.2 < kinds.count("text") / len(kinds) < 0.3
    kinds = [kind for _, (kind, _, _) in zip(range(100), plan(8, 0, 0.5, 0, 0, 1, initial_state()))]
    assert kinds.count("text") == 0  # no text data, no text samples


def test_text_conversations_are_mixed_into_batches(tokenizer, dataset):
    texts = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "text only reply"}]]
    loader = vision_batches(load_records(dataset), tokenizer, 8, 256, MODE, texts=texts, text_ratio=0.5, seed=0)
    inputs, targets, images, _, _, _ = next(loader)
    supervised = answers_in((inputs, targets), tokenizer)
    n_text = supervised.count("text only reply<|assistant_end|>")
    assert n_text > 0 and len(images) == 8 - n_text


@pytest.mark.parametrize("pack", [False, True])
def test_resume_state_continues_with_the_next_batch(tokenizer, dataset, pack):
    records = load_records(dataset)
    full = take(vision_batches(records, tokenizer, 3, 256, MODE, seed=2, pack=pack), 6)
    state = full[2][5]
    resumed = take(vision_batches(records, tokenizer, 3, 256, MODE, seed=2, pack=pack,
                                  resume_state=json.loads(json.dumps(state))), 3)
    for a, b in zip(full[3:], resumed):
        assert all(torch.equal(a[i], b[i]) for i in (0, 1, 3, 4))  # inputs, targets, doc_ids, spans
        assert all(torch.equal(x[0], y[0]) for x, y in zip(a[2], b[2]))
    if pack:
        assert all(batch[0].size(0) < 3 for batch in full)  # three short samples share rows


def test_packed_batches_hold_the_same_samples(tokenizer, dataset):
    """pack changes the rows, not the samples: each batch teaches the same answers, with its images."""
    records = load_records(dataset)
    plain, packed = (take(vision_batches(records, tokenizer, 4, 256, MODE, seed=3, pack=pack), 3)
                     for pack in (False, True))
    def answers(batch):
        return sorted(t for row in answers_in(batch, tokenizer) for t in row.split("<|assistant_end|>") if t)
    for a, b in zip(plain, packed):
        assert answers(a) == answers(b) and len(answers(b)) == 4
        assert len(b[2]) == 4 and b[0].size(0) < a[0].size(0) and a[5] == b[5]
        assert (b[3] == 0).sum() < (a[3] == 0).sum()  # less padding
        assert int((a[3] > 0).sum()) == int((b[3] > 0).sum())  # the same real tokens


def test_bad_records_are_skipped_by_id_or_stop_in_strict_mode(tokenizer, tmp_path, capsys):
    path = write_dataset(str(tmp_path), ["good one", "bad image", "good two"])
    records = json.load(open(path))
    with open(os.path.join(tmp_path, "images", "1.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    records.append({"id": "no-answer", "image": "images/0.png", "prompt": "<image>"})
    records.append({"id": "no-placeholder", "image": "images/0.png", "prompt": "read", "answer": "x"})
    json.dump(records, open(path, "w"))
    loaded = load_records(path)
    out = capsys.readouterr().out
    assert "no-answer: missing field 'answer'" in out and "no-placeholder: prompt must hold exactly one" in out
    assert len(loaded) == 3
    batch = next(vision_batches(loaded, tokenizer, 4, 256, MODE, seed=0))
    assert "record r1:" in capsys.readouterr().out
    assert all("bad image" not in t for t in answers_in(batch, tokenizer))
    with pytest.raises(ValueError, match="record no-answer"):
        load_records(path, strict=True)
    strict_loader = vision_batches(loaded, tokenizer, 4, 256, MODE, seed=0, strict=True)
    with pytest.raises(ValueError, match="record r1"):
        take(strict_loader, 2)


def test_overlong_records_are_reported_and_skipped_never_cut(tokenizer, tmp_path, capsys):
    path = write_dataset(str(tmp_path), ["word " * 300, "short"])
    batches = vision_batches(load_records(path), tokenizer, 1, 64, MODE)
    inputs, targets, images, _, _, _ = next(batches)
    assert torch.equal(next(batches)[0], inputs)  # the only record that fits, again and again
    out = capsys.readouterr().out
    assert "record r0:" in out and "raise --max_seq_len" in out
    assert (inputs == tokenizer.encode_special("<|image|>")).sum() == count_image_tokens(160, 96, MODE) == 7
    assert inputs.shape[1] < 63  # the short record, whole


def test_malformed_dataset_files(tmp_path):
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_records(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        load_records(str(tmp_path / "missing.json"))


def test_eval_batches_leave_bad_records_out(tokenizer, tmp_path, capsys):
    from nanovlm.dataloader import eval_batches
    path = write_dataset(str(tmp_path), ["one", "two", "three"])
    os.remove(os.path.join(tmp_path, "images", "1.png"))
    batches = list(eval_batches(load_records(path), tokenizer, 2, 256, MODE))
    assert sum(b[0].shape[0] for b in batches) == 2 and "record r1:" in capsys.readouterr().out


def test_no_room_for_the_answer_is_a_bad_record(tokenizer, tmp_path, capsys):
    path = write_dataset(str(tmp_path), ["answer"], prompt="<image>" + " long prompt" * 40)
    with pytest.raises(ValueError, match="more than the sequence length"):
        next(vision_batches(load_records(path), tokenizer, 1, 30, MODE, strict=True))


def test_fewer_records_than_ranks_is_an_error():
    with pytest.raises(ValueError, match="cannot be shared by 4 ranks"):
        next(plan(3, 0, 0.0, 0, 0, 4, initial_state()))


def test_a_conversation_without_an_assistant_turn_is_named_and_skipped(tmp_path, capsys):
    from nanovlm.dataloader import load_conversations
    path = tmp_path / "chats.jsonl"
    lines = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             [{"role": "user", "content": "only a question"}],
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert len(load_conversations(str(path))) == 2
    assert f"{path}:2: no assistant turn" in capsys.readouterr().out
    with pytest.raises(ValueError, match=":2: no assistant turn"):
        load_conversations(str(path), strict=True)


def test_prompt_counts_of_a_dataset_and_of_synthetic_kinds_without_drawing_one(monkeypatch):
    import nanovlm.dataloader
    from nanovlm.synth import PROMPT_FREE_OCR, PROMPT_OCR
    monkeypatch.setattr(nanovlm.dataloader, "make_sample", lambda *a, **kw: pytest.fail("a sample was drawn"))
    # kinds in turn over 7 records: line 0, 3, 6; line2 1, 4; receipt 2, 5 (line and receipt share a prompt)
    assert prompt_counts(load_records("synth:line,line2,receipt:7:0")) == {PROMPT_OCR: 5, PROMPT_FREE_OCR: 2}
    records = [{"prompt": "<image>\na"}, {"prompt": "<image>\nb"}, {"prompt": "<image>\nb"}]
    assert list(prompt_counts(records).items()) == [("<image>\nb", 2), ("<image>\na", 1)]  # most common first
