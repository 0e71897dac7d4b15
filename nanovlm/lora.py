"""
LoRA (Hu et al. 2021) on frozen Linear or NF4 Linear4bit layers: QLoRA without peft.

    y = base(x) + scaling * B(A(dropout(x)))        A: in -> r, Kaiming-uniform(a=sqrt(5));  B: r -> out, zeros

so a fresh adapter is a no-op; scaling = alpha / r (alpha / sqrt(r) with rslora). Dropout touches only the
adapter's input, never the base path. A wrapped layer's keys are `<name>.base_layer.*`, `<name>.lora_A.weight`
and `<name>.lora_B.weight`, as in peft. Targets are regexes on full module names, with the rule of
nf4.name_matches: the pattern must match the whole name or a whole dotted tail of it.

A typical QLoRA setup:

    quantize_model(model, double_quant=True)               # Linears -> NF4 (lm_head stays full precision)
    prepare_for_kbit_training(model)                       # freeze, fp32 leftovers, input grads, checkpointing
    apply_lora(model, r"transformer\\.h\\.\\d+\\.(attn|mlp)\\.(c_q|c_k|c_v|c_proj|c_fc)", r=16, alpha=32)
    ... train the LoRA parameters ...
    save_adapter(model, "adapter.safetensors")             # only A and B: small
"""

import json
import math
import warnings

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from nanovlm.common import atomic_write
from nanovlm.nf4 import Linear4bit, dequantize_nf4, name_matches, quantize_model, quantize_nf4, replace_module


class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        if not isinstance(base, (nn.Linear, Linear4bit)):
            raise ValueError(f"LoRA wraps nn.Linear or Linear4bit, not {type(base).__name__}")
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        device = base.weight.device
        # adapters train in fp32 whatever the base holds: they are small, and bf16 Adam updates of them stall
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.dropout, self.rslora = r, alpha, dropout, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.merged = False
        self.state_before_merge = None  # a 4-bit base's state, so unmerge restores it bit for bit
        self.reset_lora_parameters()
        self.train(base.training)  # wrapping a layer of an eval-mode model must not switch its dropout on

    @torch.no_grad()
    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in))
        nn.init.zeros_(self.lora_B.weight)

    def config(self):
        return dict(r=self.r, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora)

    def forward(self, x):
        out = self.base_layer(x)
        if self.merged:
            return out
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return out + (self.lora_B(self.lora_A(x)) * self.scaling).to(out.dtype)

    def delta_weight(self):
        """The adapter as a weight update (out, in), fp32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into the base weight; forward then runs the base alone."""
        if self.merged:
            return
        delta = self.delta_weight()
        base = self.base_layer
        if isinstance(base, Linear4bit):
            # NF4 has no room for a small update: dequantize, add, re-quantize, and say how much survived
            state = base.quant_state()
            old = dequantize_nf4(state, torch.float32)
            new_state = quantize_nf4((old + delta).to(state["dtype"]), state["blocksize"], base.double_quant)
            applied = dequantize_nf4(new_state, torch.float32) - old
            lost = ((applied - delta).norm() / delta.norm().clamp_min(1e-30)).item()
            warnings.warn(
                f"merging LoRA into a 4-bit weight re-quantizes it: the merged weight carries the adapter's update "
                f"with relative error {lost:.3f} (1.0 = the adapter's effect is gone; max |error| "
                f"{(applied - delta).abs().max().item():.3g} vs max |update| {delta.abs().max().item():.3g}). "
                f"Merge into the 16-bit weights instead to keep it.")
            self.state_before_merge = state
            base.set_state(new_state)
        else:
            base.weight += delta.to(base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        base = self.base_layer
        if isinstance(base, Linear4bit):
            base.set_state(self.state_before_merge)  # exact: subtracting and re-quantizing again would not be
            self.state_before_merge = None
        else:
            base.weight -= self.delta_weight().to(base.weight.dtype)
        self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


def lora_layers(model):
    """(name, LoRALinear) for every adapter in the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def find_targets(model, targets, exclude=None):
    """Names of the Linear / Linear4bit modules a target regex selects (see nf4.name_matches)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Linear4bit)):
            continue
        if name.rpartition(".")[2] in ("lora_A", "lora_B", "base_layer"):  # parts of an existing adapter
            continue
        if name_matches(targets, name) and not (exclude and name_matches(exclude, name)):
            names.append(name)
    return names


