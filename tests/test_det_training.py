"""The detection head inside the VLM and the training loop: one pass gives the LM loss (unchanged) and the head's
losses, the head reads each image's own sample up to its answer (packed or not), a record without boxes gives only
negatives, the head has its own optimizer group and FLOP stages, and a --det_head=True run logs every loss, saves
a checkpoint that reloads with its head and scores the head's boxes at eval."""

import json
import math
import os
import re

import pytest
import torch
from PIL import Image

from conftest import tiny_vlm
from nanovlm.dataloader import collate, render_record
from nanovlm.detection import DetHead, DetHeadConfig, sigmoid_focal_loss
from nanovlm.training import det_targets_of, group_parameters
from nanovlm.vlm import COMPONENTS, image_contexts, model_meta, weight_elements_by_stage
from test_training import FAST, run_in_process, workspace  # noqa: F401  (workspace: a fixture)

HEAD = DetHeadConfig(n_queries=3, n_layers=1, n_heads=2, dim=16, vision_dim=32, text_dim=32)
BOXED = "<|ref|>hello<|/ref|><|det|>[[100, 200, 500, 300]]<|/det|>\n<|ref|>world<|/ref|><|det|>[[600, 700, 900, 800]]<|/det|>"


def model_with_head(tokenizer):
    model = tiny_vlm(tokenizer)
    torch.manual_seed(1)
    model.det_head = DetHead(HEAD)
    return model


def batch(tokenizer, answers, pack=False):
    """Two records, one image each (different colours), collated one per row or packed into one row."""
    records = [dict(id=str(i), image=Image.new("RGB", (64, 64), colour), prompt="<image>\nLocate the words.",
                    answer=answer) for i, (answer, colour) in enumerate(zip(answers, ["white", "red"]))]
    samples = [render_record(r, tokenizer, "resize:128", 400) for r in records]
    inputs, targets, images, doc_ids, _ = collate(samples, 0, "cpu", 400 if pack else 0)
    return inputs, targets, images, doc_ids if pack else None


def test_one_pass_gives_the_same_lm_loss_and_the_head_losses(tokenizer, one_thread):
    model = model_with_head(tokenizer)
    inputs, targets, images, _ = batch(tokenizer, [BOXED, "plain text"])
    det_targets = det_targets_of(inputs, targets, tokenizer, model.image_token_id)
    assert [t.shape for t in det_targets] == [(2, 4), (0, 4)]  # the second answer has no boxes
    assert torch.allclose(det_targets[0][0], torch.tensor([300, 250, 400, 100]) / 999)  # cx, cy, w, h
    lm, det = model(inputs, images=images, targets=targets, det_targets=det_targets)
    assert torch.equal(lm, model(inputs, images=images, targets=targets))  # bit for bit
    assert set(det) == {"det_l1", "det_giou", "det_obj", "det_total"} and all(map(torch.isfinite, det.values()))
    det["det_total"].backward()  # the head's loss alone trains the head, the GPT under it and the encoder
    assert model.det_head.text_adapter.weight.grad.abs().sum() > 0
    assert model.gpt.transformer.h[-1].mlp.c_proj.weight.grad.abs().sum() > 0
    assert model.encoder.projector.layers.weight.grad.abs().sum() > 0


