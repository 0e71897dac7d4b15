"""
DeepEncoder: exact parameter counts and checkpoint names at full size (meta device only), and the behaviours
the reference depends on, checked on the tiny config against straightforward re-statements written here.
"""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import nanovlm.common as common
import nanovlm.deepencoder as deepencoder
from nanovlm.common import Linear
from nanovlm.deepencoder import DeepEncoder, DeepEncoderConfig, SamBlock, rel_pos_terms, \
    rel_pos_attention_chunked, rel_pos_attention_dense, rel_pos_attention_folded
from nanovlm.image_process import count_image_tokens, preprocess
from nanovlm.nf4 import quantize_model

KEYS_FILE = os.path.join(os.path.dirname(__file__), "deepencoder_keys.txt")
PREFIXES = [("model.sam_model.", "sam."), ("model.vision_model.", "clip."), ("model.projector.", "projector."),
            ("model.", "")]


def checkpoint_keys():
    """The 476 keys of the DeepSeek-OCR checkpoint's vision part -> shape, named as in our module."""
    keys = {}
    for line in open(KEYS_FILE):
        name, shape = line.split(" ", 1)
        for old, new in PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        keys[name] = tuple(int(s) for s in shape.strip()[1:-1].split(","))
    return keys


@pytest.fixture(scope="module")
def meta_encoder():
    with torch.device("meta"):
        return DeepEncoder(DeepEncoderConfig())


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    encoder = DeepEncoder(DeepEncoderConfig.tiny())
    with torch.no_grad():  # non-zero everywhere, so every term of the forward shows
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return encoder


# -----------------------------------------------------------------------------
# full size, on the meta device

def test_param_counts(meta_encoder):
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(meta_encoder.sam) == 95_569_152
    assert count(meta_encoder.clip) == 303_177_728
    assert count(meta_encoder.projector) == 2_622_720
    assert meta_encoder.num_params() == 401_372_160
    # the unused CLIP patch conv is there for the checkpoint, and frozen
    assert meta_encoder.clip.embeddings.patch_embedding.weight.requires_grad is False
    assert count(meta_encoder.clip.embeddings.patch_embedding) == 602_112


def test_state_dict_is_the_checkpoint_layout(meta_encoder):
    ours = {k: tuple(v.shape) for k, v in meta_encoder.state_dict().items()}
    theirs = checkpoint_keys()
    assert len(theirs) == 476
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    assert ours == theirs


def test_full_size_shapes(meta_encoder):
    for size, n in [(512, 8), (640, 10), (1024, 16), (1280, 20)]:
        sam_map = meta_encoder.sam(torch.empty(2, 3, size, size, device="meta"))
        assert sam_map.shape == (2, 1024, n, n)
        clip_out = meta_encoder.clip(sam_map)
        assert clip_out.shape == (2, 1 + n * n, 1024)
        features = torch.cat([clip_out[:, 1:], sam_map.flatten(2).transpose(1, 2)], -1)
        assert meta_encoder.projector(features).shape == (2, n * n, 1280)


# -----------------------------------------------------------------------------
# straightforward re-statements of the reference, for the tiny model

def resize_linear(table, length):
    """F.interpolate(mode="linear", align_corners=False) along the rows of a (L, C) table, written out."""
    L = table.shape[0]
    if L == length:
        return table
    out = []
    for i in range(length):
        src = max((i + 0.5) * L / length - 0.5, 0.0)
        i0 = min(int(math.floor(src)), L - 1)
        i1 = min(i0 + 1, L - 1)
        lam = src - i0
        out.append((1 - lam) * table[i0] + lam * table[i1])
    return torch.stack(out)


