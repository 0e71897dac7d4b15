"""
Vision weight importers on synthetic checkpoints: the real files' key names (deepencoder_keys.txt and the
Hugging Face naming) at the tiny config's shapes, written in bf16. Full-size names and shapes are checked on the
meta device only.
"""

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from nanovlm.importers import deepseek_ocr_plan, file_shapes, hf_clip_plan, hf_sam_plan, load_deepseek_ocr_vision, \
    load_hf_clip, load_hf_sam
from nanovlm.deepencoder import DeepEncoder, DeepEncoderConfig

KEYS_FILE = os.path.join(os.path.dirname(__file__), "deepencoder_keys.txt")
LM_KEYS = {"model.embed_tokens.weight": (50, 64), "model.layers.0.self_attn.q_proj.weight": (64, 64),
           "model.layers.0.mlp.experts.3.down_proj.weight": (64, 32), "model.norm.weight": (64,),
           "lm_head.weight": (50, 64)}


def real_keys():
    """The DeepSeek-OCR checkpoint's 476 vision keys -> shape."""
    keys = {}
    for line in open(KEYS_FILE):
        name, shape = line.split(" ", 1)
        keys[name] = tuple(int(s) for s in shape.strip()[1:-1].split(","))
    return keys


def tiny_encoder(seed, **overrides):
    torch.manual_seed(seed)
    encoder = DeepEncoder(DeepEncoderConfig.tiny(**overrides))
    with torch.no_grad():
        for p in encoder.parameters():  # bf16-exact values, so a bf16 file round-trips exactly
            p.copy_((p + torch.randn_like(p) * 0.1).bfloat16().float())
    return encoder


def our_name(checkpoint_key):
    """The fact sheet's rule: strip model.sam_model. / model.vision_model. / model.projector. / model."""
    for prefix, ours in [("model.sam_model.", "sam."), ("model.vision_model.", "clip."),
                         ("model.projector.", "projector."), ("model.", "")]:
        if checkpoint_key.startswith(prefix):
            return ours + checkpoint_key[len(prefix):]


def tiny_deepseek_state(encoder):
    """deepencoder_keys.txt's names that exist at the tiny depth (SAM blocks < 4, CLIP layers < 2), holding the
    tiny encoder's tensors, plus some language-model keys."""
    cfg = encoder.config
    ours = encoder.state_dict()
    state = {}
    for key in real_keys():
        block = re.search(r"sam_model\.blocks\.(\d+)\.", key)
        layer = re.search(r"transformer\.layers\.(\d+)\.", key)
        if (block and int(block.group(1)) >= cfg.sam_depth) or (layer and int(layer.group(1)) >= cfg.clip_depth):
            continue
        state[key] = ours[our_name(key)].bfloat16()
    assert {our_name(k) for k in state} == set(ours)  # every tiny parameter has a real checkpoint name
    for key, shape in LM_KEYS.items():
        state[key] = torch.randn(shape).bfloat16()
    return state


def assert_same_weights(encoder, reference, prefix=""):
    ours, theirs = encoder.state_dict(), reference.state_dict()
    names = [n for n in theirs if n.startswith(prefix)]
    assert names
    for name in names:
        assert ours[name].dtype == torch.float32, name
        assert torch.equal(ours[name], theirs[name]), name


# -----------------------------------------------------------------------------
# full size, names and shapes only

def test_full_size_file_layouts():
    with torch.device("meta"):
        encoder = DeepEncoder(DeepEncoderConfig())
    assert file_shapes(encoder, deepseek_ocr_plan(encoder)) == real_keys()
    sam = file_shapes(encoder, hf_sam_plan(encoder))
    assert len(sam) == 177  # the 179 SAM keys less net_2 and net_3
    assert sam["vision_encoder.patch_embed.projection.weight"] == (768, 3, 16, 16)
    assert sam["vision_encoder.layers.11.layer_norm2.bias"] == (768,)
    assert sam["vision_encoder.layers.2.attn.rel_pos_h"] == (127, 64)
    assert sam["vision_encoder.layers.3.attn.qkv.weight"] == (2304, 768)
    assert sam["vision_encoder.neck.conv1.weight"] == (256, 768, 1, 1)
    assert sam["vision_encoder.neck.layer_norm2.weight"] == (256,)
    clip = file_shapes(encoder, hf_clip_plan(encoder))
    assert len(clip) == 293 + 24 * 4  # qkv (2 keys) becomes q, k, v (6 keys) in every layer
    assert clip["vision_model.encoder.layers.23.self_attn.v_proj.weight"] == (1024, 1024)
    assert clip["vision_model.encoder.layers.0.self_attn.q_proj.bias"] == (1024,)
    assert clip["vision_model.embeddings.position_embedding.weight"] == (257, 1024)
    assert clip["vision_model.pre_layrnorm.weight"] == (1024,)
    assert not any("post_layernorm" in k for k in clip)


