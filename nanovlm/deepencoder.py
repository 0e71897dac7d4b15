"""
DeepEncoder: DeepSeek-OCR's vision tower, written so that its released weights load by a prefix strip.

    pixels (B, 3, S, S)
      -> SAM ViT-B: 16x16 patches, 12 blocks (14x14 windows, global attention in blocks 2/5/8/11), decomposed
         relative positions, neck 768 -> 256 channels                                   (B, 256, S/16, S/16)
      -> compressor: two stride-2 3x3 convs net_2 (256 -> 512), net_3 (512 -> 1024)    (B, 1024, S/64, S/64)
      -> CLIP-L/14 takes that map as its patch embeddings (its own patch conv is never used): CLS + interpolated
         position embeddings, pre-LN, 24 blocks with quick_gelu, no final LayerNorm      (B, 1 + (S/64)^2, 1024)
      -> features = [CLIP tokens without CLS, SAM tokens] on the channel axis           (B, (S/64)^2, 2048)
      -> projector: one Linear to the language model's width                            (B, (S/64)^2, out_dim)

Per image the language model sees the projected grid with one `image_newline` vector after every row, tiles
(stitched into one grid) before the global view, and one `view_seperator` at the end (see `layout`).

Parameter names mirror the checkpoint: `sam.*` is `model.sam_model.*`, `clip.*` is `model.vision_model.*`,
`projector.*` is `model.projector.*`, and `image_newline` / `view_seperator` (sic) are `model.<name>`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanovlm.common import Linear


@dataclass
class DeepEncoderConfig:
    # SAM ViT-B. sam_image_size is the pretraining size: it fixes the pos_embed grid (1024/16 = 64) and the length
    # of the global blocks' rel-pos tables (2*64 - 1); other input sizes interpolate both.
    sam_image_size: int = 1024
    sam_patch_size: int = 16
    sam_dim: int = 768
    sam_depth: int = 12
    sam_heads: int = 12
    sam_mlp_dim: int = 3072
    sam_window: int = 14
    sam_global_blocks: tuple = (2, 5, 8, 11)
    sam_neck_dim: int = 256
    # the 16x compressor after the neck: net_2 to this width, then net_3 to clip_dim
    net2_dim: int = 512
    # CLIP-L/14. clip_image_size / clip_patch_size only fix the position table (16x16 + CLS = 257 rows) and the
    # shape of the unused patch conv.
    clip_dim: int = 1024
    clip_depth: int = 24
    clip_heads: int = 16
    clip_mlp_dim: int = 4096
    clip_image_size: int = 224
    clip_patch_size: int = 14
    # projector output width: the language model's hidden size (1280 for DeepSeek-OCR, n_embd for our GPT)
    out_dim: int = 1280
    # how SAM adds its relative positions, all exact (see SamAttention.attend): "folded" (no (HW, HW) tensor, fused
    # kernels, what training uses), "chunked" (the bias added to a block of scores at a time: inference on CPU),
    # "dense" (the reference's float attention mask), or "auto" to pick by device and autograd. Changes no weights.
    sam_rel_pos: str = "auto"
    # Two additions for training small encoders from scratch; both off for DeepSeek-OCR's weights (no keys).
    # proj_norm_grid (rows, cols): normalise the projector output across the batch, per position and channel,
    # without affine (BatchNorm; running statistics at eval). It removes the part of the features that is the
    # same for every image, the "soft prompt" a from-scratch encoder otherwise collapses into.
    proj_norm_grid: tuple = ()
    # sam_conv_stem: widths of stride-2 conv+BatchNorm+ReLU layers before the patch projection (at most
    # log2(sam_patch_size) of them). A tiny SAM whose only view of the pixels is one 16x16 linear patch sat for
    # thousands of steps on the CTC plateau (predicting character frequencies, not locating them), on some seeds
    # for good; a conv stem sees strokes first and leaves that plateau within a few hundred steps.
    sam_conv_stem: tuple = ()
    # ctc_rows: the SAM neck's height in rows at the training mode; > 0 adds a linear read-out of each neck column
    # into ctc_classes (bytes + a blank) for an auxiliary CTC loss, so that SAM learns to see characters early.
    ctc_rows: int = 0
    ctc_classes: int = 257
    # token_ctc_split: > 0 adds the same read-out on the projected tokens the language model sees (one row of
    # them), each token read as this many CTC steps: the whole path into the GPT learns to carry the characters.
    token_ctc_split: int = 0
    # cols_per_token: SAM patch columns per visual token. 4 is DeepSeek's compressor (two stride-2 convs); a text
    # line may keep 2 or 1 (net_3, then net_2 too, stride 1 across), so that a token holds about one character
    # instead of three: what the language model must unpick from one token is what limits a tiny model's reading.
    # Rows are always compressed 4x; the weights' shapes do not change.
    cols_per_token: int = 4
    # ctc_to_tokens: the CTC read-out's character probabilities of each neck column, embedded (a Linear from the
    # classes) and added to that column's token (needs cols_per_token 1 and one row of tokens). The language model
    # then sees what SAM reads where it reads it: left to learn is spelling it out in order, not first decoding
    # characters from the compressed features, which was the slow part of learning to read.
    ctc_to_tokens: bool = False

    def col_strides(self):
        """(net_2, net_3) strides across columns for cols_per_token."""
        strides = {4: (2, 2), 2: (2, 1), 1: (1, 1)}
        if self.cols_per_token not in strides:
            raise ValueError(f"cols_per_token must be 4, 2 or 1, not {self.cols_per_token}")
        return strides[self.cols_per_token]

    def patches_per_side(self, pixels):
        return pixels // self.sam_patch_size

    def tokens_per_side(self, pixels, convs=2):
        """Positions along a side of `pixels` px after SAM's patches and `convs` of the compressor's stride-2
        convs (2: the visual tokens, 4x fewer per side; 1: net_2's output). The one home of this rule."""
        return math.ceil(self.patches_per_side(pixels) / 2 ** convs)

    def token_grid(self, height, width, convs=2):
        """(rows, cols) of the projected grid for an H x W view (convs=1: of net_2's output)."""
        col_stride = math.prod(self.col_strides()[:convs])
        return (self.tokens_per_side(height, convs), math.ceil(self.patches_per_side(width) / col_stride))

    @classmethod
    def tiny(cls, **overrides):
        """
        A CPU-sized encoder with every structural feature of the real one: windows that need padding, global
        blocks with interpolated rel-pos, the neck and both compressor convs, CLS, the CLIP+SAM concat.
        Native size 256 px (pos_embed 16x16, CLIP grid 4x4 = 16 tokens, 21 with newlines and separator); feed it
        e.g. image mode "pad:256" or "resize:128" (any multiple of 64 works).
        """
        tiny = dict(sam_image_size=256, sam_dim=32, sam_depth=4, sam_heads=2, sam_mlp_dim=128, sam_window=6,
                    sam_global_blocks=(1, 3), sam_neck_dim=16, net2_dim=32, clip_dim=64, clip_depth=2,
                    clip_heads=4, clip_mlp_dim=256, clip_image_size=56, clip_patch_size=14, out_dim=64)
        return cls(**{**tiny, **overrides})


def interpolate_grid(grid, size):
    """Resize a (1, C, g, g) position grid to size (an int, or (rows, cols)) the way the reference does: bicubic
    with antialias, in float32. antialias=True changes the cubic kernel (PIL's -0.5 instead of -0.75), so it
    matters even when upsampling."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    resized = F.interpolate(grid.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized.to(grid.dtype)


# -----------------------------------------------------------------------------
# SAM ViT-B with the compressor

class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, at every pixel."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """
    Pixels -> the patch grid, channels last. SAM's is one patch_size x patch_size conv. With stem widths (see
    DeepEncoderConfig.sam_conv_stem) it is a small CNN first: each width a stride-2 3x3 conv, BatchNorm and ReLU,
    then proj finishes the remaining stride (a 1x1 conv after four of them at patch 16).
    """

    def __init__(self, patch_size, dim, stem=()):
        super().__init__()
        layers, channels = [], 3
        for width in stem:
            layers += [nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.stem = nn.Sequential(*layers) if stem else None
        rest = patch_size // 2 ** len(stem)
        self.proj = nn.Conv2d(channels, dim, kernel_size=rest, stride=rest, bias=True)

    def forward(self, x):
        if self.stem is not None:
            x = self.stem(x)
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C), channels last


def rel_pos_table(size, rel_pos):
    """
    (size, size, head_dim) table R[i, j] = rel_pos[i - j + size - 1] for query/key coordinates i, j on one axis.
    The stored table is resized (linear, in float32) when it was trained for another grid: global blocks at any
    size but the pretraining one. Windowed blocks always see their own window size.
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        resized = F.interpolate(rel_pos.float().t()[None], size=length, mode="linear", align_corners=False)
        rel_pos = resized[0].t().to(rel_pos.dtype)
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


