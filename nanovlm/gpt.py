"""
The GPT: nanochat's December 2025 model, math for math, so its checkpoints load and compute the same.
- token embedding, then a parameter-free RMSNorm (and one before every sub-block, and one at the end)
- rotary position embeddings (split halves, nanochat's sign, bf16 tables), no learned positions
- QK-norm after rotary, grouped-query attention (n_kv_head <= n_head)
- ReLU^2 MLP, no biases anywhere, untied lm_head, logits softcapped at 15
Added for vision: forward(embeds=...) takes ready input embeddings (image features spliced into the token
embeddings), and resize_vocab() grows the vocabulary for new special tokens without touching old rows.
Added for packed training: forward(doc_ids=...) runs rows that hold several samples, each as if it were alone
(attention block-diagonal and causal, rotary positions from 0 at every sample).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanovlm.common import PLAIN_LINEARS, Linear, linear


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # number of query heads
    n_kv_head: int = 6  # number of key/value heads (GQA when fewer than n_head)
    n_embd: int = 768


def norm(x):
    # no weight and no explicit eps: F.rms_norm then uses the dtype's machine epsilon, exactly as nanochat does
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(cos, sin, dtype):
    """The (.., D/2) cos and sin tables widened to the whole head dim for apply_rotary_emb, in x's dtype: made
    once per dtype (GPT.rotary), shared by every forward and layer."""
    cos, sin = cos.to(dtype), sin.to(dtype)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)


def apply_rotary_emb(x, cos, sin):
    """
    x: (B, T, H, D); cos, sin from rotary_tables. The head dim is split in halves (not interleaved pairs), and
    with x = [x1, x2] the result is [x1 cos + x2 sin, x2 cos - x1 sin]: nanochat's sign, the transpose of the usual
    rotate_half convention (trained weights depend on it, so do not "fix" it). Computed as x * [cos, cos] +
    [x2, x1] * [sin, -sin]: the same roundings bit for bit (a - b is a + (-b) exactly), in four ops, not nine.
    """
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = self.n_embd // self.n_head
        assert self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} not divisible by n_head {self.n_head}"
        assert self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0, \
            f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}"
        self.c_q = Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(self.n_embd, self.n_embd, bias=False)
        self._qkv = None  # (which weights it was built from, their concatenation): see project_qkv

    def project_qkv(self, x):
        """
        The q, k and v projections. Without autograd and with plain Linear layers (not 4-bit, no adapters), one
        matmul against the three weights concatenated: a decode step multiplies a single row, so three calls cost
        three times the overhead of one. The concatenation is cached until a weight is replaced or changed.
        """
        layers = (self.c_q, self.c_k, self.c_v)
        if torch.is_grad_enabled() or any(type(layer) not in PLAIN_LINEARS for layer in layers):
            return [layer(x) for layer in layers]
        key = tuple((layer.weight.data_ptr(), layer.weight._version) for layer in layers)
        if self._qkv is None or self._qkv[0] != key:
            self._qkv = (key, torch.cat([layer.weight for layer in layers]))
        kv_width = self.n_kv_head * self.head_dim
        return linear(x, self._qkv[1]).split([self.n_head * self.head_dim, kv_width, kv_width], dim=-1)

    def forward(self, x, cos_sin, kv_cache, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        # rotary, then QK-norm, on q and k in one pass: the same per-head arithmetic as two, half the calls (a
        # decode step is all call overhead at small sizes)
        qk = norm(apply_rotary_emb(torch.cat([q, k], dim=2), cos, sin))
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # all keys/values so far
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        if attn_mask is not None:
            # packed rows: each token sees the earlier tokens of its own sample only (sample_mask)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        elif kv_cache is not None and kv_cache.row_start is not None:
            # rows of different lengths, left-padded: each row sees its own tokens only (KVCache.attention_mask)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.attention_mask(Tq, Tk), enable_gqa=gqa)
        elif kv_cache is None or Tq == Tk:
            # training, or the first prefill into an empty cache: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:
            # one-token decode: it may attend to everything in the cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
        else:
            # chunked prefill: the whole cached prefix, then causal within the chunk
            prefix = Tk - Tq
            mask = torch.ones((Tq, Tk), dtype=torch.bool, device=q.device)
            mask[:, prefix:] = torch.tril(mask[:, prefix:])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache, attn_mask=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache, attn_mask)
        x = x + self.mlp(norm(x))
        return x


def sample_positions(doc_ids):
    """(B, T) rotary positions of packed rows: each token's distance from the first token of its sample (doc_ids
    (B, T): equal ids for the tokens of one sample, a new id at every sample start)."""
    columns = torch.arange(doc_ids.size(1), device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return columns - torch.where(starts, columns, 0).cummax(dim=1).values


def sample_mask(doc_ids):
    """(B, 1, T, T) bool for SDPA: a query sees the keys at or before it in its own sample. Built once per forward
    and shared by the layers; every query sees at least itself, so no row of scores is empty."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


