import torch

import nanovlm.common as common
from nanovlm.gpt import GPT, GPTConfig, KVCache


def tiny_gpt(n_head=4, n_kv_head=2, vocab=97, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=64))
    model.init_weights()
    # nanochat's init zeroes the output projections; give every weight a value so the checks see real math
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def test_d20_parameter_count_on_meta():
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280))
    assert model.num_params() == 560_988_160
    assert len(model.state_dict()) == 2 + 6 * 20  # cos/sin are not saved


def test_rotary_tables_are_bf16_and_long():
    model = tiny_gpt()
    assert model.cos.dtype == torch.bfloat16 and model.cos.shape == (1, 640, 1, 8)


def test_kv_cache_prefill_and_decode_match_full_forward():
    model = tiny_gpt()
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(2, 2, 24, 16, 2)
        steps = [model(idx[:, :10], kv_cache=cache)]
        steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(10, 24)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_chunked_prefill_equals_one_prefill():
    model = tiny_gpt()
    idx = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        one = model(idx, kv_cache=KVCache(1, 2, 30, 16, 2))
        cache = KVCache(1, 2, 8, 16, 2)  # too short on purpose: the cache grows
        chunks = [model(idx[:, a:b], kv_cache=cache) for a, b in [(0, 7), (7, 19), (19, 30)]]
    assert cache.get_pos() == 30
    assert (torch.cat(chunks, 1) - one).abs().max() <= 1e-5


def test_expand_batch_fans_out_a_prefill():
    model = tiny_gpt()
    idx = torch.randint(0, 97, (1, 12))
    nxt = torch.randint(0, 97, (3, 1))
    with torch.no_grad():
        cache = KVCache(1, 2, 16, 16, 2)
        model(idx, kv_cache=cache)
        cache.expand_batch(3)
        out = model(nxt, kv_cache=cache)[:, -1]
        ref = model(torch.cat([idx.expand(3, -1), nxt], 1))[:, -1]
    assert (out - ref).abs().max() <= 1e-5


def test_embeds_equal_token_ids():
    model = tiny_gpt()
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        embeds = model.transformer.wte(idx)
        assert torch.equal(model(idx), model(None, embeds=embeds))
        assert torch.equal(model(idx, targets), model(None, targets, embeds=embeds))


def test_logits_are_softcapped_fp32():
    model = tiny_gpt()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
        logits = model(torch.randint(0, 97, (1, 8)))
    assert logits.dtype == torch.float32 and logits.abs().max() <= 15


def test_loss_ignores_minus_one_and_matches_full_cross_entropy():
    model = tiny_gpt()
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[:, :9] = -1
    with torch.no_grad():
        logits = model(idx)
        ref = torch.nn.functional.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-1)
        loss = model(idx, targets)
        per_token = model(idx, targets, loss_reduction="none")
    assert abs(loss.item() - ref.item()) < 1e-5
    assert per_token.shape == (32,) and torch.all(per_token.view(2, 16)[:, :9] == 0)
    assert abs(per_token.sum().item() / 14 - ref.item()) < 1e-5


def test_resize_vocab_keeps_old_logits():
    model = tiny_gpt()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        before = model(idx)
        model.resize_vocab(110)
        after = model(idx)
    assert model.config.vocab_size == 110 and model.transformer.wte.weight.shape == (110, 64)
    assert torch.equal(after[..., :97], before)
    assert torch.all(after[..., 97:] == 0)  # new lm_head rows start at zero
    new_token = torch.tensor([[105]])
    assert torch.isfinite(model(new_token)).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_gpt().train()
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    model(idx, targets).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(idx, targets).backward()
    for g, r in zip((p.grad for p in model.parameters()), ref):
        assert torch.allclose(g, r, atol=1e-6)


def test_rotary_in_four_ops_equals_the_split_halves_bit_for_bit():
    from nanovlm.gpt import apply_rotary_emb, rotary_tables
    cos, sin = torch.randn(1, 5, 1, 8).bfloat16(), torch.randn(1, 5, 1, 8).bfloat16()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 3, 16).to(dtype)
        c, s = cos.to(dtype), sin.to(dtype)
        x1, x2 = x[..., :8], x[..., 8:]
        halves = torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=3)  # nanochat's formula
        assert torch.equal(apply_rotary_emb(x, *rotary_tables(cos, sin, dtype)), halves)


def test_fused_qkv_at_inference_follows_weight_changes():
    """Without autograd, q/k/v come from one matmul against the concatenated weights; the concatenation is rebuilt
    when a weight changes in place or is replaced, and training (autograd on) uses the three layers."""
    model = tiny_gpt()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 3, 64)
    separate = [layer(x) for layer in (attn.c_q, attn.c_k, attn.c_v)]
    with torch.no_grad():
        for fused, plain in zip(attn.project_qkv(x), separate):
            assert torch.allclose(fused, plain, atol=1e-6)
        attn.c_k.weight.mul_(2)  # in place: the cached concatenation is stale
        assert torch.allclose(attn.project_qkv(x)[1], 2 * separate[1], atol=1e-5)
        model.load_state_dict(tiny_gpt(seed=1).state_dict())
        assert torch.allclose(attn.project_qkv(x)[0], attn.c_q(x), atol=1e-6)
    q, _, _ = attn.project_qkv(x)
    assert q.requires_grad and attn.c_q.weight.grad is None
    q.sum().backward()
    assert attn.c_q.weight.grad is not None


def test_logits_same_with_and_without_onednn_linears(monkeypatch):
    """Inference routes the wide layers (512+ in and out: fused q/k/v, MLP, lm_head) through oneDNN where the build
    has it; prefill and KV-cached decode logits are F.linear's to fp32 round-off."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=64, vocab_size=600, n_layer=1, n_head=4, n_kv_head=4, n_embd=512))
    gpt.init_weights()
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.05)
    ids = torch.randint(0, 600, (2, 9))
    logits = {}
    for on in (True, False):
        monkeypatch.setattr(common, "CPU_ONEDNN_LINEAR", on)
        cache = KVCache(2, 4, 10, 128, 1)
        with torch.no_grad():
            logits[on] = torch.cat([gpt(ids, kv_cache=cache)[:, -1], gpt(ids[:, :1], kv_cache=cache)[:, -1]])
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
