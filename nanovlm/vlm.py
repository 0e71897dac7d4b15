"""
The vision-language model: a GPT that reads DeepEncoder features where its prompt holds <|image|> tokens.

A prompt carries N <|image|> ids per image (N = image_process.count_image_tokens for the image and mode). The
encoder turns each image into exactly N vectors in DeepSeek-OCR's layout, and those vectors replace the token
embeddings at the <|image|> positions, in order. The GPT then runs on the spliced embeddings (forward(embeds=)).
"""

from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.deepencoder import DeepEncoder, DeepEncoderConfig
from nanovlm.gpt import GPT, GPTConfig
from nanovlm.image_process import global_shape, resolve_mode

# Model presets. "tiny" trains on a CPU in minutes; "lines" is tiny made to read text lines (one row of 16 tokens
# in reading order, a CTC read-out on SAM's neck); "d20" is nanochat's d20 GPT with the real DeepEncoder.
# proj_norm and ctc are sized for the preset's image mode when the model is built (see preset_configs).
TINY_GPT = dict(sequence_len=512, n_layer=4, n_head=4, n_kv_head=4, n_embd=128)
PRESETS = {
    "tiny": dict(gpt=TINY_GPT, encoder=dict(tiny=True), image_mode="resize:256", proj_norm=True, ctc=False),
    "lines": dict(gpt=TINY_GPT, encoder=dict(tiny=True, sam_window=4), image_mode="rect:1024:64", proj_norm=True,
                  ctc=True),
    "d20": dict(gpt=dict(sequence_len=2048, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280), encoder=dict(),
                image_mode="base", proj_norm=False, ctc=False),
}