def rel_pos_terms(q, rel_pos_h, rel_pos_w, H, W):
    """The decomposed relative-position logits from the unscaled queries q (B, nh, H*W, hd):
    rel_h[b, n, (y, x), ky] = q . Rh[y, ky] and rel_w[b, n, (y, x), kx] = q . Rw[x, kx]."""
    B, nh, _, hd = q.shape
    Rh = rel_pos_table(H, rel_pos_h)  # (H, H, hd)
    Rw = rel_pos_table(W, rel_pos_w)  # (W, W, hd)
    q_grid = q.view(B, nh, H, W, hd)
    rel_h = torch.einsum("bnyxc,ykc->bnyxk", q_grid, Rh).reshape(B, nh, H * W, H)
    rel_w = torch.einsum("bnyxc,xkc->bnyxk", q_grid, Rw).reshape(B, nh, H * W, W)
    return rel_h, rel_w


def rel_pos_attention_dense(q, k, v, rel_h, rel_w, H, W):
    """The reference form: the bias for (query, key (ky, kx)) is rel_h[.., ky] + rel_w[.., kx], materialised as a
    (B, nh, HW, HW) float mask and added after the 1/sqrt(hd) scaling."""
    B, nh, HW, _ = q.shape
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, HW, HW)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def rel_pos_attention_folded(q, k, v, rel_h, rel_w, H, W):
    """
    The same attention without the (HW, HW) bias. The bias is itself a dot product: rel_h[q, ky] + rel_w[q, kx] =
    [rel_h[q], rel_w[q]] . [onehot(ky), onehot(kx)]. So append rel_h, rel_w (divided by the softmax scale, which
    undoes the scaling SDPA applies to every channel) to each query and the two one-hots to each key, and
    attention runs on H + W extra channels instead of an HW x HW tensor. With head_dim a power of 4 the scale is
    a power of 2, so the division is exact.
    """
    B, nh, HW, hd = q.shape
    scale = 1.0 / math.sqrt(hd)
    onehot_y = torch.eye(H, device=k.device, dtype=k.dtype).repeat_interleave(W, dim=0)  # (HW, H): key row ky
    onehot_x = torch.eye(W, device=k.device, dtype=k.dtype).repeat(H, 1)  # (HW, W): key column kx
    key_pos = torch.cat([onehot_y, onehot_x], dim=1).expand(B, nh, HW, H + W)
    q = torch.cat([q, rel_h.to(q.dtype) / scale, rel_w.to(q.dtype) / scale], dim=-1)  # (B, nh, HW, hd + H + W)
    k = torch.cat([k, key_pos], dim=-1)
    # zero channels up to a multiple of 8 (the alignment fused CUDA kernels ask of bf16), and v padded to the same
    # width: the fused kernels (flash on CPU and CUDA) want one head dim for q, k and v, and without them SDPA
    # falls back to the plain path that materialises the (HW, HW) attention matrix, the very thing avoided here
    width = q.shape[-1] + (-q.shape[-1] % 8)
    q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :hd]