def naive_attention(x, attn, key_mask=None):
    """SAM attention on (N, H, W, C), with the relative-position bias written out pair by pair."""
    N, H, W, C = x.shape
    nh, hd = attn.n_head, C // attn.n_head
    qkv = x.reshape(N, H * W, C) @ attn.qkv.weight.t() + attn.qkv.bias
    Rh, Rw = resize_linear(attn.rel_pos_h, 2 * H - 1), resize_linear(attn.rel_pos_w, 2 * W - 1)
    ys, xs = torch.arange(H * W) // W, torch.arange(H * W) % W
    dy = ys[:, None] - ys[None, :] + H - 1  # (query, key) -> row of Rh
    dx = xs[:, None] - xs[None, :] + W - 1
    heads = []
    for h in range(nh):
        q, k, v = (qkv[..., s * C + h * hd: s * C + (h + 1) * hd] for s in range(3))
        bias = (q[:, :, None, :] * Rh[dy][None]).sum(-1) + (q[:, :, None, :] * Rw[dx][None]).sum(-1)
        logits = q @ k.transpose(1, 2) / math.sqrt(hd) + bias
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask, float("-inf"))
        heads.append(torch.softmax(logits, -1) @ v)
    y = torch.cat(heads, -1) @ attn.proj.weight.t() + attn.proj.bias
    return y.view(N, H, W, C)


def naive_block(x, block, mask_padding=False):
    B, H, W, C = x.shape
    h = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, 1e-6)
    ws = block.window
    if ws == 0:
        out = naive_attention(h, block.attn)
    else:
        Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
        padded = torch.zeros(B, Hp, Wp, C)
        padded[:, :H, :W] = h  # zero padding after norm1
        real = torch.zeros(Hp, Wp, dtype=torch.bool)
        real[:H, :W] = True
        out = torch.zeros_like(padded)
        for wy in range(Hp // ws):
            for wx in range(Wp // ws):
                cut = (slice(wy * ws, (wy + 1) * ws), slice(wx * ws, (wx + 1) * ws))
                mask = real[cut].reshape(1, -1) if mask_padding else None
                out[:, cut[0], cut[1]] = naive_attention(padded[:, cut[0], cut[1]], block.attn, mask)
        out = out[:, :H, :W]
    x = x + out
    return x + block.mlp(F.layer_norm(x, (C,), block.norm2.weight, block.norm2.bias, 1e-6))


# -----------------------------------------------------------------------------
# SAM

@pytest.mark.parametrize("impl", ["folded", "dense", "chunked", "auto"])
@pytest.mark.parametrize("grid,table_len", [(5, 9), (6, 11), (7, 31), (4, 31)])
def test_rel_pos_attention_matches_reference(impl, grid, table_len):
    torch.manual_seed(grid)
    cfg = DeepEncoderConfig.tiny(sam_rel_pos=impl)
    block = SamBlock(cfg, window=0)
    with torch.no_grad():
        block.attn.rel_pos_h.data = torch.randn(table_len, 16)
        block.attn.rel_pos_w.data = torch.randn(table_len, 16)
    x = torch.randn(2, grid, grid, 32)
    torch.testing.assert_close(block.attn(x), naive_attention(x, block.attn), atol=1e-5, rtol=1e-5)


def test_folded_and_dense_agree_with_gradients():
    torch.manual_seed(0)
    B, nh, H, W, hd = 2, 3, 6, 6, 16
    q, k, v = (torch.randn(B, nh, H * W, hd, requires_grad=True) for _ in range(3))
    table_h, table_w = (torch.randn(11, hd, requires_grad=True) for _ in range(2))
    grads = []
    for attend in (rel_pos_attention_dense, rel_pos_attention_folded):
        rel_h, rel_w = rel_pos_terms(q, table_h, table_w, H, W)
        y = attend(q, k, v, rel_h, rel_w, H, W)
        grads.append((y, *torch.autograd.grad((y * y).sum(), [q, k, v, table_h, table_w])))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][1:], grads[1][1:]):  # the table gradients sum over every query: fp32 round-off
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [7, 36, 1024])
def test_chunked_rel_pos_attention_is_the_dense_one(chunk):
    """Blocks of queries that do not divide the grid (7), exactly one block per head (36), one short block."""
    torch.manual_seed(chunk)
    B, nh, H, W, hd = 2, 3, 4, 9, 16
    q, k, v = (torch.randn(B, nh, H * W, hd) for _ in range(3))
    rel_h, rel_w = rel_pos_terms(q, torch.randn(2 * H - 1, hd), torch.randn(2 * W - 1, hd), H, W)
    torch.testing.assert_close(rel_pos_attention_chunked(q, k, v, rel_h, rel_w, H, W, chunk=chunk),
                               rel_pos_attention_dense(q, k, v, rel_h, rel_w, H, W), atol=1e-5, rtol=1e-5)


