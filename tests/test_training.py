import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import tiny_vlm, write_dataset
from nanovlm.training import RunError, group_parameters, lr_multiplier
from nanovlm.vlm import COMPONENTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWERS = ["alpha 12.50", "beta chart 3 4 5", "gamma sign OPEN", "delta line of text"]
FAST = ["--num_iterations=8", "--device_batch_size=2", "--total_batch_size=4", "--eval_every=-1",
        "--eval_samples=1", "--max_new_tokens=4", "--warmup_ratio=0.0", "--image_mode=resize:128"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    base = tmp_path_factory.mktemp("base")
    tokenizer.save(str(base / "tokenizer"))
    data = write_dataset(str(base / "data"), ANSWERS)
    return base, data


def run_script(base, *args, torchrun=False):
    env = dict(os.environ, NANOVLM_BASE_DIR=str(base), OMP_NUM_THREADS="1")
    launcher = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2",
                "-m"] if torchrun else [sys.executable, "-m"]
    out = subprocess.run(launcher + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def losses(stdout):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ .*?\| loss ([\d.]+)", stdout)}


def test_stage1_lowers_the_loss_and_resume_reproduces_it(workspace):
    base, data = workspace
    args = ["scripts.vis_tok_train", f"--data={data}", "--model_tag=t1", "--save_every=4"] + FAST
    full = losses(run_script(base, *args))
    assert sorted(full) == list(range(8)) and full[7] < full[0]
    # kill after step 4's save: drop everything later, then resume
    for name in os.listdir(base / "t1"):
        if "000008" in name:
            os.remove(base / "t1" / name)
    resumed = losses(run_script(base, *args, "--resume=True"))
    assert sorted(resumed) == [4, 5, 6, 7]
    assert all(resumed[s] == full[s] for s in resumed), (resumed, full)
    meta = json.loads((base / "t1" / "meta_000008.json").read_text())
    assert meta["prompts"] == {"<image>\nOCR this image.": len(ANSWERS)}  # what ocr / vision_sample then ask


def test_stage2_freezes_sam_and_mixes_text(workspace, tmp_path):
    base, data = workspace
    run_script(base, "scripts.vis_tok_train", f"--data={data}", "--model_tag=s1", *FAST)
    texts = tmp_path / "texts.jsonl"
    texts.write_text('[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]\n')
    out = run_script(base, "scripts.vis_mid_train", f"--data={data}", "--start_from=s1", "--model_tag=s2",
                     f"--text_data={texts}", "--text_ratio=0.3", "--pack=False", *FAST)  # stage 1 packed
    assert "groups: clip, projector, gpt_matrices, embeddings, lm_head" in out
    steps = losses(out)
    assert steps[7] < steps[0]


def test_torchrun_two_ranks_on_cpu_and_resume(workspace):
    base, data = workspace
    args = ["scripts.vis_tok_train", f"--data={data}", "--model_tag=ddp", "--save_every=4", *FAST]
    full = losses(run_script(base, *args, torchrun=True))
    assert len(full) == 8
    rng = [torch.load(base / "ddp" / f"optim_000004_rank{r}.pt", weights_only=True)["rng"] for r in (0, 1)]
    assert not torch.equal(rng[0], rng[1])  # the ranks draw different dropout masks
    assert os.path.exists(base / "ddp" / "optim_000008_rank1.pt")
    for name in os.listdir(base / "ddp"):
        if "000008" in name:
            os.remove(base / "ddp" / name)
    resumed = losses(run_script(base, *args, "--resume=True", torchrun=True))
    assert resumed == {s: full[s] for s in (4, 5, 6, 7)}  # each rank continued from its own data position


def test_torchrun_with_the_default_batch_flags_splits_the_batch(workspace):
    base, data = workspace
    out = run_script(base, "scripts.vis_tok_train", f"--data={data}", "--model_tag=ddp_defaults",
                     "--num_iterations=2", "--eval_every=-1", torchrun=True)
    assert "10 examples per step = 5 x 2 ranks x 1 accumulation" in out


def test_every_trainable_parameter_has_exactly_one_group(tokenizer):
    model = tiny_vlm(tokenizer)
    names = [g for g, _ in COMPONENTS]
    groups = group_parameters(model, {n: 1e-3 for n in names}, {n: 0.0 for n in names})
    assert [g["name"] for g in groups] == ["sam", "compressor", "clip", "projector", "gpt_matrices", "embeddings",
                                           "lm_head"]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable
    assert not model.encoder.clip.embeddings.patch_embedding.weight.requires_grad  # never handed to AdamW
    model.encoder.stray = torch.nn.Parameter(torch.zeros(3))  # a new module nobody gave a group
    with pytest.raises(RunError, match="encoder.stray \\(no component\\)"):
        group_parameters(model, {n: 1e-3 for n in names}, {n: 0.0 for n in names})


def test_lr_schedule():
    values = [lr_multiplier(s, 100, 0.1, 0.2, 0.0) for s in range(101)]
    assert values[0] == 0.1 and values[9] == 1.0 and values[50] == 1.0 and values[80] == 1.0
    assert values[100] == 0.0 and 0 < values[90] < 1


def test_stage1_from_a_nanochat_checkpoint(workspace, tokenizer, tmp_path):
    """--init_from: a GPT in nanochat's layout + its pickled tokenizer become the VLM's language model."""
    import pickle

    from nanovlm.gpt import GPT, GPTConfig
    from nanovlm.tokenizer import NANOCHAT_SPECIAL_TOKENS, SPLIT_PATTERN, build_encoding
    base, data = workspace
    enc = build_encoding(SPLIT_PATTERN, tokenizer.enc._mergeable_ranks, NANOCHAT_SPECIAL_TOKENS)
    (tmp_path / "tok").mkdir()
    with open(tmp_path / "tok" / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    config = GPTConfig(sequence_len=256, vocab_size=enc.n_vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    gpt = GPT(config)
    gpt.init_weights()
    (tmp_path / "ckpt").mkdir()
    torch.save(gpt.state_dict(), tmp_path / "ckpt" / "model_000010.pt")
    (tmp_path / "ckpt" / "meta_000010.json").write_text(json.dumps({"step": 10, "model_config": vars(config)}))
    out = run_script(base, "scripts.vis_tok_train", f"--data={data}", "--model_tag=fromnano",
                     f"--init_from={tmp_path / 'ckpt'}", f"--nanochat_tokenizer={tmp_path / 'tok'}", *FAST)
    assert len(losses(out)) == 8
    meta = json.loads((base / "fromnano" / "meta_000008.json").read_text())
    assert meta["model_config"]["vocab_size"] == enc.n_vocab + 6 and meta["encoder_config"]["out_dim"] == 64


QLORA = {"quant": "nf4", "double_quant": True, "quant_targets": r"transformer\.h\.\d+\.(attn|mlp)\.c_\w+",
         "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "lora_targets": r"transformer\.h\.\d+\.(attn|mlp)\.c_\w+"}


def test_qlora_steps_lower_the_loss_and_leave_the_base_untouched(tokenizer):
    from PIL import Image

    from nanovlm.lora import prepare_adapters
    from nanovlm.image_process import count_image_tokens, preprocess
    from nanovlm.nf4 import Linear4bit
    model = tiny_vlm(tokenizer)
    with torch.no_grad():
        for name, p in model.gpt.named_parameters():
            if "c_proj" in name or "lm_head" in name:
                p.normal_(0, 0.05)
    prepare_adapters(model, QLORA, training=True)
    model.gpt.gradient_checkpointing = model.encoder.gradient_checkpointing = True
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * 6  # 2 layers x (c_q, c_k, c_v, c_proj, c_fc, mlp c_proj)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    names = [g for g, _ in COMPONENTS]
    groups = group_parameters(model, {n: 1e-2 for n in names}, {n: 0.0 for n in names})
    assert [g["name"] for g in groups] == ["lora"]
    optimizer = torch.optim.AdamW(groups)
    image = preprocess(Image.new("RGB", (64, 64), (200, 40, 40)), "resize:128")
    ids, mask = tokenizer.render_conversation([{"role": "user", "content": "<image>read"},
                                               {"role": "assistant", "content": "a red square"}],
                                              image_tokens=[count_image_tokens(64, 64, "resize:128")])
    inputs = torch.tensor([ids[:-1]])
    targets = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
    model.train()
    losses_seen = []
    for _ in range(6):
        loss = model(inputs, images=[image], targets=targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses_seen.append(loss.item())
    assert losses_seen[-1] < losses_seen[0]
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), k  # 4-bit codes, scales, encoder, embeddings: bit-identical


def test_qlora_run_saves_adapters_only_and_the_eval_loads_base_plus_adapter(workspace):
    base, data = workspace
    run_script(base, "scripts.vis_tok_train", f"--data={data}", "--model_tag=qbase", *FAST)
    out = run_script(base, "scripts.vis_tok_train", f"--data={data}", "--model_tag=qlora", "--start_from=qbase",
                     "--quant=nf4", "--double_quant=True", "--lora_r=4", "--lora_alpha=8", "--lora_lr=1e-2",
                     *FAST)
    assert "groups: lora" in out
    files = sorted(os.listdir(base / "qlora"))
    assert "adapter_000008.safetensors" in files and not any(f.startswith("model_") for f in files)
    out = run_script(base, "scripts.vision_sample", f"--data={data}", "--model_tag=qlora", "--max_new_tokens=4")
    assert "exact" in out
    with open(base / "qlora" / "meta_000008.json") as f:
        assert json.load(f)["adapter"]["base_dir"] == "qbase"  # relative: the checkpoints dir may move
    moved = base.parent / "moved"
    shutil.copytree(base, moved)
    shutil.rmtree(base / "qbase")
    out = run_script(moved, "scripts.vision_sample", f"--data={data}", "--model_tag=qlora", "--max_new_tokens=4")
    assert "exact" in out
    # no saved base to point at: the run keeps its starting weights once, under base/
    run_script(base, "scripts.vis_tok_train", f"--data={data}", "--model_tag=lora_fresh", "--lora_r=2", *FAST)
    assert os.path.exists(base / "lora_fresh" / "base" / "model_000000.safetensors")


def test_stage2_freeze_keeps_adapters_placed_on_sam(tokenizer):
    from nanovlm.lora import prepare_adapters
    from nanovlm.vlm import freeze
    model = tiny_vlm(tokenizer)
    config = dict(QLORA, quant="", lora_targets=r"transformer\.h\.\d+\.attn\.c_q|qkv")
    prepare_adapters(model, config, training=True)
    freeze(model, freeze_sam=True, freeze_compressor=True)
    sam_lora = [p for n, p in model.encoder.sam.named_parameters() if ".lora_" in n]
    assert sam_lora and all(p.requires_grad for p in sam_lora)


def test_non_finite_losses_skip_the_step_then_stop_the_run(workspace, monkeypatch, capsys):
    from nanovlm.vlm import VLM
    base, data = workspace
    forward = VLM.forward
    monkeypatch.setattr(VLM, "forward", lambda self, *a, **kw: forward(self, *a, **kw) * float("nan")
                        if self.training else forward(self, *a, **kw))
    with pytest.raises(SystemExit, match="3 non-finite losses in a row: stopping"):
        run_in_process(monkeypatch, base, f"--data={data}", "--model_tag=nan", "--max_bad_steps=3", *FAST)
    out = capsys.readouterr().out
    assert out.count("is not finite: step skipped") == 3
    assert not os.path.exists(base / "nan" / "meta_000008.json")


class NanGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward: a finite loss whose step would poison the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def run_in_process(monkeypatch, base, *argv):
    import runpy
    monkeypatch.setenv("NANOVLM_BASE_DIR", str(base))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["vis_tok_train", *argv])
    runpy.run_module("scripts.vis_tok_train", run_name="__main__")


def test_non_finite_gradients_skip_the_step(workspace, monkeypatch, capsys):
    from nanovlm.vlm import VLM
    base, data = workspace
    forward = VLM.forward
    monkeypatch.setattr(VLM, "forward", lambda self, *a, **kw: NanGradient.apply(forward(self, *a, **kw))
                        if self.training else forward(self, *a, **kw))
    with pytest.raises(SystemExit, match="2 non-finite steps in a row: stopping"):
        run_in_process(monkeypatch, base, f"--data={data}", "--model_tag=nangrad", "--max_bad_steps=2", *FAST)
    assert capsys.readouterr().out.count("is not finite: step skipped") == 2


def test_text_ratio_without_text_data_stops_before_any_step(workspace, monkeypatch, capsys):
    base, data = workspace
    with pytest.raises(SystemExit, match="no --text_data was given"):
        run_in_process(monkeypatch, base, f"--data={data}", "--model_tag=notext", "--text_ratio=0.2", *FAST)
    assert "step 0" not in capsys.readouterr().out


def test_resume_refuses_another_image_mode(workspace, monkeypatch):
    base, data = workspace
    run_in_process(monkeypatch, base, f"--data={data}", "--model_tag=modes", *FAST)  # image mode resize:128
    with pytest.raises(SystemExit, match="trained in resize:128"):
        run_in_process(monkeypatch, base, f"--data={data}", "--model_tag=modes", *FAST, "--resume=True",
                       "--num_iterations=10", "--image_mode=resize:256")


def test_views_of_a_collated_batch_names_every_view(tokenizer, tmp_path):
    from nanovlm.dataloader import collate, load_records, render_record
    from nanovlm.training import views_of
    from PIL import Image
    big = tmp_path / "big.png"
    Image.new("RGB", (1400, 700), "white").save(big)
    records = [dict(id="a", image=str(big), prompt="<image>\nOCR", answer="x"),
               dict(id="b", image=str(big), prompt="<image>\nOCR", answer="y")]
    batch = collate([render_record(r, tokenizer, "gundam:128:256", 400) for r in records], 0, "cpu")
    assert type(batch[2][0]).__name__ == "PreprocessedImage"  # named through collate
    tiles = batch[2][0].tiles.size(0)
    assert tiles > 1 and views_of(batch[2]) == ([(256, 256)] + [(128, 128)] * tiles) * 2


def test_token_ctc_split_adds_the_token_read_out_to_a_lines_model(tokenizer, monkeypatch):
    """--token_ctc_split=N builds the read-out of the projected tokens (N CTC steps each) beside SAM's; a preset
    without a CTC read-out refuses it."""
    import nanovlm.training as training
    monkeypatch.setattr(training, "get_tokenizer", lambda directory=None: tokenizer)
    cfg = dict(start_from="", init_from="", tokenizer_dir="", model="lines", image_mode="", vision_from="",
               sam_from="", clip_from="", token_ctc_split=4)
    model = training.build_model(cfg, "cpu").model
    assert model.encoder.config.token_ctc_split == 4 and model.encoder.token_ctc_head.out_features == 4 * 257
    with pytest.raises(RunError, match="CTC read-out"):
        training.build_model(dict(cfg, model="tiny"), "cpu")