def apply_lora(model, targets, r=8, alpha=16, dropout=0.0, rslora=False, exclude=None):
    """
    Wrap every Linear whose full name matches `targets` (and not `exclude`) in a LoRALinear, in place, and freeze
    every other parameter, so only the adapters train. A pattern that matches nothing is an error (a typo would
    otherwise train nothing). Returns the wrapped names.
    """
    names = find_targets(model, targets, exclude)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))]
        raise ValueError(f"LoRA targets {targets!r} match no Linear module (the pattern must match a whole name or "
                         f"a whole dotted tail of it). Linear modules include: {linears[:12]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        replace_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, rslora))
    return names


def merge_lora(model, unload=False):
    """Merge every adapter into its base weight. unload=True also swaps each wrapper for its base layer, leaving a
    plain model whose state_dict has the original keys."""
    layers = lora_layers(model)
    for name, layer in layers:
        layer.merge()
        if unload:
            replace_module(model, name, layer.base_layer)
    return [name for name, _ in layers]


def unmerge_lora(model):
    for _, layer in lora_layers(model):
        layer.unmerge()


# -----------------------------------------------------------------------------
# Adapter-only checkpoints

def lora_state_dict(model):
    """The adapter tensors only (detached, sharing storage): `<name>.lora_A.weight`, `<name>.lora_B.weight`."""
    tensors = {}
    for name, layer in lora_layers(model):
        prefix = f"{name}." if name else ""
        tensors[prefix + "lora_A.weight"] = layer.lora_A.weight.detach()
        tensors[prefix + "lora_B.weight"] = layer.lora_B.weight.detach()
    return tensors


def save_adapter(model, path, meta=None):
    """
    Write the adapters as safetensors, with each layer's r/alpha/dropout/rslora and `meta` (JSON-able) in the
    header. Atomic: a temp file, fsync, then rename, so a crash never leaves a truncated adapter at `path`.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    if not tensors:
        raise ValueError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    header = {"lora": json.dumps({name: layer.config() for name, layer in lora_layers(model)}),
              "meta": json.dumps(meta if meta is not None else {})}
    atomic_write(path, safetensors_bytes(tensors, metadata=header))


def read_adapter(path):
    """(tensors, per-layer config, meta) from an adapter file."""
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, json.loads(header.get("lora", "{}")), json.loads(header.get("meta", "{}"))
    except FileNotFoundError:
        raise FileNotFoundError(f"adapter not found: {path}")
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt or truncated adapter file ({e})") from e


@torch.no_grad()
def load_adapter(model, path):
    """
    Load adapter weights into the model's LoRA layers. A model without LoRA layers is first wrapped as the file
    says (so `base model + adapter file` is all inference needs). Missing or unexpected keys, shape or scaling
    mismatches, and a file with no tensors are errors. Returns the file's meta dict.
    """
    tensors, configs, meta = read_adapter(path)
    if not tensors:
        raise ValueError(f"{path} holds no tensors: not a usable adapter (was it saved before apply_lora?)")
    if not lora_layers(model):
        for name, cfg in configs.items():
            try:
                base = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"adapter {path} was trained on a module '{name}' that this model does not have")
            replace_module(model, name, LoRALinear(base, cfg["r"], cfg["alpha"], cfg["dropout"], cfg["rslora"]))
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter {path} does not fit the model: missing keys {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    for name, layer in lora_layers(model):
        if layer.merged:
            raise ValueError(f"{name}: unmerge_lora before loading an adapter into a merged model")
        cfg = configs.get(name)
        if cfg is not None and (cfg["r"], cfg["alpha"], cfg["rslora"]) != (layer.r, layer.alpha, layer.rslora):
            raise ValueError(f"{name}: adapter was trained with r={cfg['r']} alpha={cfg['alpha']} "
                             f"rslora={cfg['rslora']}, the model's layer has r={layer.r} alpha={layer.alpha} "
                             f"rslora={layer.rslora}")
    for key, param in expected.items():
        if tensors[key].shape != param.shape:
            raise ValueError(f"{key}: adapter shape {tuple(tensors[key].shape)}, model {tuple(param.shape)}")
        param.copy_(tensors[key])
    return meta


# -----------------------------------------------------------------------------
# Getting a quantized model ready for adapter training

def input_embedding(model):
    """The token embedding: get_input_embeddings() if the model has one, else its first nn.Embedding."""
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def make_output_require_grad(module, inputs, output):
    if torch.is_grad_enabled():
        output.requires_grad_(True)


def prepare_for_kbit_training(model, gradient_checkpointing=True, upcast=True):
    """
    Before apply_lora on a quantized model:
    1. freeze every parameter;
    2. (upcast) cast the fp16/bf16 parameters left in full precision (norms, embeddings, lm_head, biases) to fp32:
       stabler, and ready to train should any be unfrozen (4-bit weights are uint8 and stay as they are);
    3. make the token embedding's output require grad, so activations carry a graph even though no parameter
       below the first adapter trains (checkpointed blocks then always have a grad-requiring input);
    4. turn on non-reentrant gradient checkpointing in every module that offers a `gradient_checkpointing` flag.
    Returns the names of the modules where checkpointing was turned on.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if upcast:
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    embedding = input_embedding(model)
    if embedding is not None and not getattr(embedding, "_input_grad_hook", None):
        embedding._input_grad_hook = embedding.register_forward_hook(make_output_require_grad)
    enabled = []
    if gradient_checkpointing:
        for name, module in model.named_modules():
            if isinstance(getattr(module, "gradient_checkpointing", None), bool):
                module.gradient_checkpointing = True
                enabled.append(name)
    return enabled


# -----------------------------------------------------------------------------
# An adapter run: a 4-bit (or full-precision) frozen base with LoRA adapters, as one set of settings

ADAPTER_KEYS = ("quant", "double_quant", "quant_targets", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def prepare_adapters(model, config, training=False):
    """
    Turn a full-precision model into the one an adapter run trains: the quant_targets Linears held in NF4
    (quant="nf4"), then LoRA adapters on the lora_targets Linears (lora_r > 0), everything else frozen.
    config holds ADAPTER_KEYS. training=True also readies the model for k-bit training (fp32 norms and heads,
    input grads); gradient checkpointing is the training loop's own switch.
    """
    if config["quant"] not in ("", "nf4"):
        raise ValueError(f"quant must be '' or 'nf4', got {config['quant']!r}")
    if config["quant"] and config["lora_r"] <= 0:
        raise ValueError("a 4-bit base is frozen: it needs LoRA adapters to train (lora_r > 0, e.g. 16)")
    if config["quant"]:
        quantize_model(model, include=config["quant_targets"], double_quant=config["double_quant"])
    if training:
        prepare_for_kbit_training(model, gradient_checkpointing=False, upcast=True)
    if config["lora_r"] > 0:
        apply_lora(model, config["lora_targets"], r=config["lora_r"], alpha=config["lora_alpha"],
                   dropout=config["lora_dropout"])
    return model