def preset_configs(name, vocab_size, image_mode="", sequence_len=0):
    """
    (GPTConfig, DeepEncoderConfig, image_mode) of a preset; the projector width follows the GPT's n_embd.
    image_mode: empty for the preset's own; sequence_len: 0 for the preset's own. The projector-output norm and
    the CTC read-out are built for this mode's grid (they fix its shape), so a model with them reads in the mode
    it was trained in.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}', choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    image_mode = image_mode or preset["image_mode"]
    gpt_config = GPTConfig(vocab_size=vocab_size, **dict(preset["gpt"], sequence_len=sequence_len or
                                                         preset["gpt"]["sequence_len"]))
    encoder_kwargs = dict(preset["encoder"])
    make = DeepEncoderConfig.tiny if encoder_kwargs.pop("tiny", False) else DeepEncoderConfig
    encoder_config = make(out_dim=gpt_config.n_embd, **encoder_kwargs)
    width, height = global_shape(image_mode)
    if preset["proj_norm"]:
        if resolve_mode(image_mode).tile_size:
            raise ValueError(f"preset {name} normalises a fixed token grid; a tiling mode ({image_mode}) has none")
        encoder_config.proj_norm_grid = encoder_config.token_grid(height, width)
    if preset["ctc"]:
        encoder_config.ctc_rows = height // encoder_config.sam_patch_size
    return gpt_config, encoder_config, image_mode


class VLM(nn.Module):
    def __init__(self, gpt, encoder, image_token_id):
        super().__init__()
        assert encoder.config.out_dim == gpt.config.n_embd, \
            f"encoder out_dim {encoder.config.out_dim} != GPT n_embd {gpt.config.n_embd}"
        self.gpt = gpt
        self.encoder = encoder
        self.image_token_id = image_token_id

    @property
    def config(self):
        return self.gpt.config

    def get_device(self):
        return self.gpt.get_device()

    def embed(self, idx, images=None, return_readouts=False):
        """
        Token embeddings (B, T, n_embd) with image features spliced in.
        images: preprocessed images (global_view, tiles, tiling) in the order their <|image|> runs appear in idx,
        row by row: the i-th image fills the i-th run. None or [] for text only.
        """
        x = self.gpt.transformer.wte(idx)
        is_image = idx == self.image_token_id
        num_slots = int(is_image.sum())
        if not images:
            if num_slots:
                raise ValueError(f"the tokens hold {num_slots} <|image|> positions but no images were given")
            return (x, []) if return_readouts else x
        if return_readouts:
            sequences, readouts = self.encoder.encode_images(images, return_readouts=True)
        else:
            sequences = self.encoder.encode_images(images)
        features = torch.cat(sequences)  # (sum of N_i, n_embd)
        if features.size(0) != num_slots:
            raise ValueError(f"{len(images)} image(s) give {features.size(0)} feature vectors but the tokens hold "
                             f"{num_slots} <|image|> positions (prompt built for another image mode or size?)")
        # masked_scatter fills the True positions in row-major order: the image order of the batch
        x = x.masked_scatter(is_image.unsqueeze(-1), features.to(x.dtype))
        return (x, readouts) if return_readouts else x

    def forward(self, idx, images=None, targets=None, kv_cache=None, loss_reduction="mean", ctc_targets=None):
        """
        Logits (B, T, vocab) or the loss, as GPT.forward, for token ids with images spliced in.
        ctc_targets (training with a CTC read-out): one byte tensor per image, the text it shows; then the result
        is (language-model loss, CTC loss), from one pass of the encoder.
        """
        if ctc_targets is None:
            return self.gpt(None, targets=targets, kv_cache=kv_cache, loss_reduction=loss_reduction,
                            embeds=self.embed(idx, images))
        embeds, readouts = self.embed(idx, images, return_readouts=True)
        lm_loss = self.gpt(None, targets=targets, embeds=embeds)
        return lm_loss, self.ctc_loss(readouts, ctc_targets)

    def ctc_loss(self, readouts, ctc_targets):
        """
        CTC of the read-outs against each image's text bytes (class 0 is the blank, byte b is class b + 1): the
        SAM neck's columns (ctc_rows > 0) plus the projected tokens (token_ctc_split > 0), summed. Impossible
        alignments (text longer than the steps) count zero instead of infinity.
        """
        loss = torch.zeros((), device=self.get_device())
        if not readouts:
            return loss
        necks, grids = zip(*readouts)
        config = self.encoder.config
        heads = []
        if config.ctc_rows > 0:
            heads.append(self.encoder.sam.ctc_logits(torch.stack(necks)))
        if config.token_ctc_split > 0:
            heads.append(self.encoder.token_ctc_logits(torch.stack(grids)))
        lengths = torch.tensor([len(t) for t in ctc_targets], dtype=torch.long)
        flat = torch.cat([t.to(torch.long) + 1 for t in ctc_targets])
        for log_probs in heads:  # (T, B, classes)
            T, B = log_probs.shape[:2]
            loss = loss + F.ctc_loss(log_probs, flat.to(log_probs.device), torch.full((B,), T, dtype=torch.long),
                                     lengths, blank=0, zero_infinity=True)
        return loss

    def estimate_flops(self, seq_len, image_size):
        """
        Training FLOPs per GPT token, and per image for the encoder: 2 x params x tokens forward, x3 with the
        backward of a tower that trains, x2 for a frozen tower whose input still needs gradients, x1 for a frozen
        tower with nothing trainable before it (stage 2's SAM). Attention scores inside the encoder are left out.
        """
        gpt_flops = self.gpt.estimate_flops(seq_len)
        patches = (image_size // self.encoder.config.sam_patch_size) ** 2
        grid = (image_size // 64) ** 2
        sam = self.encoder.sam
        compressor = list(sam.net_2.parameters()) + list(sam.net_3.parameters())
        sam_body = [p for p in sam.parameters() if all(p is not c for c in compressor)]
        # (parameters, positions they are applied at): a conv costs its params once per output position
        towers = [(sam_body, patches), (list(sam.net_2.parameters()), (image_size // 32) ** 2),
                  (list(sam.net_3.parameters()), grid), (list(self.encoder.clip.parameters()), grid + 1),
                  (list(self.encoder.projector.parameters()), grid)]
        encoder_flops, upstream_trains = 0, False
        for params, positions in towers:
            trains = any(p.requires_grad for p in params)
            passes = 3 if trains else (2 if upstream_trains else 1)
            upstream_trains = upstream_trains or trains
            encoder_flops += 2 * passes * sum(p.numel() for p in params) * positions
        return gpt_flops, encoder_flops


def build_vlm(gpt_config, encoder_config, image_token_id, device="cpu", init=True):
    """A fresh VLM on `device` (built on the meta device first, so no memory is spent on a throwaway init)."""
    with torch.device("meta"):
        gpt = GPT(gpt_config)
        encoder = DeepEncoder(encoder_config)
    model = VLM(gpt, encoder, image_token_id)
    model.to_empty(device=device)
    if init:
        gpt.init_weights()
        encoder.init_weights()
    else:
        gpt.init_rotary()
    return model


def model_meta(model):
    """What a checkpoint needs to rebuild the model: both configs and the image token id."""
    return {"model_config": asdict(model.gpt.config), "encoder_config": asdict(model.encoder.config),
            "image_token_id": model.image_token_id}
