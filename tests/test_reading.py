"""The reading path: rectangular image modes, the projector-output norm, the CTC read-out, on-the-fly synthetic
records, the image-gap and feature-spread monitors, the marked-up sheet, and no silent truncation."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_dataset
from nanovlm.dataloader import SynthRecords, collate, load_records, longest_record, render_record, vision_batches
from nanovlm.deepencoder import DeepEncoderConfig
from nanovlm.evaluate import (FEATURE_SPREAD_WARN, IMAGE_GAP_WARN, evaluate_records, feature_spread,
                              swapped_images, summarize)
from nanovlm.gpt import GPTConfig
from nanovlm.image_process import count_image_tokens, preprocess
from nanovlm.metrics import wrong_characters
from nanovlm.sheet import make_sheet
from nanovlm.training import RunError, calibrate_image_norm, ctc_targets_of, sequence_length
from nanovlm.vlm import build_vlm, ctc_greedy, preset_configs

ANSWERS = ["alpha 12.50", "beta 3 4 5", "gamma OPEN", "delta line"]


def reading_vlm(tokenizer, image_mode="resize:128", ctc=False, token_ctc_split=0, seed=0):
    """A tiny VLM with the projector-output norm (and optionally the CTC read-outs) sized for image_mode."""
    torch.manual_seed(seed)
    gpt_config, encoder_config, _ = preset_configs("lines" if ctc else "tiny", tokenizer.get_vocab_size(),
                                                   image_mode, sequence_len=128)
    encoder_config.token_ctc_split = token_ctc_split
    return build_vlm(gpt_config, encoder_config, tokenizer.encode_special("<|image|>"))


def test_rect_mode_keeps_a_line_in_one_row_of_tokens(tokenizer):
    model = reading_vlm(tokenizer, "rect:1024:64", ctc=True).eval()
    view = preprocess(Image.new("RGB", (320, 128), "white"), "rect:1024:64")
    assert view.global_view.shape == (3, 64, 1024) and view.tiles is None
    sequence = model.encoder.encode_image(*view)
    assert sequence.shape == (count_image_tokens(320, 128, "rect:1024:64"), 128) == (16 + 1 + 1, 128)
    assert model.encoder.config.proj_norm_grid == (1, 16) and model.encoder.config.ctc_rows == 4


def test_proj_norm_takes_out_what_every_image_shares(tokenizer):
    encoder = reading_vlm(tokenizer).encoder.train()
    pixels = torch.randn(6, 3, 128, 128)
    with torch.no_grad():
        encoder.projector.layers.bias.add_(100.0)  # an image-independent "soft prompt" component
        features = encoder(pixels)
    assert features.mean(dim=0).abs().max() < 1e-4  # per position and channel: zero mean over the batch
    assert (features.std(dim=0, unbiased=False) - 1).abs().max() < 1e-2
    encoder.eval()
    with torch.no_grad():  # eval, and a training batch of one image, use the running statistics
        single = encoder(pixels[:1])
        encoder.train()
        assert torch.allclose(encoder(pixels[:1]), single)
    with pytest.raises(ValueError, match="proj_norm was built for a 2x2 grid"):
        encoder(torch.randn(2, 3, 256, 256))


def test_ctc_loss_trains_the_sam_neck_and_token_read_outs(tokenizer):
    model = reading_vlm(tokenizer, "rect:1024:64", ctc=True, token_ctc_split=4).train()
    records = load_records("synth:line2:4:0")
    batch = collate([render_record(r, tokenizer, "rect:1024:64", 200) for r in records],
                    tokenizer.encode_special("<|assistant_end|>"), "cpu")
    inputs, targets, images, _, _ = batch
    texts = ctc_targets_of(inputs, targets, tokenizer, model.image_token_id)
    assert [bytes(t.tolist()).decode() for t in texts] == [r["answer"] for r in records]
    lm_loss, ctc_loss = model(inputs, images=images, targets=targets, ctc_targets=texts)
    assert torch.isfinite(lm_loss) and torch.isfinite(ctc_loss) and ctc_loss > 0
    ctc_loss.backward()
    assert model.encoder.sam.ctc_head.weight.grad.abs().sum() > 0
    assert model.encoder.token_ctc_head.weight.grad.abs().sum() > 0
    assert model.encoder.projector.layers.weight.grad.abs().sum() > 0  # the token read-out trains the path in
    assert model.encoder.sam.blocks[0].mlp.lin1.weight.grad.abs().sum() > 0
    assert model.gpt.lm_head.weight.grad is None  # the CTC read-out reaches SAM, not the GPT


def test_synthetic_records_are_drawn_on_demand_and_deterministic(tokenizer):
    records = load_records("synth:line2,line:1000:3")
    assert len(records) == 1000 and isinstance(records, SynthRecords)
    first = records[0]
    assert isinstance(first["image"], Image.Image) and first["type"] == "line2" and records[1]["type"] == "line"
    assert records[0]["answer"] == load_records("synth:line2,line:1000:3")[0]["answer"]
    assert records[0]["answer"] != load_records("synth:line2,line:1000:4")[0]["answer"]
    assert [r["id"] for r in records[2:4]] == [records[2]["id"], records[3]["id"]]
    for bad in ("synth:", "synth:line2", "synth:nope:10", "synth:line2:0", "synth:line2:x", "synth:line2:5:1:-1",
                "synth:line2:5:1:2:3"):
        with pytest.raises(ValueError, match="synthetic data spec"):
            load_records(bad)
    inputs, targets, images, _, _, state = next(vision_batches(records, tokenizer, 4, 200, "rect:1024:64",
                                                               num_workers=1))
    assert inputs.shape[0] == 4 and len(images) == 4 and state["position"] == 4


def test_an_overlong_record_is_named_never_cut(tokenizer, tmp_path, capsys):
    data = write_dataset(str(tmp_path), ["short", "a much longer answer " * 12])
    records = load_records(data)
    length, name = longest_record(records, tokenizer, "resize:128")
    assert name == "r1" and length > 60
    model = reading_vlm(tokenizer)
    assert sequence_length(model, tokenizer, records, None, "resize:128", 0) == length  # default: fits all
    with pytest.raises(RunError, match=r"record r1 is \d+ tokens, longer than --max_seq_len=40"):
        sequence_length(model, tokenizer, records, None, "resize:128", 40)
    with pytest.raises(ValueError, match="raise --max_seq_len"):
        render_record(records[1], tokenizer, "resize:128", 41)


def test_swapped_images_pair_rows_with_runs_of_the_same_length():
    inputs = torch.tensor([[9, 9, 1], [9, 9, 2], [9, 1, 1], [3, 3, 3], [9, 9, 9]])  # runs of 2, 2, 1, 0, 3
    images = ["a", "b", "c", "e"]
    swapped, got_other = swapped_images(inputs, images, image_token_id=9)
    assert swapped == ["b", "a", "c", "e"] and got_other.tolist() == [True, True, False, False, False]


def train_on(tokenizer, records, steps=80):
    """Overfit a tiny VLM on a handful of records (all in every batch), as the tier-1 run does, then calibrate
    the projector-output norm as training does before an eval."""
    model = reading_vlm(tokenizer).train()
    pad = tokenizer.encode_special("<|assistant_end|>")
    inputs, targets, images, _, _ = collate([render_record(r, tokenizer, "resize:128", 128) for r in records], pad,
                                            "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(inputs, images=images, targets=targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    calibrate_image_norm(model, records, tokenizer, "resize:128", 128, "cpu", len(records))
    return model.eval()


def test_image_gap_is_large_for_a_model_that_reads_and_zero_when_the_image_path_is_cut(tokenizer, tmp_path,
                                                                                      one_thread):
    records = load_records(write_dataset(str(tmp_path), ANSWERS))
    model = train_on(tokenizer, records)
    summary = summarize(evaluate_records(model, tokenizer, records, "resize:128", max_new_tokens=16))
    assert summary["image_gap"] > 10 * IMAGE_GAP_WARN, summary["image_gap"]
    assert summary["exact"] == len(records)
    assert all(s["swapped_loss"] is not None for s in summary["samples"])

    encode = model.encoder.encode_images
    model.encoder.encode_images = lambda images: [torch.zeros_like(s) for s in encode(images)]  # the cut
    cut = summarize(evaluate_records(model, tokenizer, records, "resize:128", max_new_tokens=8))
    assert abs(cut["image_gap"]) < 1e-5


def test_feature_spread_is_quiet_on_a_fresh_encoder_and_fires_on_a_collapsed_one(tokenizer):
    encoder = reading_vlm(tokenizer).encoder.eval()
    images = [preprocess(make, "resize:128") for make in (Image.new("RGB", (100, 60), c) for c in
                                                           ["white", "black", "red", "navy"])]
    images += [preprocess(Image.effect_noise((96, 96), 60).convert("RGB"), "resize:128")]
    assert feature_spread(encoder, images) > 5 * FEATURE_SPREAD_WARN
    with torch.no_grad():  # a collapsed encoder: the patch embedding ignores the pixels
        encoder.sam.patch_embed.proj.weight.zero_()
    assert feature_spread(encoder, images) < FEATURE_SPREAD_WARN
    assert feature_spread(encoder, images[:1]) is None


def test_wrong_characters_marks_substitutions_insertions_and_counts_deletions():
    assert wrong_characters("RX-4471", "RX-4471") == ([False] * 7, 0)
    assert wrong_characters("RX-4171", "RX-4471") == ([False] * 4 + [True] + [False] * 2, 0)
    wrong, missing = wrong_characters("RXX-44", "RX-44")
    assert sum(wrong) == 1 and "RXX-44"[wrong.index(True)] == "X" and missing == 0
    assert wrong_characters("R-44", "RX-44") == ([False] * 4, 1)
    assert wrong_characters("", "ab") == ([], 2)


def test_sheet_draws_one_cell_per_record(tokenizer, tmp_path):
    records = load_records(write_dataset(str(tmp_path), ANSWERS + ["e", "f", "g"]))
    samples = [dict(id=r["id"], prediction=r["answer"][::-1], reference=r["answer"], exact=False, cer=1.0)
               for r in records]
    path = make_sheet(records, samples, str(tmp_path / "sheet.png"))
    sheet = Image.open(path)
    assert sheet.size[0] > 900 and sheet.size[1] > 3 * 128 - 1  # 3 columns, 3 rows
    # red ink: the wrong characters are marked
    assert any(px[0] > 180 and px[1] < 80 for px in np.asarray(sheet.convert("RGB")).reshape(-1, 3))


def test_batched_generation_equals_one_by_one_on_a_trained_model(tokenizer, tmp_path, one_thread):
    from nanovlm.dataloader import load_record_image, prompt_ids
    from nanovlm.engine import Engine
    records = load_records(write_dataset(str(tmp_path), ANSWERS))
    model = train_on(tokenizer, records)
    engine = Engine(model, tokenizer)
    prompts, images = [], []
    for i, record in enumerate(records):  # prompts of four different lengths
        image = load_record_image(record)
        prompts.append(prompt_ids(tokenizer, record["prompt"] + " please" * (2 * i), image, "resize:128"))
        images.append([preprocess(image, "resize:128")])
    assert len({len(p) for p in prompts}) == 4
    one_by_one = [engine.generate_batch(p, images=im, max_tokens=20, temperature=0.0)[0][0][len(p):]
                  for p, im in zip(prompts, images)]
    assert engine.generate_many(prompts, images=images, max_tokens=20) == one_by_one
    assert tokenizer.decode(one_by_one[0]) == ANSWERS[0]  # it reads, and each row stopped on its own


def test_batched_generation_mixes_image_modes_and_text_only_rows(tokenizer, vlm, one_thread):
    from nanovlm.dataloader import prompt_ids
    from nanovlm.engine import Engine
    engine = Engine(vlm, tokenizer)
    picture = Image.effect_noise((300, 200), 50).convert("RGB")
    small = prompt_ids(tokenizer, "<image>\nOCR this image.", picture, "resize:128")
    tiled = prompt_ids(tokenizer, "<image>\nFree OCR.", picture, "gundam:128:256")
    text = tokenizer.render_for_completion([{"role": "user", "content": "Hello there, how are you?"}])
    rows = [(small, [preprocess(picture, "resize:128")]), (tiled, [preprocess(picture, "gundam:128:256")]),
            (text, [])]
    assert preprocess(picture, "gundam:128:256").tiles is not None
    one_by_one = [engine.generate_batch(p, images=im, max_tokens=12, temperature=0.0)[0][0][len(p):]
                  for p, im in rows]
    assert engine.generate_many([p for p, _ in rows], images=[im for _, im in rows], max_tokens=12) == one_by_one


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    """Class 0 is the blank, class b + 1 byte b: 'aa' needs a blank between its letters, a repeat is one letter."""
    a, b = ord("a") + 1, ord("b") + 1
    steps = [[a, a, 0, a, b, b, 0], [0, 0, 0, 0, 0, 0, 0]]  # "aab" and nothing
    log_probs = torch.full((7, 2, 257), -10.0)
    for row, classes in enumerate(steps):
        for t, c in enumerate(classes):
            log_probs[t, row, c] = 0.0
    assert ctc_greedy(log_probs) == ["aab", ""]


def test_eval_reports_what_the_ctc_read_out_reads(tokenizer, tmp_path):
    """A lines model's eval scores its SAM read-out beside the answer (ctc_prediction, ctc_cer, the summary's
    ctc_cer); a model without the read-out has none."""
    records = load_records(write_dataset(str(tmp_path), ANSWERS))
    model = reading_vlm(tokenizer, "line:1024:64", ctc=True)
    summary = summarize(evaluate_records(model, tokenizer, records, "line:1024:64", max_new_tokens=2))
    assert all(isinstance(s["ctc_prediction"], str) and s["ctc_cer"] >= 0 for s in summary["samples"])
    assert summary["ctc_cer"] == pytest.approx(sum(s["ctc_cer"] for s in summary["samples"]) / len(records))
    plain = summarize(evaluate_records(reading_vlm(tokenizer), tokenizer, records, "resize:128", max_new_tokens=2))
    assert plain["ctc_cer"] is None and "ctc_cer" not in plain["samples"][0]