def test_packed_rows_give_each_image_its_own_sample(tokenizer, one_thread):
    model = model_with_head(tokenizer).eval()
    answers = [BOXED, "plain text"]
    inputs, targets, images, _ = batch(tokenizer, answers)
    packed = batch(tokenizer, answers, pack=True)
    assert packed[0].size(0) == 1  # both samples in one row
    det_targets = det_targets_of(inputs, targets, tokenizer, model.image_token_id)
    assert all(torch.equal(a, b) for a, b in zip(det_targets, det_targets_of(*packed[:2], tokenizer,
                                                                               model.image_token_id)))
    _, det = model(inputs, images=images, targets=targets, det_targets=det_targets)
    _, det_packed = model(packed[0], images=packed[2], targets=packed[1], doc_ids=packed[3], det_targets=det_targets)
    for k in det:
        assert torch.allclose(det[k], det_packed[k], atol=1e-5), k
    # each image's context: its own sample up to <|assistant_start|>, where the answer (boxes and all) begins
    lengths = [(inputs[r] == model.image_token_id).sum().item() for r in range(2)]
    contexts = image_contexts(packed[0], lengths, model.image_token_id, packed[1], packed[3])
    first_len = (packed[3][0] == 1).sum().item()
    assistant = tokenizer.encode_special("<|assistant_start|>")
    assert [(row, start) for row, start, _ in contexts] == [(0, 0), (0, first_len)]
    assert all(packed[0][0, end - 1] == assistant for _, _, end in contexts)


def test_the_head_never_reads_the_answer(tokenizer, one_thread):
    """The hidden states after <|assistant_start|> have read the answer's boxes; the head must not see them (a
    prompt at inference has no answer): other answers, the same head outputs."""
    model = model_with_head(tokenizer).eval()
    outs = []
    for answers in ([BOXED, "plain text"], ["<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>", "other words here"]):
        inputs, targets, images, _ = batch(tokenizer, answers)
        features = model.encoder.encode_images(images)
        _, hidden = model.gpt(None, targets=targets, embeds=model.embed(inputs, features=features), return_hidden=True)
        outs.append(model.detect_from(inputs, features, hidden, targets))
    assert torch.allclose(outs[0]["boxes"], outs[1]["boxes"]) and torch.allclose(outs[0]["logits"], outs[1]["logits"])


def test_a_record_without_boxes_gives_only_negatives(tokenizer, one_thread):
    model = model_with_head(tokenizer)
    inputs, targets, images, _ = batch(tokenizer, ["plain text", "more text"])
    det_targets = det_targets_of(inputs, targets, tokenizer, model.image_token_id)
    assert all(t.shape == (0, 4) for t in det_targets)
    _, det = model(inputs, images=images, targets=targets, det_targets=det_targets)
    assert det["det_l1"].item() == 0 and det["det_giou"].item() == 0
    features = model.encoder.encode_images(images)
    _, hidden = model.gpt(None, targets=targets, embeds=model.embed(inputs, features=features), return_hidden=True)
    logits = model.detect_from(inputs, features, hidden, targets)["logits"]
    # every query an empty one, summed and divided by at least one box
    negatives = sigmoid_focal_loss(logits, torch.zeros_like(logits), HEAD.focal_alpha, HEAD.focal_gamma).sum()
    assert torch.allclose(det["det_obj"], negatives) and det["det_obj"] > 0
    assert torch.allclose(det["det_total"], HEAD.obj_weight * negatives)


