"""Packing: several whole samples share a row, each computed as if it were alone (mask, positions, images)."""

import torch

from conftest import tiny_vlm, write_dataset
from nanovlm.dataloader import collate, load_records, pack_rows, render_record
from nanovlm.gpt import sample_positions
from nanovlm.training import ctc_targets_of
from test_gpt import tiny_gpt

MODE = "resize:128"
ANSWERS = ["a", "two words", "a somewhat longer answer with more tokens", "x" * 30, "short one", "last"]


def rendered_samples(tokenizer, tmp_path):
    records = load_records(write_dataset(str(tmp_path), ANSWERS))
    return [render_record(r, tokenizer, MODE) for r in records]


def packed_order(samples, row_len):
    """The index of each sample in packed row-major order (the order of the packed batch's images)."""
    return [next(i for i, t in enumerate(samples) if t is s) for row in pack_rows(samples, row_len) for s in row]


def test_rows_hold_whole_samples_first_fit_in_order():
    samples = [([0] * (n + 1), None, None) for n in (5, 3, 6, 2, 4)]  # input lengths 5, 3, 6, 2, 4
    rows = pack_rows(samples, 8)
    assert [[len(s[0]) - 1 for s in row] for row in rows] == [[5, 3], [6, 2], [4]]
    assert pack_rows(samples, 0) == [[s] for s in samples]


def test_positions_restart_at_every_sample():
    doc_ids = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
    assert sample_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0]]


def test_no_token_sees_another_sample():
    """Changing sample A changes none of sample B's logits, and B packed after A reads exactly as B alone."""
    model = tiny_gpt()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    other_a = (a + 1) % 97
    doc_ids = torch.tensor([[1] * 7 + [2] * 9])
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), doc_ids=doc_ids)
        changed = model(torch.cat([other_a, b], 1), doc_ids=doc_ids)
        alone = model(b)
    assert not torch.allclose(packed[:, :7], changed[:, :7])
    assert torch.equal(packed[:, 7:], changed[:, 7:])
    assert (packed[:, 7:] - alone).abs().max() <= 1e-5
    assert (packed[:, :7] - model(a)).abs().max() <= 1e-5


def test_packed_and_unpacked_give_the_same_loss_and_gradients(tokenizer, tmp_path, one_thread):
    samples = rendered_samples(tokenizer, tmp_path)
    pad = tokenizer.encode_special("<|assistant_end|>")
    row_len = 2 * max(len(ids) - 1 for ids, _, _ in samples)
    model = tiny_vlm(tokenizer, sequence_len=row_len).train()
    with torch.no_grad():  # the GPT's init zeroes its output layers: give them values so gradients reach everything
        for name, p in model.gpt.named_parameters():
            if name.endswith("c_proj.weight") or name.startswith("lm_head"):
                p.normal_(0, 0.05)
    results = {}
    for packed in (False, True):
        inputs, targets, images, doc_ids, _ = collate(samples, pad, "cpu", row_len if packed else 0)
        loss = model(inputs, images=images, targets=targets, doc_ids=doc_ids if packed else None)
        loss.backward()
        results[packed] = (inputs.shape, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                         if p.grad is not None})
        model.zero_grad(set_to_none=True)
    (shape, loss, grads), (packed_shape, packed_loss, packed_grads) = results[False], results[True]
    assert packed_shape[0] < shape[0] == len(ANSWERS)  # it did pack
    assert (loss - packed_loss).abs() <= 1e-5
    assert grads.keys() == packed_grads.keys() and any(n.startswith("encoder.sam") for n in grads)
    for name in grads:
        assert (grads[name] - packed_grads[name]).abs().max() <= 1e-5, name


def test_each_image_lands_in_its_own_sample(tokenizer, tmp_path, one_thread):
    """The spliced embeddings of every packed sample equal those of its unpacked row: images in row-major order."""
    samples = rendered_samples(tokenizer, tmp_path)
    pad = tokenizer.encode_special("<|assistant_end|>")
    model = tiny_vlm(tokenizer).eval()
    inputs, _, images, _, _ = collate(samples, pad, "cpu")
    row_len = 2 * inputs.size(1)
    p_inputs, _, p_images, p_doc_ids, _ = collate(samples, pad, "cpu", row_len)
    with torch.no_grad():
        rows, packed = model.embed(inputs, images), model.embed(p_inputs, p_images)
    segments = [(r, p_doc_ids[r] == d) for r in range(p_inputs.size(0)) for d in range(1, int(p_doc_ids[r].max()) + 1)]
    assert p_inputs.size(0) < len(samples) and len(segments) == len(samples)
    for (r, in_sample), i in zip(segments, packed_order(samples, row_len)):
        n = int(in_sample.sum())
        assert torch.equal(p_inputs[r, in_sample], inputs[i, :n])
        assert torch.equal(packed[r, in_sample], rows[i, :n])  # its own image's features, in its own slots
    assert not torch.equal(images[0].global_view, images[1].global_view)  # the images do differ


def test_ctc_texts_are_one_per_image_whether_packed_or_not(tokenizer, tmp_path):
    samples = rendered_samples(tokenizer, tmp_path)
    pad, image_id = tokenizer.encode_special("<|assistant_end|>"), tokenizer.encode_special("<|image|>")
    inputs, targets, _, _, _ = collate(samples, pad, "cpu")
    p_inputs, p_targets, _, _, _ = collate(samples, pad, "cpu", 2 * inputs.size(1))
    texts = [bytes(t.tolist()).decode() for t in ctc_targets_of(inputs, targets, tokenizer, image_id)]
    packed = [bytes(t.tolist()).decode() for t in ctc_targets_of(p_inputs, p_targets, tokenizer, image_id)]
    assert texts == ANSWERS and p_inputs.size(0) < len(ANSWERS)
    assert packed == [ANSWERS[i] for i in packed_order(samples, 2 * inputs.size(1))]  # the packed images' order
