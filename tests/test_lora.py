"""LoRA against peft's reference tensors; init, dropout, target matching, merge, adapter files, a QLoRA run."""

import copy
import glob
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from conftest import FIXTURES
from nanovlm.lora import (LoRALinear, apply_lora, find_targets, load_adapter, lora_layers, lora_state_dict,
                          merge_lora, prepare_for_kbit_training, save_adapter, unmerge_lora)
from nanovlm.nf4 import Linear4bit, quantize_model

GPT_TARGETS = r"transformer\.h\.\d+\.(attn|mlp)\.(c_q|c_k|c_v|c_proj|c_fc)"


pytestmark = pytest.mark.usefixtures("one_thread")


def fixture_path(name):
    return os.path.join(FIXTURES, name)


# -----------------------------------------------------------------------------
# A small model with the module names of nanovlm's GPT and vision towers

def modules(**children):
    return nn.ModuleDict(children)


class ToyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = modules(c_q=nn.Linear(d, d, bias=False), c_k=nn.Linear(d, d, bias=False),
                            c_v=nn.Linear(d, d, bias=False), c_proj=nn.Linear(d, d, bias=False))
        self.mlp = modules(c_fc=nn.Linear(d, 4 * d, bias=False), c_proj=nn.Linear(4 * d, d, bias=False))

    def forward(self, x):
        a = self.attn
        x = x + a.c_proj(a.c_q(x) * torch.sigmoid(a.c_k(x)) + a.c_v(x))
        return x + self.mlp.c_proj(F.relu(self.mlp.c_fc(x)))


class ToyVLM(nn.Module):
    """transformer.h.N.{attn,mlp}.* like the GPT; sam.* and clip.* like the DeepEncoder (not run in forward)."""

    def __init__(self, vocab=64, d=32, n_layer=2):
        super().__init__()
        self.transformer = modules(wte=nn.Embedding(vocab, d), h=nn.ModuleList([ToyBlock(d) for _ in range(n_layer)]))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        sam_block = modules(attn=modules(qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d)),
                            mlp=modules(lin1=nn.Linear(d, 4 * d), lin2=nn.Linear(4 * d, d)))
        self.sam = modules(blocks=nn.ModuleList([sam_block]))
        clip_layer = modules(self_attn=modules(qkv_proj=nn.Linear(d, 3 * d), out_proj=nn.Linear(d, d)),
                             mlp=modules(fc1=nn.Linear(d, 4 * d), fc2=nn.Linear(4 * d, d)))
        self.clip = modules(transformer=modules(layers=nn.ModuleList([clip_layer])))
        self.projector = modules(layers=nn.Linear(2 * d, d))
        self.gradient_checkpointing = False

    def forward(self, idx, targets):
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