def rel_pos_attention_chunked(q, k, v, rel_h, rel_w, H, W, chunk=1024):
    """
    The dense form a block of queries of one head at a time: scores (chunk, HW) = q k^T scaled, rel_h and rel_w
    added in place broadcast over the key grid, softmax, times v. No extra channels (folding triples the width of
    q, k and v at head_dim 64 and a 64x64 grid: on CPU it takes 2.2x this time) and never more than chunk x HW
    scores (the dense mask of a 1024 px image is 853 MiB). Meant for inference: under autograd it is exact too, but
    keeps every block's probabilities, the whole (HW, HW) matrix again.
    """
    B, nh, HW, hd = q.shape
    scale = 1.0 / math.sqrt(hd)
    out = torch.empty(B, nh, HW, v.shape[-1], dtype=v.dtype, device=v.device)
    for b in range(B):
        for head in range(nh):
            keys_t = k[b, head].t()
            for start in range(0, HW, chunk):
                rows = slice(start, start + chunk)
                scores = torch.matmul(q[b, head, rows], keys_t).mul_(scale)
                scores.view(-1, H, W).add_(rel_h[b, head, rows, :, None]).add_(rel_w[b, head, rows, None, :])
                out[b, head, rows] = torch.matmul(scores.softmax(dim=-1), v[b, head])
    return out