# -----------------------------------------------------------------------------
# DeepSeek-OCR

def test_deepseek_ocr_sharded_directory(tmp_path, capsys):
    source = tiny_encoder(0)
    state = tiny_deepseek_state(source)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / file))
    weight_map = {k: file for file, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    encoder = load_deepseek_ocr_vision(str(tmp_path), DeepEncoderConfig.tiny())
    assert_same_weights(encoder, source)
    assert f"skipped {len(LM_KEYS)}" in capsys.readouterr().out
    assert encoder.clip.embeddings.patch_embedding.weight.requires_grad is False
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), source.eval()(x))


def test_deepseek_ocr_single_file_and_dtype(tmp_path):
    source = tiny_encoder(1)
    save_file(tiny_deepseek_state(source), str(tmp_path / "model.safetensors"))
    encoder = load_deepseek_ocr_vision(str(tmp_path / "model.safetensors"), DeepEncoderConfig.tiny(),
                                       dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    assert torch.equal(encoder.sam.net_3.weight.float(), source.sam.net_3.weight)


def test_deepseek_ocr_names_every_bad_key(tmp_path):
    state = tiny_deepseek_state(tiny_encoder(2))
    del state["model.sam_model.blocks.3.mlp.lin2.bias"]
    state["model.vision_model.post_layernorm.weight"] = torch.zeros(64)
    state["model.sam_model.blocks.1.attn.rel_pos_h"] = torch.zeros(127, 16)
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError) as info:
        load_deepseek_ocr_vision(path, DeepEncoderConfig.tiny())
    message = str(info.value)
    assert path in message
    assert "missing keys: model.sam_model.blocks.3.mlp.lin2.bias" in message
    assert "unexpected keys: model.vision_model.post_layernorm.weight" in message
    assert "model.sam_model.blocks.1.attn.rel_pos_h: expected (31, 16), found (127, 16)" in message
    assert "embed_tokens" not in message and "lm_head" not in message  # the language model is not an error


def test_deepseek_ocr_towers_only_for_another_width(tmp_path):
    source = tiny_encoder(3)
    save_file(tiny_deepseek_state(source), str(tmp_path / "m.safetensors"))
    narrow = DeepEncoderConfig.tiny(out_dim=48)  # e.g. a GPT with n_embd 48
    with pytest.raises(ValueError, match="projector.layers.weight: expected \\(48, 128\\), found \\(64, 128\\)"):
        load_deepseek_ocr_vision(str(tmp_path / "m.safetensors"), narrow)
    encoder = load_deepseek_ocr_vision(str(tmp_path / "m.safetensors"), narrow, towers_only=True)
    assert_same_weights(encoder, source, "sam.")
    assert_same_weights(encoder, source, "clip.")
    assert encoder.projector.layers.weight.shape == (48, 128)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_deepseek_ocr_vision(str(tmp_path / "nothing_here"), DeepEncoderConfig.tiny())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_deepseek_ocr_vision(str(junk), DeepEncoderConfig.tiny())


# -----------------------------------------------------------------------------
# Hugging Face SAM and CLIP (naming from the fact sheet's mapping table, restated here)