GPT_LINEARS = [f"transformer.h.{i}.{part}" for i in range(2)
               for part in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


# -----------------------------------------------------------------------------
# Against peft's reference tensors

def test_lora_matches_reference_output_merge_unmerge():
    ref = torch.load(fixture_path("lora_linear_s0_64x96_r8_a16.pt"), weights_only=True)
    meta = ref["meta"]
    layer = LoRALinear(nn.Linear(meta["in"], meta["out"]), r=meta["r"], alpha=meta["alpha"]).eval()
    with torch.no_grad():
        layer.base_layer.weight.copy_(ref["base_weight"])
        layer.base_layer.bias.copy_(ref["base_bias"])
        layer.lora_A.weight.copy_(ref["lora_A"])
        layer.lora_B.weight.copy_(ref["lora_B"])
    assert layer.scaling == ref["scaling"]
    x = ref["input"]
    with torch.no_grad():
        assert torch.allclose(layer.base_layer(x), ref["output_base_only"], atol=1e-6, rtol=0)
        assert torch.allclose(layer(x), ref["output"], atol=1e-6, rtol=0)
        layer.merge()
        assert torch.allclose(layer.base_layer.weight, ref["merged_weight"], atol=1e-6, rtol=0)
        assert torch.allclose(layer(x), ref["output_after_merge"], atol=1e-6, rtol=0)
        layer.unmerge()
        assert torch.allclose(layer.base_layer.weight, ref["unmerged_weight"], atol=1e-6, rtol=0)
        assert torch.allclose(layer(x), ref["output"], atol=1e-6, rtol=0)


def test_init_statistics_and_scaling():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(1024, 512), r=64, alpha=16)
    bound = 1 / math.sqrt(1024)  # Kaiming-uniform with a=sqrt(5) is U(-1/sqrt(in), 1/sqrt(in))
    a = layer.lora_A.weight
    assert a.shape == (64, 1024) and layer.lora_B.weight.shape == (512, 64)
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(3, 1024)
    assert torch.equal(layer(x), layer.base_layer(x))  # a fresh adapter is a no-op
    assert layer.scaling == 16 / 64
    assert LoRALinear(nn.Linear(8, 8), r=8, alpha=16, rslora=True).scaling == pytest.approx(16 / math.sqrt(8))
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def test_dropout_only_on_adapter_path():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16), r=4, alpha=8, dropout=0.5).train()
    x = torch.randn(10, 32)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: dropout on the base path would show here
    nn.init.normal_(layer.lora_B.weight)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    expected = layer.base_layer(x) + layer.lora_B(layer.lora_A(F.dropout(x, 0.5, training=True))) * layer.scaling
    assert torch.allclose(y, expected, atol=1e-6, rtol=0)
    layer.eval()
    assert torch.allclose(layer(x), layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling, atol=1e-6)


# -----------------------------------------------------------------------------
# Target matching: the language model vs the vision towers

def test_targets_language_model_only():
    model = ToyVLM()
    assert find_targets(model, GPT_TARGETS) == GPT_LINEARS
    assert find_targets(model, r"c_q|c_k|c_v|c_proj|c_fc") == GPT_LINEARS  # short names never reach the towers
    names = apply_lora(model, GPT_TARGETS, r=4, alpha=8)
    assert names == GPT_LINEARS
    assert not any(isinstance(m, LoRALinear) for n, m in model.named_modules() if n.startswith(("sam", "clip")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(GPT_LINEARS) and all(".lora_" in n for n in trainable)


def test_targets_vision_on_purpose_and_nested_prefixes():
    model = ToyVLM()
    assert find_targets(model, r"qkv|fc1|fc2") == ["sam.blocks.0.attn.qkv", "clip.transformer.layers.0.mlp.fc1",
                                                   "clip.transformer.layers.0.mlp.fc2"]
    assert find_targets(model, r"qkv.*") == ["sam.blocks.0.attn.qkv", "clip.transformer.layers.0.self_attn.qkv_proj"]
    assert find_targets(model, r"proj") == ["sam.blocks.0.attn.proj"]  # not c_proj, qkv_proj, out_proj
    assert find_targets(model, r"(sam|clip)\..*") == find_targets(model, r"(sam|clip)\..*", exclude=r"lm_head")
    assert find_targets(model, GPT_TARGETS, exclude=r".*\.h\.1\..*") == GPT_LINEARS[:6]
    # the same pattern finds the GPT under a `gpt.` prefix, as in the VLM
    outer = nn.Module()
    outer.gpt = model
    assert find_targets(outer, GPT_TARGETS) == ["gpt." + n for n in GPT_LINEARS]
    assert find_targets(outer, r"gpt\.transformer\.h\.0\.attn\.c_q") == ["gpt.transformer.h.0.attn.c_q"]


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="match no Linear"):
        apply_lora(ToyVLM(), r"q_proj", r=4, alpha=8)


# -----------------------------------------------------------------------------
# Merging into a 4-bit base

def test_merge_into_4bit_warns_and_unmerge_restores_exactly():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(128, 64), double_quant=True)
    layer = LoRALinear(base, r=8, alpha=16).eval()
    nn.init.normal_(layer.lora_B.weight, std=0.05)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.randn(4, 128)
    with torch.no_grad():
        y = layer(x)
        with pytest.warns(UserWarning, match="relative error"):
            layer.merge()
        assert layer.merged and (layer(x) - y).abs().max() < 0.1 * y.abs().max()
        layer.unmerge()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with torch.no_grad():
        assert torch.equal(layer(x), y)