def test_the_head_has_its_own_group_and_flop_stages(tokenizer):
    model = model_with_head(tokenizer)
    names = [g for g, _ in COMPONENTS]
    lrs = dict({n: 1e-3 for n in names}, det_head=7e-4)
    groups = group_parameters(model, lrs, dict({n: 0.0 for n in names}, det_head=1e-4))
    head = next(g for g in groups if g["name"] == "det_head")
    assert head["lr"] == head["initial_lr"] == 7e-4 and head["weight_decay"] == 1e-4
    assert {id(p) for p in head["params"]} == {id(p) for p in model.det_head.parameters()}
    # FLOPs: the memory's projections at its tokens, the decoder at the queries, the cross-attention's in_proj
    # (q at the queries, k and v at the memory) in between; the object queries are an added table, no matmul
    stages = weight_elements_by_stage(model)
    assert list(stages)[-4:] == ["det_vision", "det_text", "det_cross", "det_queries"]
    proj = 32 * 16 + 16  # vision_dim (= text_dim) x dim + bias
    cross = 3 * 16 * 16 + 3 * 16
    rest = sum(p.numel() for p in model.det_head.parameters()) - 3 * 16 - 2 * proj - cross
    assert stages["det_vision"] == (proj, 0) and stages["det_text"] == (proj, 0)
    assert stages["det_cross"] == (cross, 0) and stages["det_queries"] == (rest, 0)
    images, image_tokens, text_tokens = 2, 10, 7
    queries, memory = images * 3, image_tokens + text_tokens
    extra = 6 * (proj * image_tokens + proj * text_tokens + cross * (queries + 2 * memory) / 3 + rest * queries)
    base = model.training_flops(2, 20, [(128, 128)] * 2, 9)
    assert math.isclose(model.training_flops(2, 20, [(128, 128)] * 2, 9, det=(images, image_tokens, text_tokens)),
                        base + extra)
    # train_step counts the scored tokens as a tensor: the sum stays a number beside the queries' thirds
    assert math.isclose(model.training_flops(2, 20, [(128, 128)] * 2, torch.tensor(9),
                                             det=(images, image_tokens, text_tokens)), base + extra)


def test_a_det_head_run_logs_saves_reloads_and_scores_boxes(workspace, monkeypatch, capsys):  # noqa: F811
    from nanovlm.checkpoint import load_checkpoint, load_vlm
    base, _ = workspace
    head = ["--det_head=True", "--det_queries=6", "--det_layers=1", "--det_heads=2", "--det_dim=32",
            "--det_head_lr=2e-3"]
    # grounding answers (boxes) and line answers (none), taken in turn; record 0, the scored sample, has boxes
    run_in_process(monkeypatch, base, "--data=synth:grounding,line:8", "--model_tag=det", *head, *FAST)
    out = capsys.readouterr().out
    steps = re.findall(r"step \d+/00008 .*?\| loss [\d.]+ \| det l1 ([\d.]+) giou ([\d.]+) obj ([\d.]+) \| lrm", out)
    assert len(steps) == 8, out
    assert "groups: sam, compressor, clip, projector, gpt_matrices, embeddings, lm_head, det_head" in out
    assert re.search(r"Step 00008 \| val loss [\d.]+ .*\| det rate [\d.]+ iou [\d.]+", out), out
    model, _, meta = load_vlm(str(base / "det"))
    assert model.det_head is not None and meta["det_head_config"]["n_queries"] == 6
    saved, optimizer, _ = load_checkpoint(str(base / "det"), load_optimizer=True)
    assert all(torch.equal(v, saved[f"det_head.{k}"]) for k, v in model.det_head.state_dict().items())
    group = next(g for g in optimizer["optimizer"]["param_groups"] if g["name"] == "det_head")
    assert group["initial_lr"] == 2e-3
    assert "det_rate" in json.loads((base / "det" / "report_history.json").read_text())["evals"][-1]
    # an adapter run keeps its adapters alone: no place for a full head
    with pytest.raises(SystemExit, match="adapter run"):
        run_in_process(monkeypatch, base, "--data=synth:grounding:4", "--model_tag=det_lora", "--lora_r=2", *head,
                       *FAST)
    assert not os.path.exists(base / "det_lora" / "meta_000008.json")


def test_the_loss_of_a_run_without_the_head_is_unchanged(tokenizer, one_thread):
    """--det_head=False builds no head and VLM.forward takes its old path: the same loss, bit for bit, as the GPT
    on the spliced embeddings."""
    model = tiny_vlm(tokenizer)
    assert model.det_head is None and "det_head_config" not in model_meta(model)  # old checkpoints' meta
    inputs, targets, images, _ = batch(tokenizer, [BOXED, "plain text"])
    features = model.encoder.encode_images(images)
    expected = model.gpt(None, targets=targets, embeds=model.embed(inputs, features=features))
    assert torch.equal(model(inputs, images=images, targets=targets), expected)