class SamAttention(nn.Module):
    """Multi-head attention with decomposed relative positions over a (B, H, W, C) grid: the whole grid (window 0)
    or non-overlapping window x window windows of it."""

    def __init__(self, dim, n_head, rel_pos_len, rel_pos_impl, window=0):
        super().__init__()
        self.n_head = n_head
        self.window = window
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim, bias=True)
        self.rel_pos_h = nn.Parameter(torch.zeros(rel_pos_len, dim // n_head))
        self.rel_pos_w = nn.Parameter(torch.zeros(rel_pos_len, dim // n_head))
        self.rel_pos_impl = rel_pos_impl

    def forward(self, x):
        B, H, W, C = x.shape
        qkv = self.qkv(x)  # (B, H, W, 3C)
        if self.window > 0:
            # The reference zero-pads the normed grid to whole windows before qkv, so a padding token's q, k, v are
            # qkv(0): padding qkv's output with that instead skips its matmul (19% of the rows at 1024 px)
            pads = H % self.window or W % self.window
            qkv = window_partition(qkv, self.window, pad_value=self.qkv(x.new_zeros(C)) if pads else None)
        y = self.attend(qkv)
        if self.window > 0:
            y = window_unpartition(y, self.window, H, W)  # the padding's outputs are dropped before proj
        return self.proj(y)

    def attend(self, qkv):
        """(B, h, w, 3C) q, k, v of one grid or window -> (B, h, w, C), heads concatenated head-major."""
        B, h, w, C3 = qkv.shape
        nh, hd = self.n_head, C3 // 3 // self.n_head
        # qkv channel index = s*C + head*hd + d with s in (q, k, v)
        q, k, v = qkv.reshape(B, h * w, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, hw, hd)
        rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, h, w)  # from the unscaled q
        impl = self.rel_pos_impl
        if impl == "auto":
            # CUDA: folded (fused kernels, nothing (hw, hw) kept for backward). CPU: the reference's mask while it
            # is small (a 14x14 window; a 4x128 text line in training too, where folding would widen q and k by
            # 132 channels: 0.85x the time of SAM's step), chunked on larger grids without autograd (a 40x40
            # global block takes 0.55x the time of folded, 0.7x of dense), folded under it (small backward)
            if q.is_cuda:
                impl = "folded"
            elif h * w <= 1024:
                impl = "dense"
            else:
                impl = "folded" if q.requires_grad else "chunked"
        attention = {"folded": rel_pos_attention_folded, "chunked": rel_pos_attention_chunked,
                     "dense": rel_pos_attention_dense}.get(impl)
        if attention is None:
            raise ValueError(f"sam_rel_pos must be 'auto', 'folded', 'chunked' or 'dense', got {impl!r}")
        y = attention(q, k, v, rel_h, rel_w, h, w)
        return y.transpose(1, 2).reshape(B, h, w, C3 // 3)


def window_partition(x, window, pad_value=None):
    """(B, H, W, C) -> (B * nWindows, window, window, C). The grid is padded at the bottom/right to a multiple of
    the window, with zeros or with the (C,) pad_value. The padding is not masked: padded tokens are keys and
    values like any other."""
    B, H, W, C = x.shape
    pad_h, pad_w = -H % window, -W % window
    if pad_value is None:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    elif pad_h or pad_w:
        padded = pad_value.to(x.dtype).expand(B, H + pad_h, W + pad_w, C).clone()
        padded[:, :H, :W] = x
        x = padded
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, C)


def window_unpartition(windows, window, H, W):
    """Inverse of window_partition, cropping the padding off: -> (B, H, W, C)."""
    Hp, Wp = H + (-H % window), W + (-W % window)
    C = windows.shape[-1]
    B = windows.shape[0] // ((Hp // window) * (Wp // window))
    x = windows.view(B, Hp // window, Wp // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, C)[:, :H, :W]


class SamMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.lin1 = Linear(dim, hidden)
        self.lin2 = Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))  # exact (erf) GELU


class SamBlock(nn.Module):
    def __init__(self, config, window):
        super().__init__()
        dim = config.sam_dim
        # window 0 = global attention over the whole grid; its rel-pos table spans the pretraining grid
        grid = window if window > 0 else config.sam_image_size // config.sam_patch_size
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SamAttention(dim, config.sam_heads, 2 * grid - 1, config.sam_rel_pos, window)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SamMLP(dim, config.sam_mlp_dim)

    def forward(self, x):  # (B, H, W, C)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Sam(nn.Module):
    """SAM ViT-B image encoder plus DeepSeek's 16x compressor (net_2, net_3). (B, 3, S, S) -> (B, clip_dim, S/64, S/64)."""

    def __init__(self, config):
        super().__init__()
        grid = config.sam_image_size // config.sam_patch_size
        self.patch_embed = PatchEmbed(config.sam_patch_size, config.sam_dim, config.sam_conv_stem)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.sam_dim))  # channels last, like the checkpoint
        self.blocks = nn.ModuleList([
            SamBlock(config, 0 if i in config.sam_global_blocks else config.sam_window)
            for i in range(config.sam_depth)])
        d = config.sam_neck_dim
        self.neck = nn.Sequential(
            nn.Conv2d(config.sam_dim, d, kernel_size=1, bias=False),
            LayerNorm2d(d),
            nn.Conv2d(d, d, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(d),
        )
        # no activation or norm between or after these two
        col_2, col_3 = config.col_strides()
        self.net_2 = nn.Conv2d(d, config.net2_dim, kernel_size=3, stride=(2, col_2), padding=1, bias=False)
        self.net_3 = nn.Conv2d(config.net2_dim, config.clip_dim, kernel_size=3, stride=(2, col_3), padding=1, bias=False)
        if config.ctc_rows > 0:
            self.ctc_head = nn.Linear(d * config.ctc_rows, config.ctc_classes)
        self.gradient_checkpointing = False

    def abs_pos(self, rows, cols):
        """pos_embed for a rows x cols token grid: (1, rows, cols, C)."""
        pos = self.pos_embed
        if pos.shape[1:3] == (rows, cols):
            return pos
        return interpolate_grid(pos.permute(0, 3, 1, 2), (rows, cols)).permute(0, 2, 3, 1)

    def ctc_logits(self, neck):
        """(B, neck_dim, rows, cols) neck map -> (cols, B, ctc_classes) log-probabilities, one step per column."""
        B, C, rows, cols = neck.shape
        if rows != self.ctc_head.in_features // C:
            raise ValueError(f"the CTC read-out was built for {self.ctc_head.in_features // C} neck rows, the image "
                             f"gives {rows} (train and read in the same image mode)")
        columns = neck.permute(3, 0, 1, 2).reshape(cols, B, C * rows)
        return F.log_softmax(self.ctc_head(columns).float(), dim=-1)

    def forward(self, pixels, return_neck=False):
        x = self.patch_embed(pixels)  # (B, H/16, W/16, C)
        x = x + self.abs_pos(x.shape[1], x.shape[2])
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        neck = self.neck(x.permute(0, 3, 1, 2))  # (B, neck_dim, H/16, W/16)
        out = self.net_3(self.net_2(neck))  # (B, clip_dim, H/64, W/16/cols_per_token)
        return (out, neck) if return_neck else out


# -----------------------------------------------------------------------------
# CLIP-L/14, fed SAM's map as patch embeddings

def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class ClipEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        grid = config.clip_image_size // config.clip_patch_size
        self.class_embedding = nn.Parameter(torch.zeros(config.clip_dim))
        # never used on this path (SAM makes the patch embeddings) but present in every checkpoint: kept, frozen
        self.patch_embedding = nn.Conv2d(3, config.clip_dim, kernel_size=config.clip_patch_size,
                                         stride=config.clip_patch_size, bias=False)
        self.patch_embedding.weight.requires_grad_(False)
        self.position_embedding = nn.Embedding(grid * grid + 1, config.clip_dim)
        self.grid = grid

    def forward(self, patch_embeds):  # (B, C, h, w) from SAM
        B, C, h, w = patch_embeds.shape
        x = patch_embeds.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major
        cls = self.class_embedding.to(x.dtype).expand(B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + h*w, C)
        pos = self.position_embedding.weight  # (1 + g*g, C); row 0 is CLS
        if (h, w) != (self.grid, self.grid):
            g = self.grid
            patch_pos = interpolate_grid(pos[1:].reshape(1, g, g, C).permute(0, 3, 1, 2), (h, w))  # (1, C, h, w)
            pos = torch.cat([pos[:1], patch_pos.flatten(2)[0].t()], dim=0)
        return x + pos.to(x.dtype)


class ClipAttention(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv_proj = Linear(dim, 3 * dim, bias=True)  # rows [q; k; v]
        self.out_proj = Linear(dim, dim, bias=True)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd), no mask
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class ClipMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.clip_dim, eps=1e-5)
        self.self_attn = ClipAttention(config.clip_dim, config.clip_heads)
        self.layer_norm2 = nn.LayerNorm(config.clip_dim, eps=1e-5)
        self.mlp = ClipMLP(config.clip_dim, config.clip_mlp_dim)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([ClipLayer(config) for _ in range(config.clip_depth)])