def hf_sam_state(encoder, prefix="vision_encoder."):
    renames = {"patch_embed.proj": "patch_embed.projection", "neck.0": "neck.conv1", "neck.1": "neck.layer_norm1",
               "neck.2": "neck.conv2", "neck.3": "neck.layer_norm2"}
    state = {}
    for name, tensor in encoder.sam.state_dict().items():
        if name.startswith(("net_2.", "net_3.")):
            continue  # no counterpart in SAM
        parts = name.split(".")
        if parts[0] == "blocks":
            parts[0] = "layers"
            if parts[2] in ("norm1", "norm2"):
                parts[2] = "layer_" + parts[2]
        hf = ".".join(parts)
        for old, new in renames.items():
            if hf.startswith(old + "."):
                hf = new + hf[len(old):]
        state[prefix + hf] = tensor.bfloat16()
    state["prompt_encoder.point_embed.0.weight"] = torch.zeros(1, 16)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 16)
    state["shared_image_embedding.positional_embedding"] = torch.zeros(2, 8)
    return state


def hf_clip_state(encoder, prefix="vision_model."):
    state = {}
    for name, tensor in encoder.clip.state_dict().items():
        name = name.replace("transformer.layers.", "encoder.layers.")
        if ".qkv_proj." in name:
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                state[prefix + name.replace("qkv_proj", f"{part}_proj")] = chunk.bfloat16()
        else:
            state[prefix + name] = tensor.bfloat16()
    state[prefix + "post_layernorm.weight"] = torch.ones(64)
    state[prefix + "post_layernorm.bias"] = torch.ones(64)
    state[prefix + "embeddings.position_ids"] = torch.arange(17)[None]
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)
    state["visual_projection.weight"] = torch.zeros(8, 64)
    state["logit_scale"] = torch.zeros(())
    return state


@pytest.mark.parametrize("prefix", ["vision_encoder.", ""])
def test_hf_sam(tmp_path, prefix):
    source, target = tiny_encoder(4), tiny_encoder(5)
    net_2 = target.sam.net_2.weight.clone()
    save_file(hf_sam_state(source, prefix), str(tmp_path / "sam.safetensors"))
    assert load_hf_sam(str(tmp_path / "sam.safetensors"), target) is target
    for name in source.sam.state_dict():
        if not name.startswith(("net_2.", "net_3.")):
            assert torch.equal(target.sam.state_dict()[name], source.sam.state_dict()[name]), name
    assert torch.equal(target.sam.net_2.weight, net_2)  # untouched: DeepSeek-only


def test_hf_sam_names_bad_keys(tmp_path):
    state = hf_sam_state(tiny_encoder(6))
    del state["vision_encoder.layers.0.attn.qkv.weight"]
    state["vision_encoder.neck.conv2.weight"] = torch.zeros(16, 16, 1, 1)
    state["vision_encoder.layers.9.mlp.lin1.bias"] = torch.zeros(128)
    save_file(state, str(tmp_path / "sam.safetensors"))
    with pytest.raises(ValueError) as info:
        load_hf_sam(str(tmp_path / "sam.safetensors"), tiny_encoder(7))
    message = str(info.value)
    assert "missing keys: vision_encoder.layers.0.attn.qkv.weight" in message
    assert "unexpected keys: vision_encoder.layers.9.mlp.lin1.bias" in message
    assert "vision_encoder.neck.conv2.weight: expected (16, 16, 3, 3), found (16, 16, 1, 1)" in message


@pytest.mark.parametrize("prefix", ["vision_model.", ""])
def test_hf_clip(tmp_path, prefix):
    source, target = tiny_encoder(8), tiny_encoder(9)
    save_file(hf_clip_state(source, prefix), str(tmp_path / "clip.safetensors"))
    load_hf_clip(str(tmp_path / "clip.safetensors"), target)
    assert_same_weights(target, source, "clip.")
    sam_map = torch.randn(1, 64, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(target.clip(sam_map), source.clip(sam_map))  # no post_layernorm applied


def test_hf_clip_names_bad_keys(tmp_path):
    state = hf_clip_state(tiny_encoder(10))
    del state["vision_model.encoder.layers.1.self_attn.v_proj.bias"]
    state["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(256, 32)
    state["vision_model.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(256, 64)
    save_file(state, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ValueError) as info:
        load_hf_clip(str(tmp_path / "clip.safetensors"), tiny_encoder(11))
    message = str(info.value)
    assert "missing keys: vision_model.encoder.layers.1.self_attn.v_proj.bias" in message
    assert "unexpected keys: vision_model.encoder.layers.2.mlp.fc1.weight" in message
    assert "vision_model.encoder.layers.0.mlp.fc1.weight: expected (256, 64), found (256, 32)" in message