def test_merge_lora_unload_leaves_a_plain_model():
    torch.manual_seed(0)
    model = ToyVLM().eval()
    apply_lora(model, GPT_TARGETS, r=4, alpha=8)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    idx = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        loss = model(idx, idx)
        merge_lora(model)
        assert torch.allclose(model(idx, idx), loss, atol=1e-5)
        unmerge_lora(model)
        assert torch.allclose(model(idx, idx), loss, atol=1e-5)
        merge_lora(model, unload=True)
        assert not lora_layers(model) and torch.allclose(model(idx, idx), loss, atol=1e-5)
    assert set(model.state_dict()) == set(ToyVLM().state_dict())


# -----------------------------------------------------------------------------
# Adapter files

def test_adapter_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ToyVLM().eval()
    base = copy.deepcopy(model)
    apply_lora(model, GPT_TARGETS, r=4, alpha=8, dropout=0.1)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(model, path, meta={"step": 7})
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # the temp file was renamed away
    idx = torch.randint(0, 64, (2, 6))

    assert load_adapter(base, path) == {"step": 7}  # unwrapped model: wrapped as the file says
    assert set(lora_state_dict(base)) == set(lora_state_dict(model))
    with torch.no_grad():
        assert torch.equal(base(idx, idx), model(idx, idx))
    layer = base.get_submodule(GPT_LINEARS[0])
    assert (layer.r, layer.alpha, layer.dropout) == (4, 8, 0.1)

    other = ToyVLM()
    apply_lora(other, r"transformer\.h\.\d+\.attn\.c_q", r=4, alpha=8)
    with pytest.raises(ValueError, match=r"unexpected keys \['transformer.h.0.attn.c_k.lora_A.weight'"):
        load_adapter(other, path)
    other = ToyVLM()
    apply_lora(other, GPT_TARGETS, r=4, alpha=16)
    with pytest.raises(ValueError, match="alpha=8"):
        load_adapter(other, path)


def test_empty_adapters_are_errors(tmp_path):
    path = str(tmp_path / "empty.safetensors")
    save_file({}, path)
    with pytest.raises(ValueError, match="no tensors"):
        load_adapter(ToyVLM(), path)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(ToyVLM(), str(tmp_path / "none.safetensors"))
    assert os.listdir(tmp_path) == ["empty.safetensors"]


# -----------------------------------------------------------------------------
# QLoRA end to end

def test_prepare_for_kbit_training():
    model = ToyVLM().to(torch.bfloat16)
    quantize_model(model)
    enabled = prepare_for_kbit_training(model)
    assert enabled == [""] and model.gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype in (torch.float32, torch.uint8) for p in model.parameters())
    assert model.transformer.wte(torch.tensor([1, 2])).requires_grad
    with torch.no_grad():
        assert not model.transformer.wte(torch.tensor([1, 2])).requires_grad
    plain = nn.Sequential(nn.Linear(4, 4))  # no embedding, no checkpointing flag: fine
    assert prepare_for_kbit_training(plain) == []


def test_qlora_steps_lower_loss_and_keep_4bit_base_bit_identical():
    torch.manual_seed(0)
    model = ToyVLM()
    quantize_model(model, include=r"transformer\..*", double_quant=True)
    prepare_for_kbit_training(model)
    apply_lora(model, GPT_TARGETS, r=8, alpha=16, dropout=0.05)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == sum(v.numel() for v in lora_state_dict(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    idx = torch.randint(0, 64, (4, 16))
    targets = torch.roll(idx, 1, dims=1)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, frozen[k]), f"{k} changed during training"
    assert all(m.weight.grad is None for m in model.modules() if isinstance(m, Linear4bit))