def test_auto_rel_pos_picks_by_autograd_and_size(tiny, monkeypatch):
    """auto on the CPU: the dense mask for small grids and windows (training too), chunked for large global grids,
    folded for them while autograd records; every choice gives the same block output."""
    block = tiny.sam.blocks[1]  # global
    assert block.attn.rel_pos_impl == "auto"
    called = []
    for name in ("folded", "dense", "chunked"):
        function = getattr(deepencoder, f"rel_pos_attention_{name}")
        monkeypatch.setattr(deepencoder, f"rel_pos_attention_{name}",
                            lambda *a, _f=function, _n=name, **k: called.append(_n) or _f(*a, **k))
    small, large = torch.randn(1, 8, 8, 32), torch.randn(1, 40, 40, 32)
    outputs = {}
    for x in (small, large):
        with torch.no_grad():
            outputs[x.shape[1], "no grad"] = block(x)
        outputs[x.shape[1], "grad"] = block(x).detach()
    assert called == ["dense", "dense", "chunked", "folded"]
    for size in (8, 40):
        torch.testing.assert_close(outputs[size, "no grad"], outputs[size, "grad"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_window_padding_is_after_norm1_and_not_masked(tiny, grad):
    """With and without autograd (folded vs the dense mask); the padding's q, k, v come from qkv(0), not from a
    matmul over padded rows."""
    block = tiny.sam.blocks[0]
    assert block.window == 6
    x = torch.randn(2, 8, 8, 32)  # 8 -> padded to 12: four 6x6 windows, most of them partly padding
    qkv_inputs = []
    hook = block.attn.qkv.register_forward_hook(lambda module, args, out: qkv_inputs.append(tuple(args[0].shape)))
    with torch.set_grad_enabled(grad):
        ours = block(x).detach()
    hook.remove()
    assert qkv_inputs == [(2, 8, 8, 32), (32,)]  # the real rows, then one zero token for the padding
    with torch.no_grad():
        torch.testing.assert_close(ours, naive_block(x, block), atol=1e-5, rtol=1e-5)
        # the padding matters: masking it out would give another answer
        assert (ours - naive_block(x, block, mask_padding=True)).abs().max() > 1e-3
        # a padded token's key and value are the qkv biases (padding comes after the norm)
        C = 32
        zero_qkv = block.attn.qkv(torch.zeros(C))
        torch.testing.assert_close(zero_qkv[C:], block.attn.qkv.bias[C:])


def test_global_block_interpolates_rel_pos(tiny):
    block = tiny.sam.blocks[1]
    assert block.window == 0 and block.attn.rel_pos_h.shape == (31, 16)  # trained for the 16x16 grid of 256 px
    with torch.no_grad():
        for grid in (8, 16, 20):  # 128 px (63 -> resized), native, 320 px
            x = torch.randn(1, grid, grid, 32)
            torch.testing.assert_close(block(x), naive_block(x, block), atol=1e-5, rtol=1e-5)


def pil_bicubic(grid, size):
    """(C, g, g) -> (C, size, size) through PIL's float bicubic, one channel at a time: an independent statement
    of torch's antialiased bicubic."""
    out = [np.asarray(Image.fromarray(ch.numpy(), mode="F").resize((size, size), Image.Resampling.BICUBIC))
           for ch in grid]
    return torch.from_numpy(np.stack(out))


def test_sam_pos_embed_interpolation(tiny):
    pos = tiny.sam.pos_embed.detach()  # (1, 16, 16, 32)
    with torch.no_grad():
        assert torch.equal(tiny.sam.abs_pos(16, 16), pos)
        for size in (8, 10, 20):  # down and up: antialias matters both ways
            ours = tiny.sam.abs_pos(size, size)[0].permute(2, 0, 1)
            torch.testing.assert_close(ours, pil_bicubic(pos[0].permute(2, 0, 1), size), atol=1e-5, rtol=1e-5)
            plain = F.interpolate(pos.permute(0, 3, 1, 2), size=(size, size), mode="bicubic", align_corners=False)
            assert (ours - plain[0]).abs().max() > 1e-3


def test_clip_position_interpolation_keeps_cls(tiny):
    emb = tiny.clip.embeddings
    table = emb.position_embedding.weight.detach()  # (1 + 4*4, 64)
    with torch.no_grad():
        emb.class_embedding.zero_()
        for h in (2, 3, 4, 6):
            out = emb(torch.zeros(1, 64, h, h))[0]  # zero patches: what is left are the positions
            assert out.shape == (1 + h * h, 64)
            torch.testing.assert_close(out[0], table[0])
            expected = table[1:] if h == 4 else pil_bicubic(table[1:].t().reshape(64, 4, 4), h).reshape(64, -1).t()
            torch.testing.assert_close(out[1:], expected, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# the whole encoder

def test_forward_concat_order_and_shapes(tiny):
    for size, n in [(256, 4), (128, 2), (192, 3)]:
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            sam_map = tiny.sam(x)
            clip_out = tiny.clip(sam_map)
            features = torch.cat([clip_out[:, 1:], sam_map.flatten(2).transpose(1, 2)], -1)  # CLIP, then SAM
            out = tiny(x)
        assert sam_map.shape == (2, 64, n, n) and clip_out.shape == (2, 1 + n * n, 64)
        assert out.shape == (2, n * n, 64)
        torch.testing.assert_close(out, tiny.projector(features))


def test_out_dim_follows_config():
    encoder = DeepEncoder(DeepEncoderConfig.tiny(out_dim=48))
    assert encoder(torch.randn(1, 3, 128, 128)).shape == (1, 4, 48)
    assert encoder.image_newline.shape == encoder.view_seperator.shape == (48,)


def test_gradient_checkpointing_same_gradients(tiny):
    x = torch.randn(2, 3, 128, 128)
    grads = []
    for enabled in (False, True):
        tiny.zero_grad()
        tiny.gradient_checkpointing = enabled
        assert tiny.sam.gradient_checkpointing == tiny.clip.gradient_checkpointing == enabled
        tiny(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
    # every trainable weight on the forward path learns; the frozen patch conv does not
    assert "clip.embeddings.patch_embedding.weight" not in grads[0]
    assert "sam.blocks.1.attn.rel_pos_h" in grads[0] and "sam.pos_embed" in grads[0]


# -----------------------------------------------------------------------------
# layout

def test_layout_order_with_markers(tiny):
    D = tiny.config.out_dim
    with torch.no_grad():
        tiny.image_newline.fill_(-1.0)
        tiny.view_seperator.fill_(-2.0)
    n, m, w, h = 4, 2, 2, 3  # global 4x4, tiles 2x2 in a 2-wide, 3-high tiling
    glob = torch.arange(n * n, dtype=torch.float)[:, None].expand(-1, D) + 1000  # global token t -> 1000 + t
    tiles = torch.stack([torch.arange(m * m, dtype=torch.float) + 100 * i for i in range(w * h)])  # tile i, token t
    seq = tiny.layout(glob, tiles[..., None].expand(-1, -1, D), (w, h))[:, 0].tolist()
    expected = []
    for row in range(h * m):  # the stitched grid, one row at a time across all tiles of that tile row
        tile_row, y = divmod(row, m)
        for col in range(w * m):
            tile_col, x = divmod(col, m)
            expected.append(100 * (tile_row * w + tile_col) + y * m + x)
        expected.append(-1)
    for y in range(n):
        expected += [1000 + y * n + x for x in range(n)] + [-1]
    expected.append(-2)
    assert seq == expected
    assert len(seq) == (h * m) * (w * m + 1) + n * (n + 1) + 1
    # no tiles: the global grid with newlines, then the separator
    assert tiny.layout(glob)[:, 0].tolist() == expected[-(n * (n + 1) + 1):]


def test_layout_positions_full_size_gundam_2x3(tiny):
    """The fact sheet's measured 2x3 Gundam layout: newlines at 20, 41, ..., 629, then 646, ..., 901, SEP at 902."""
    D = tiny.config.out_dim
    with torch.no_grad():
        tiny.image_newline.fill_(-1.0)
        tiny.view_seperator.fill_(-2.0)
    seq = tiny.layout(torch.zeros(256, D), torch.zeros(6, 100, D), (2, 3))[:, 0]
    assert len(seq) == 903 == count_image_tokens(1000, 1400, "gundam")
    newlines = (seq == -1).nonzero().flatten().tolist()
    assert newlines == [20 + 21 * i for i in range(30)] + [646 + 17 * i for i in range(16)]
    assert (seq == -2).nonzero().flatten().tolist() == [902]


def test_encode_image_length_matches_count(tiny):
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (200, 330, 3), dtype=np.uint8))
    with torch.no_grad():
        for mode in ("pad:256", "resize:128", "gundam:128:256"):
            pre = preprocess(image, mode)
            seq = tiny.encode_image(*pre)
            assert seq.shape == (count_image_tokens(330, 200, mode), 64), mode
        assert pre.tiling == (3, 2)  # 330x200 with 128 px tiles: 3 wide, 2 high


def test_encode_images_batches_like_one_at_a_time(tiny):
    rng = np.random.RandomState(1)
    images = [Image.fromarray(rng.randint(0, 255, s, dtype=np.uint8)) for s in [(90, 100, 3), (300, 140, 3),
                                                                               (120, 260, 3)]]
    tiny.eval()
    with torch.no_grad():
        pres = [preprocess(img, "gundam:128:256") for img in images]
        together = tiny.encode_images(pres)
        for pre, seq in zip(pres, together):
            torch.testing.assert_close(seq, tiny.encode_image(*pre), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# common.Linear: oneDNN for wide no-grad fp32 layers on CPU, F.linear otherwise

def ran_onednn(fn):
    from torch.profiler import profile
    with profile() as prof:
        out = fn()
    return out, any("_linear_pointwise" in event.name for event in prof.events())


@pytest.mark.skipif(not common.onednn_linear_available(), reason="this torch build has no oneDNN linear op")
def test_linear_takes_onednn_only_where_it_may(monkeypatch):
    torch.manual_seed(0)
    layer, narrow = Linear(512, 640), Linear(128, 512)  # ONEDNN_MIN_WIDTH = 512 on both sides
    x, row = torch.randn(3, 10, 512), torch.randn(1, 512)
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        for inputs in (x, row):  # a decode step's single row too: its shape repeats, the kernel is reused
            out, used = ran_onednn(lambda: layer(inputs))
            assert used
            torch.testing.assert_close(out, F.linear(inputs, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        assert not ran_onednn(lambda: narrow(x[..., :128]))[1]
        monkeypatch.setattr(common, "CPU_ONEDNN_LINEAR", False)
        out_off, used_off = ran_onednn(lambda: layer(x))
        assert not used_off and torch.equal(out_off, expected)
    monkeypatch.setattr(common, "CPU_ONEDNN_LINEAR", True)
    out, used = ran_onednn(lambda: layer(x))  # autograd records: the differentiable path
    assert not used and out.grad_fn is not None
    out.sum().backward()
    assert layer.weight.grad.shape == (640, 512)


def test_linear_is_an_nn_linear_for_checkpoints_lora_and_4bit(tiny):
    assert Linear(4, 8).state_dict().keys() == torch.nn.Linear(4, 8).state_dict().keys()
    quantized = quantize_model(tiny, include=r"sam\.blocks\.0\..*")
    assert quantized == ["sam.blocks.0.attn.qkv", "sam.blocks.0.attn.proj", "sam.blocks.0.mlp.lin1",
                         "sam.blocks.0.mlp.lin2"]