class Clip(nn.Module):
    """CLIP-L/14 vision transformer without its final LayerNorm. (B, C, h, w) SAM map -> (B, 1 + h*w, C), CLS first."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.clip_dim, eps=1e-5)  # (sic), as in the checkpoint
        self.transformer = ClipTransformer(config)
        self.gradient_checkpointing = False

    def forward(self, patch_embeds):
        x = self.pre_layrnorm(self.embeddings(patch_embeds))
        for layer in self.transformer.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class Projector(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.layers = Linear(in_dim, out_dim, bias=True)  # "layers": the checkpoint's name for this one Linear

    def forward(self, x):
        return self.layers(x)


# -----------------------------------------------------------------------------
# The encoder and the image token layout

class DeepEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.sam = Sam(config)
        self.clip = Clip(config)
        self.projector = Projector(2 * config.clip_dim, config.out_dim)
        self.image_newline = nn.Parameter(torch.zeros(config.out_dim))
        self.view_seperator = nn.Parameter(torch.zeros(config.out_dim))  # (sic), as in the checkpoint
        if config.proj_norm_grid:
            rows, cols = config.proj_norm_grid
            self.proj_norm = nn.BatchNorm1d(rows * cols * config.out_dim, affine=False)
        if config.token_ctc_split > 0:
            self.token_ctc_head = nn.Linear(config.out_dim, config.token_ctc_split * config.ctc_classes)
        if config.ctc_to_tokens:
            if config.cols_per_token != 1 or config.ctc_rows == 0:
                raise ValueError("ctc_to_tokens adds each neck column's reading to its token: it needs the CTC "
                                 f"read-out and cols_per_token 1 (got ctc_rows {config.ctc_rows}, "
                                 f"cols_per_token {config.cols_per_token})")
            self.ctc_embed = nn.Linear(config.ctc_classes, config.out_dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Fresh weights for training from scratch (also usable after to_empty() from the meta device). Linear,
        conv and norm layers get PyTorch's defaults; positions start at zero as in SAM; the CLIP tables and the
        two layout vectors are small Gaussians as in CLIP and DeepSeek-OCR."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                module.reset_parameters()
            elif isinstance(module, LayerNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()  # buffers too: after to_empty() they hold whatever memory held
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()  # affine and running statistics
        self.sam.pos_embed.zero_()
        for block in self.sam.blocks:
            block.attn.rel_pos_h.zero_()
            block.attn.rel_pos_w.zero_()
        dim = self.config.clip_dim
        nn.init.normal_(self.clip.embeddings.class_embedding, std=dim ** -0.5)
        nn.init.normal_(self.clip.embeddings.position_embedding.weight, std=0.02)
        nn.init.normal_(self.image_newline, std=self.config.out_dim ** -0.5)
        nn.init.normal_(self.view_seperator, std=self.config.out_dim ** -0.5)

    @property
    def gradient_checkpointing(self):
        return self.sam.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled):
        """Recompute SAM blocks and CLIP layers in the backward pass (non-reentrant) to save activation memory."""
        self.sam.gradient_checkpointing = enabled
        self.clip.gradient_checkpointing = enabled

    def forward(self, pixels, return_neck=False):
        """
        pixels: (B, 3, H, W) normalised images (H, W multiples of 64; see image_process.preprocess).
        Returns the projected features (B, h*w, out_dim), row-major over the h x w = H/64 x W/64 grid, no newlines;
        with return_neck also SAM's neck map (B, neck_dim, H/16, W/16).
        """
        assert pixels.ndim == 4 and pixels.shape[1] == 3, f"expected (B, 3, H, W) pixels, got {tuple(pixels.shape)}"
        sam_map, neck = self.sam(pixels, return_neck=True)  # (B, C, h, w)
        clip_tokens = self.clip(sam_map)[:, 1:]  # (B, h*w, C), CLS dropped
        sam_tokens = sam_map.flatten(2).transpose(1, 2)  # (B, h*w, C), same row-major order
        features = self.projector(torch.cat([clip_tokens, sam_tokens], dim=-1))  # CLIP first, then SAM
        if self.config.proj_norm_grid:
            features = self.normalize_across_images(features)
        if self.config.ctc_to_tokens:
            reading = self.sam.ctc_logits(neck).exp().transpose(0, 1)  # (B, cols, classes): SAM's reading per column
            features = features + self.ctc_embed(reading.to(features.dtype))
        return (features, neck) if return_neck else features

    def token_ctc_logits(self, grids):
        """(B, rows, cols, out_dim) projected grids of one row -> (cols * split, B, ctc_classes) log-probabilities:
        each token read as token_ctc_split steps, left to right."""
        B, rows, cols, D = grids.shape
        if rows != 1:
            raise ValueError(f"the token read-out reads one row of tokens, the image gives {rows} rows")
        split = self.config.token_ctc_split
        logits = self.token_ctc_head(grids[:, 0]).view(B, cols * split, self.config.ctc_classes)
        return F.log_softmax(logits.float(), dim=-1).transpose(0, 1)

    def normalize_across_images(self, features):
        """proj_norm: each (position, channel) standardised over the batch (running statistics at eval; also for
        a batch of one image, whose own statistics would be meaningless)."""
        B, P, D = features.shape
        if P * D != self.proj_norm.num_features:
            raise ValueError(f"proj_norm was built for a {'x'.join(map(str, self.config.proj_norm_grid))} grid, "
                             f"the image gives {P} positions (train and read in the same image mode)")
        norm = self.proj_norm
        use_batch = self.training and B > 1
        momentum = norm.momentum
        if use_batch:
            norm.num_batches_tracked += 1
            if momentum is None:  # a cumulative average, as nn.BatchNorm1d does (see training's calibration)
                momentum = 1.0 / norm.num_batches_tracked.item()
        flat = F.batch_norm(features.reshape(B, P * D).float(), norm.running_mean, norm.running_var,
                            training=use_batch, momentum=momentum or 0.0, eps=norm.eps)
        return flat.to(features.dtype).view(B, P, D)

    def with_newlines(self, grid):
        """(rows, cols, D) -> (rows * (cols + 1), D): image_newline after every row."""
        rows = grid.shape[0]
        newline = self.image_newline.to(grid.dtype).expand(rows, 1, grid.shape[-1])
        return torch.cat([grid, newline], dim=1).flatten(0, 1)

    def layout(self, global_features, tile_features=None, tiling=(1, 1), grid=None):
        """
        One image's sequence for the language model, in the reference order:
          [stitched tile grid, a newline per row] + [global grid, a newline per row] + [view_seperator]
        global_features: (rows*cols, D) projected features of the global view; grid (rows, cols), None = square.
        tile_features: (P, m*m, D) projected features of the P = w*h tiles in row-major tile order, or None.
        tiling: (w, h) tile columns and rows, width first (images_spatial_crop); (1, 1) = no tiles.
        Returns (N, D) with N = count_image_tokens(...) of the same image and mode.
        """
        if grid is None:
            n = math.isqrt(global_features.shape[0])
            grid = (n, n)
        D = global_features.shape[-1]
        assert grid[0] * grid[1] == global_features.shape[0], \
            f"global features {tuple(global_features.shape)} are not a {grid[0]}x{grid[1]} grid"
        parts = []
        if tile_features is not None and len(tile_features) > 0:
            w, h = tiling
            P, mm, _ = tile_features.shape
            m = math.isqrt(mm)
            assert P == w * h and m * m == mm, f"{P} tiles of {mm} tokens do not make a {w}x{h} tiling of square grids"
            # tile i sits at column i % w, row i // w; stitch them into one (h*m, w*m) grid
            stitched = tile_features.view(h, w, m, m, D).permute(0, 2, 1, 3, 4).reshape(h * m, w * m, D)
            parts.append(self.with_newlines(stitched))
        parts.append(self.with_newlines(global_features.view(*grid, D)))
        parts.append(self.view_seperator.to(global_features.dtype)[None])
        return torch.cat(parts, dim=0)

    def encode_image(self, global_view, tiles=None, tiling=(1, 1)):
        """
        One preprocessed image -> its (N, out_dim) token sequence. Arguments as image_process.preprocess returns
        them: global_view (3, H, W), tiles (P, 3, T, T) or None, tiling (w, h).
        """
        return self.encode_images([(global_view, tiles, tiling)])[0]

    def encode_images(self, images, return_readouts=False):
        """
        Many preprocessed images (each a (global_view, tiles, tiling) triple) -> a list of (N_i, out_dim)
        sequences; with return_readouts also, per image, its global view's SAM neck map (neck_dim, H/16, W/16)
        and projected grid (rows, cols, out_dim), for the CTC read-outs. Views of the same shape go through the
        encoder as one batch.
        """
        views = [img[0][None] for img in images] + [img[1] for img in images if img[1] is not None and len(img[1])]
        by_shape = {}
        for v in views:
            by_shape.setdefault(tuple(v.shape[-2:]), []).append(v)
        outputs = {shape: self(torch.cat(vs), return_neck=True) for shape, vs in by_shape.items()}
        taken = {shape: 0 for shape in outputs}

        def take(view, count):
            shape = tuple(view.shape[-2:])
            features, neck = outputs[shape]
            start = taken[shape]
            taken[shape] += count
            return features[start:start + count], neck[start:start + count]

        # hand the features back in the order the views were queued: all global views first, then the tiles
        globals_ = [take(img[0], 1) for img in images]
        sequences, readouts = [], []
        for img, (global_features, neck) in zip(images, globals_):
            tiles = img[1]
            tile_features = take(tiles, len(tiles))[0] if tiles is not None and len(tiles) else None
            grid = self.config.token_grid(*img[0].shape[-2:])
            sequences.append(self.layout(global_features[0], tile_features, img[2], grid))
            readouts.append((neck[0], global_features[0].view(*grid, -1)))
        return (sequences, readouts) if return_readouts else sequences

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
