import json
import os

import pytest
import torch

import nanovlm.checkpoint as ckpt
from nanovlm.checkpoint import find_last_step, load_checkpoint, save_checkpoint
from nanovlm.importers import load_nanochat
from nanovlm.gpt import GPT, GPTConfig


def random_gpt(n_head, n_kv_head=None, n_embd=160, vocab=50, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=2, n_head=n_head,
                       n_kv_head=n_kv_head or n_head, n_embd=n_embd)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def write_nanochat(directory, model, step=21400, prefix="", wte_bf16=False):
    """A checkpoint in nanochat's exact layout: torch.save'd state dict + meta json with model_config."""
    os.makedirs(directory, exist_ok=True)
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    if wte_bf16:
        state[prefix + "transformer.wte.weight"] = state[prefix + "transformer.wte.weight"].bfloat16()
    torch.save(state, os.path.join(directory, f"model_{step:06d}.pt"))
    meta = {"step": step, "val_bpb": 0.81, "model_config": vars(model.config), "user_config": {"depth": 2},
            "device_batch_size": 32, "max_seq_len": 32, "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 0}}
    with open(os.path.join(directory, f"meta_{step:06d}.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return state


@pytest.mark.parametrize("n_head", [10, 16])
@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_nanochat_checkpoint_loads_with_heads_from_meta(tmp_path, n_head, prefix):
    model = random_gpt(n_head)
    write_nanochat(tmp_path, model, prefix=prefix)
    loaded, meta = load_nanochat(tmp_path)
    assert loaded.config.n_head == n_head and meta["step"] == 21400
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
        # the trap this guards against: the other head count loads the same tensors and computes garbage
        other = random_gpt(16 if n_head == 10 else 10)
        other.load_state_dict(model.state_dict())
        assert not torch.allclose(other(idx), model(idx), atol=1e-3)


def test_nanochat_bf16_embedding_is_upcast_on_cpu(tmp_path):
    model = random_gpt(10)
    write_nanochat(tmp_path, model, wte_bf16=True)
    loaded, _ = load_nanochat(tmp_path, step=21400)
    assert loaded.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight.bfloat16().float())


def test_nanochat_gqa_and_latest_step(tmp_path):
    write_nanochat(tmp_path, random_gpt(10, seed=1), step=100)
    model = random_gpt(10, n_kv_head=5, seed=2)
    write_nanochat(tmp_path, model, step=200)
    loaded, meta = load_nanochat(tmp_path)
    assert meta["step"] == 200 and loaded.config.n_kv_head == 5


def test_nanochat_missing_key(tmp_path):
    state = write_nanochat(tmp_path, random_gpt(10))
    del state["transformer.h.1.mlp.c_fc.weight"]
    torch.save(state, tmp_path / "model_021400.pt")
    with pytest.raises(ValueError, match=r"missing keys: transformer\.h\.1\.mlp\.c_fc\.weight"):
        load_nanochat(tmp_path)


def test_nanochat_wrong_shape_and_unexpected_key(tmp_path):
    state = write_nanochat(tmp_path, random_gpt(10))
    state["lm_head.weight"] = torch.zeros(51, 160)
    state["transformer.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "model_021400.pt")
    with pytest.raises(ValueError) as err:
        load_nanochat(tmp_path)
    assert "lm_head.weight: expected (50, 160), found (51, 160)" in str(err.value)
    assert "unexpected keys: transformer.extra.weight" in str(err.value)


def test_nanochat_truncated_file(tmp_path):
    write_nanochat(tmp_path, random_gpt(10))
    path = tmp_path / "model_021400.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model_021400.pt: corrupt or truncated"):
        load_nanochat(tmp_path)


def test_our_format_round_trip_and_latest(tmp_path):
    model = random_gpt(10)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 50, (1, 8)), torch.randint(0, 50, (1, 8))).backward()
    optim.step()
    for step in (10, 20):
        save_checkpoint(tmp_path, step, model.state_dict(), {"model_config": vars(model.config)},
                        optimizer_state=optim.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["meta_000010.json", "meta_000020.json", "model_000010.safetensors",
                                           "model_000020.safetensors", "optim_000010_rank0.pt",
                                           "optim_000020_rank0.pt"]
    state, optim_state, meta = load_checkpoint(tmp_path, load_optimizer=True)
    assert meta["step"] == 20
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    optim2 = torch.optim.AdamW(model.parameters())
    optim2.load_state_dict(optim_state)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path):  # the user's umask, like any file they write (not the temp file's 0600)
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_save_killed_halfway_leaves_last_checkpoint(tmp_path, monkeypatch):
    model = random_gpt(10)
    save_checkpoint(tmp_path, 1, model.state_dict(), {"note": "first"})

    def dies_midway(tensors, path):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(ckpt, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model.state_dict(), {"note": "second"})
    assert sorted(os.listdir(tmp_path)) == ["meta_000001.json", "model_000001.safetensors"]  # no temp files left
    assert find_last_step(tmp_path) == 1
    state, _, meta = load_checkpoint(tmp_path)
    assert meta["note"] == "first" and torch.equal(state["lm_head.weight"], model.lm_head.weight)


def test_weights_without_meta_do_not_count(tmp_path):
    model = random_gpt(10)
    save_checkpoint(tmp_path, 1, model.state_dict(), {})
    save_checkpoint(tmp_path, 2, model.state_dict(), {})
    os.remove(tmp_path / "meta_000002.json")  # as if killed between the weights and the meta
    assert find_last_step(tmp_path) == 1


def test_corrupt_files_are_named(tmp_path):
    model = random_gpt(10)
    save_checkpoint(tmp_path, 5, model.state_dict(), {})
    path = tmp_path / "model_000005.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="model_000005.safetensors: corrupt or truncated"):
        load_checkpoint(tmp_path)
    (tmp_path / "meta_000005.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta_000005.json: corrupt"):
        load_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_last_step(tmp_path / "empty")


def test_encoder_tuples_survive_the_json_meta():
    """Tuple fields (global blocks, the conv stem, the norm grid) come back as tuples, so the rebuilt config
    equals the saved one."""
    import json
    from nanovlm.checkpoint import configs_from_meta
    from nanovlm.vlm import build_vlm, model_meta, preset_configs
    gpt_config, encoder_config, _ = preset_configs("lines", 300)
    meta = json.loads(json.dumps(model_meta(build_vlm(gpt_config, encoder_config, 5, device="meta", init=False))))
    assert configs_from_meta(meta, "test")[1] == encoder_config


def test_reading_prompt_is_the_flag_else_the_checkpoint_s_else_the_default():
    meta = {"prompts": {"<image>\nFree OCR.": 900, "<image>\nParse the figure.": 100}}
    assert ckpt.training_prompt({"prompts": {"<image>\na": 1, "<image>\nb": 5}}) == "<image>\nb"  # the most common
    assert ckpt.reading_prompt(meta) == ("<image>\nFree OCR.", "the checkpoint's training prompt")
    assert ckpt.reading_prompt(meta, "Read it.") == ("<image>\nRead it.", None)  # the user's wins, image first
    assert ckpt.reading_prompt(meta, "<image>\\nRead it.") == ("<image>\nRead it.", None)  # as a shell passes it
    prompt, note = ckpt.reading_prompt({"step": 3})  # an older meta records no prompts
    assert prompt == ckpt.DEFAULT_PROMPT == "<image>\nOCR this image." and "records no training prompt" in note