class KVCache:
    """
    Keys and values of every layer, one tensor (n_layer, 2, B, H_kv, T, D), allocated on the first insert with
    the dtype and device of the keys. `pos` is the number of positions filled; it advances after the last layer.

    row_start (B,), for a batch of prompts of different lengths, left-padded to one length: the column where each
    row's own tokens begin. A row's positions (rotary) then count from there, and its queries never see the
    padding before it. None: every row starts at column 0 (one prompt, or equal lengths).
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, row_start=None):
        self.shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.cache = None
        self.pos = 0
        self.row_start = row_start
        self._mask = None  # (key for which it was built, mask): one mask per forward, shared by the layers
        self._own = None  # (B, 1, 1, cache length) bool, each row's own columns: the mask of every decode step
        self.last_start = 0 if row_start is None else int(row_start.max())

    def positions(self, T):
        """(B, T) rotary positions of the next T columns: column minus the row's start (padding counts as 0)."""
        columns = torch.arange(self.pos, self.pos + T, device=self.row_start.device)
        return (columns[None, :] - self.row_start[:, None]).clamp(min=0)

    def attention_mask(self, Tq, Tk):
        """(B, 1, Tq, Tk) bool: causal, and no padding keys. A padding query sees only itself (never an empty row,
        which would be NaN); nothing reads its output."""
        if Tq == 1 and Tk > self.last_start:
            # a decode step, after every row's start: causal and self are all True, so the mask is each row's own
            # keys, sliced from one mask over the whole cache instead of built anew (ten small ops) every step
            if self._own is None or self._own.size(-1) < Tk:
                keys = torch.arange(self.shape[4], device=self.row_start.device)
                self._own = (keys >= self.row_start[:, None])[:, None, None, :]
            return self._own[..., :Tk]
        key = (Tq, Tk)
        if self._mask is None or self._mask[0] != key:
            keys = torch.arange(Tk, device=self.row_start.device)
            queries = keys[Tk - Tq:]
            causal = keys[None, :] <= queries[:, None]
            own = keys[None, :] >= self.row_start[:, None]
            mask = (causal[None] & own[:, None, :]) | (keys[None, :] == queries[:, None])[None]
            self._mask = (key, mask[:, None])
        return self._mask[1]

    def get_pos(self):
        return self.pos

    def insert_kv(self, layer_idx, k, v):
        if self.cache is None:
            self.set_cache(torch.empty(self.shape, dtype=k.dtype, device=k.device))
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.cache.size(4):
            # grow (rare: the engine sizes the cache for the whole generation up front)
            grow_to = (t1 + 1024 + 1023) // 1024 * 1024
            extra = list(self.cache.shape)
            extra[4] = grow_to - self.cache.size(4)
            self.set_cache(torch.cat([self.cache, self.cache.new_empty(extra)], dim=4))
        keys, values = self.layers[layer_idx]
        keys.narrow(2, t0, t1 - t0).copy_(k)
        values.narrow(2, t0, t1 - t0).copy_(v)
        if layer_idx == len(self.layers) - 1:
            self.pos = t1
        return keys.narrow(2, 0, t1), values.narrow(2, 0, t1)

    def set_cache(self, cache):
        """Hold `cache` and each layer's (keys, values) views of it, (B, H, T, D) each: a decode step then slices
        once per tensor instead of indexing through five dimensions."""
        self.cache = cache
        self.shape = tuple(cache.shape)
        self.layers = [(cache[i, 0], cache[i, 1]) for i in range(cache.size(0))]

    def expand_batch(self, batch_size):
        """Fan a batch-1 cache out to batch_size identical rows (prefill once, then sample several)."""
        assert self.cache is not None and self.cache.size(2) == 1, "expand_batch needs a filled batch-1 cache"
        self.set_cache(self.cache.repeat(1, 1, batch_size, 1, 1, 1))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables for 10x the training length, so generation can run past it; not saved in checkpoints
        self.rotary_seq_len = config.sequence_len * 10
        head_dim = config.n_embd // config.n_head
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._wide_rotary = None  # (which tables and dtype it was built for, rotary_tables of them): see rotary
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000, device=None):
        if device is None:
            device = self.transformer.wte.weight.device
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()  # bf16 tables, as nanochat keeps them
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)

    def init_weights(self):
        """nanochat's init; call after to_empty() when the model was built on the meta device."""
        self.apply(self._init_weights)
        # zero the output projections: every block starts as the identity and the logits start flat
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.mlp.c_proj.weight)
            nn.init.zeros_(block.attn.c_proj.weight)
        self.init_rotary()
        if self.transformer.wte.weight.device.type == "cuda":
            self.transformer.wte.to(dtype=torch.bfloat16)  # nanochat keeps the embedding in bf16 on GPU

    def init_rotary(self):
        """(Re)compute the rotary tables on the model's device: they are buffers that checkpoints do not hold."""
        head_dim = self.config.n_embd // self.config.n_head
        self.cos, self.sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)

    def rotary(self, dtype):
        """rotary_tables of the whole (1, T, 1, D/2) tables in `dtype`, (1, T, 1, D) each, kept until the tables
        or the dtype change: a forward then slices its positions out of them (the same values), where widening its
        own slice cost five small ops, which at a one-token decode step are all overhead."""
        key = (dtype, self.cos.device, self.cos.data_ptr(), self.cos.shape, self.sin.data_ptr())
        if self._wide_rotary is None or self._wide_rotary[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: training may read them later
                self._wide_rotary = (key, rotary_tables(self.cos, self.sin, dtype))
        return self._wide_rotary[1]

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            # https://arxiv.org/abs/2310.17813
            fan_out, fan_in = module.weight.shape
            std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self, seq_len=None):
        """FLOPs per token for forward + backward (6N for the matmuls + the attention scores)."""
        nparams = self.num_params() - self.transformer.wte.weight.numel()
        c = self.config
        t = seq_len or c.sequence_len
        return 6 * nparams + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * t

    @torch.no_grad()
    def resize_vocab(self, new_vocab_size):
        """
        Grow wte and lm_head to new_vocab_size rows (new special tokens). Old rows are copied untouched, so every
        old token embeds and scores exactly as before. New embeddings start at the mean embedding (a neutral
        input); new lm_head rows start at zero (a logit of 0, which the model learns to move).
        """
        old = self.config.vocab_size
        if new_vocab_size < old:
            raise ValueError(f"resize_vocab only grows the vocabulary: {old} -> {new_vocab_size}")
        if new_vocab_size == old:
            return
        wte, head = self.transformer.wte.weight, self.lm_head.weight
        new_wte = torch.empty(new_vocab_size, wte.size(1), dtype=wte.dtype, device=wte.device)
        new_wte[:old] = wte
        new_wte[old:] = wte.float().mean(dim=0).to(wte.dtype)
        new_head = torch.zeros(new_vocab_size, head.size(1), dtype=head.dtype, device=head.device)
        new_head[:old] = head
        self.transformer.wte.weight = nn.Parameter(new_wte, requires_grad=wte.requires_grad)
        self.transformer.wte.num_embeddings = new_vocab_size
        self.lm_head.weight = nn.Parameter(new_head, requires_grad=head.requires_grad)
        self.lm_head.out_features = new_vocab_size
        self.config.vocab_size = new_vocab_size

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", embeds=None, doc_ids=None,
                return_hidden=False):
        """
        idx: (B, T) token ids, or None when embeds (B, T, n_embd) are given (image features already spliced in).
        Returns fp32 softcapped logits (B, T, vocab_size), or the loss when targets (B, T) are given
        (targets of -1 are ignored; loss_reduction 'mean' or 'none' as in F.cross_entropy, or 'supervised': the
        losses of the targets that are not -1 alone, flat in row-major order).
        doc_ids (B, T), for rows packed with several samples (training, no kv_cache): the sample of each token, a
        new id at every sample start. No token then attends across samples and positions restart at each one.
        None: one sample per row, plain causal attention.
        return_hidden: (that result, the last normed hidden states (B, T, n_embd)), which the detection head reads.
        """
        x = self.transformer.wte(idx) if embeds is None else embeds
        B, T = x.shape[:2]
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        assert T0 + T <= self.cos.size(1), f"sequence of {T0 + T} exceeds the rotary cache {self.cos.size(1)}"
        assert self.cos.device == x.device, f"rotary tables on {self.cos.device}, input on {x.device}"
        attn_mask = None
        # the bf16 tables in x's dtype, not converted at each of the layers' rotary products (the same values: the
        # products would promote them to x's dtype anyway)
        cos, sin = self.rotary(x.dtype)
        if doc_ids is not None:
            assert kv_cache is None, "packed rows (doc_ids) are for training, not for a kv_cache"
            positions = sample_positions(doc_ids)  # (B, T): each sample counts from 0
            cos_sin = cos[0, positions], sin[0, positions]  # (B, T, 1, D)
            attn_mask = sample_mask(doc_ids)
        elif kv_cache is not None and kv_cache.row_start is not None:
            positions = kv_cache.positions(T)  # (B, T): each row counts from its own first token
            cos_sin = cos[0, positions], sin[0, positions]  # (B, T, 1, D)
        else:
            cos_sin = cos[:, T0:T0 + T], sin[:, T0:T0 + T]

        x = norm(x)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos_sin, kv_cache, attn_mask, use_reentrant=False)
            else:
                x = block(x, cos_sin, kv_cache, attn_mask)
        x = norm(x)
        result = self.loss_or_logits(x, targets, loss_reduction)
        return (result, x) if return_hidden else result

    def loss_or_logits(self, x, targets, loss_reduction):
        """forward's result from the last normed hidden states x."""
        if targets is not None and loss_reduction in ("mean", "supervised"):
            # the mean ignores -1 targets anyway, so only the supervised rows need the (big) lm_head matmul:
            # in a VLM batch most positions are image or prompt tokens
            keep = targets.reshape(-1) != -1
            logits = self.head_logits(x.reshape(-1, x.size(-1))[keep])
            return F.cross_entropy(logits, targets.reshape(-1)[keep],
                                   reduction="mean" if loss_reduction == "mean" else "none")
        logits = self.head_logits(x)
        if targets is not None:
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction=loss_reduction)
        return logits

    def head_logits(self, x):
        softcap = 15
        logits = self.lm_head(x).float()
        return softcap * torch.tanh(logits / softcap)
