import pytest
import torch

from conftest import tiny_vlm
from nanovlm.image_process import count_image_tokens, preprocess
from PIL import Image

MODE = "resize:128"


def prompt_with_image(tokenizer, n_tokens, text="<image>\nOCR this image."):
    return tokenizer.render_for_completion([{"role": "user", "content": text}], image_tokens=[n_tokens])


def test_splice_puts_features_exactly_at_image_positions(tokenizer, vlm):
    image = preprocess(Image.new("RGB", (100, 60), (200, 30, 30)), MODE)
    n = count_image_tokens(100, 60, MODE)
    ids = torch.tensor([prompt_with_image(tokenizer, n)])
    embeds = vlm.embed(ids, [image])
    features = vlm.encoder.encode_images([image])[0]
    is_image = ids[0] == tokenizer.encode_special("<|image|>")
    assert int(is_image.sum()) == n == features.shape[0]
    assert torch.equal(embeds[0, is_image], features)
    assert torch.equal(embeds[0, ~is_image], vlm.gpt.transformer.wte(ids)[0, ~is_image])


def test_two_images_in_two_rows_keep_their_order(tokenizer, vlm):
    red = preprocess(Image.new("RGB", (64, 64), (255, 0, 0)), MODE)
    blue = preprocess(Image.new("RGB", (64, 64), (0, 0, 255)), MODE)
    n = count_image_tokens(64, 64, MODE)
    ids = torch.tensor([prompt_with_image(tokenizer, n), prompt_with_image(tokenizer, n)])
    embeds = vlm.embed(ids, [red, blue])
    f_red, f_blue = vlm.encoder.encode_images([red, blue])
    is_image = ids == tokenizer.encode_special("<|image|>")
    assert torch.equal(embeds[0, is_image[0]], f_red) and torch.equal(embeds[1, is_image[1]], f_blue)


def test_mismatched_image_count_is_a_clear_error(tokenizer, vlm):
    image = preprocess(Image.new("RGB", (64, 64)), MODE)
    ids = torch.tensor([prompt_with_image(tokenizer, 5)])
    with pytest.raises(ValueError, match="5 <\\|image\\|> positions"):
        vlm.embed(ids, [image])
    with pytest.raises(ValueError, match="no images were given"):
        vlm.embed(ids, None)


def test_text_only_batch(tokenizer, vlm):
    ids = torch.tensor([tokenizer.encode("plain text only")])
    assert torch.equal(vlm(ids), vlm.gpt(ids))


def test_gradients_flow_to_the_encoder(tokenizer):
    model = tiny_vlm(tokenizer).train()
    with torch.no_grad():
        model.gpt.lm_head.weight.normal_(0, 0.05)
        for block in model.gpt.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
    image = preprocess(Image.new("RGB", (64, 64), (10, 200, 10)), MODE)
    n = count_image_tokens(64, 64, MODE)
    ids, mask = tokenizer.render_conversation([{"role": "user", "content": "<image>read"},
                                               {"role": "assistant", "content": "green"}], image_tokens=[n])
    inputs = torch.tensor([ids[:-1]])
    targets = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
    model(inputs, images=[image], targets=targets).backward()
    for name in ["encoder.sam.blocks.0.attn.qkv.weight", "encoder.clip.transformer.layers.0.mlp.fc1.weight",
                 "encoder.projector.layers.weight", "encoder.image_newline", "encoder.view_seperator"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_projector_width_follows_the_gpt(tokenizer):
    from nanovlm.vlm import preset_configs
    gpt_config, encoder_config, mode = preset_configs("d20", 65536)
    assert encoder_config.out_dim == gpt_config.n_embd == 1280 and str(mode) == "base"
    gpt_config, encoder_config, mode = preset_configs("tiny", 1000)
    assert encoder_config.out_dim == gpt_config.n_embd
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_configs("huge", 10)


def test_training_flops_equal_a_hand_count(tokenizer):
    """Every view at its own size, the real sequence length, lm_head on scored tokens only, 4-bit weights by their
    elements, and the backward factor only where something trains."""
    from nanovlm.deepencoder import DeepEncoderConfig
    from nanovlm.gpt import GPTConfig
    from nanovlm.lora import apply_lora
    from nanovlm.nf4 import quantize_model
    from nanovlm.vlm import build_vlm

    V = tokenizer.get_vocab_size()
    gpt_config = GPTConfig(sequence_len=64, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = build_vlm(gpt_config, DeepEncoderConfig.tiny(out_dim=32), tokenizer.encode_special("<|image|>"))
    views = [(128, 128), (64, 64), (64, 64)]  # a global view and two tiles
    rows, T, scored = 3, 20, 17

    def elements(prefix, skip=()):
        """Weights applied at every position: no lookups or added tables, no unused CLIP patch conv."""
        skip += ("encoder.clip.embeddings.", "encoder.sam.pos_embed")
        return sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith(prefix) and not n.startswith(skip) and "rel_pos" not in n)
    sam = elements("encoder.sam.", ("encoder.sam.net_2.", "encoder.sam.net_3."))
    net_2, net_3, clip = elements("encoder.sam.net_2."), elements("encoder.sam.net_3."), elements("encoder.clip.")
    projector = elements("encoder.projector.") + elements("encoder.image_newline") + elements("encoder.view_seperator")
    # positions: 128 px -> 8x8 patches, net_2 4x4, grid 2x2 (+1 CLS in CLIP); 64 px -> 4x4, 2x2, 1x1 (+1)
    encoder_positions = [(sam, 64 + 16 + 16), (net_2, 16 + 4 + 4), (net_3, 4 + 1 + 1), (clip, 5 + 2 + 2),
                         (projector, 4 + 1 + 1)]
    block = 4 * 32 * 32 + 2 * 32 * 128  # attention q, k, v, proj + MLP up and down: 12288 weights, no biases
    attention = 12 * 2 * 2 * 16 * T * rows * T  # nanochat's term at the real length
    lm_head = V * 32

    full = 6 * sum(e * n for e, n in encoder_positions) + 6 * 2 * block * rows * T + 6 * lm_head * scored
    assert model.training_flops(rows, T, views, scored) == full + attention

    for p in list(model.encoder.sam.parameters()):  # stage 2: SAM and the compressor frozen, nothing before them
        p.requires_grad_(False)
    stage2 = 2 * (sam * 96 + net_2 * 24 + net_3 * 6) + 6 * (clip * 9 + projector * 6) + \
        6 * 2 * block * rows * T + 6 * lm_head * scored
    assert model.training_flops(rows, T, views, scored) == stage2 + attention

    # QLoRA: 4-bit GPT blocks under r=4 adapters, everything else frozen
    quantize_model(model, include=r"transformer\.h\.\d+\.(attn|mlp)\.c_\w+")
    apply_lora(model, r"transformer\.h\.\d+\.(attn|mlp)\.c_\w+", r=4, alpha=8)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    lora = 4 * 4 * (32 + 32) + 4 * (32 + 128) + 4 * (128 + 32)  # per block: A (r x in) + B (out x r)
    qlora = 2 * sum(e * n for e, n in encoder_positions) + (4 * block + 6 * lora) * 2 * rows * T + \
        4 * lm_head * scored
    assert model.training_flops(rows, T, views, scored) == qlora + attention


def test_conv_stem_runs_at_its_own_resolutions(tokenizer):
    """A conv stem (the lines preset's) keeps the patch grid, and each of its layers counts at its own size."""
    from nanovlm.deepencoder import DeepEncoderConfig
    from nanovlm.gpt import GPTConfig
    from nanovlm.vlm import build_vlm

    V = tokenizer.get_vocab_size()
    gpt_config = GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    plain = build_vlm(gpt_config, DeepEncoderConfig.tiny(out_dim=32), 3)
    stem = build_vlm(gpt_config, DeepEncoderConfig.tiny(out_dim=32, sam_conv_stem=(4, 8)), 3)
    pixels = torch.randn(2, 3, 64, 128)
    assert stem.encoder.sam(pixels).shape == plain.encoder.sam(pixels).shape
    views, rows, T, scored = [(64, 128)], 1, 10, 5
    # layer 0: 3->4 channels (conv 108 + BatchNorm 8) at 32x64; layer 1: 4->8 (288 + 16) at 16x32; the patch
    # projection shrinks from 16x16x3 to 4x4x8 inputs per patch, at the same 4x8 patches
    extra = 116 * 32 * 64 + 304 * 16 * 32 + 32 * (4 * 4 * 8 - 16 * 16 * 3) * 4 * 8
    assert stem.training_flops(rows, T, views, scored) - plain.training_flops(rows, T, views, scored) == 6 * extra


def test_lines_preset_has_the_stem_and_reads_in_its_mode():
    from nanovlm.vlm import preset_configs
    _, encoder_config, mode = preset_configs("lines", 300)
    assert encoder_config.sam_conv_stem and str(mode) == "line:2048:64:1" and encoder_config.ctc_to_tokens
    _, encoder_config, mode = preset_configs("lines", 300, "line:2048:64")  # the earlier 32-token reader
    assert encoder_config.cols_per_token == 4 and not encoder_config.ctc_to_tokens


def test_line_modes_keep_more_columns_with_the_same_weights():
    """line:W:H:C keeps C SAM patch columns per token: the same weights, a grid C times finer across, and as many
    features as count_image_tokens promises the prompt."""
    from nanovlm.image_process import count_image_tokens
    from nanovlm.vlm import build_vlm, preset_configs

    shapes = {}
    for cols in (4, 2, 1):
        gpt_config, encoder_config, mode = preset_configs("lines", 300, f"line:512:64:{cols}")
        assert encoder_config.cols_per_token == cols and encoder_config.proj_norm_grid == (1, 32 // cols)
        encoder_config.ctc_to_tokens = False  # its Linear is the one weight that differs
        model = build_vlm(gpt_config, encoder_config, 3)
        shapes[cols] = {k: v.shape for k, v in model.state_dict().items() if "proj_norm" not in k}
        model.eval()
        sequence = model.encoder.encode_image(torch.randn(3, 64, 512))
        assert sequence.shape[0] == count_image_tokens(500, 60, mode) == 32 // cols + 2
        assert model.encoder.sam(torch.randn(1, 3, 64, 512)).shape[-2:] == (1, 32 // cols)
        # net_2 runs at 2 x (32 / its column stride) positions, net_3 and what follows at 32 / cols
        net_2, net_3 = model.encoder.config.token_grid(64, 512, convs=1), model.encoder.config.token_grid(64, 512)
        assert net_2 == (2, {4: 16, 2: 16, 1: 32}[cols]) and net_3 == (1, 32 // cols)
    assert shapes[4] == shapes[2] == shapes[1]


def test_ctc_to_tokens_adds_each_columns_reading_to_its_token():
    """ctc_to_tokens: token j = the projected features of column j + an embedding of SAM's CTC reading of column j;
    the language model's loss reaches the read-out through it, and the head belongs to the projector's group."""
    from nanovlm.vlm import build_vlm, component_of, preset_configs

    gpt_config, encoder_config, _ = preset_configs("lines", 300, "line:512:64:1")
    assert encoder_config.ctc_to_tokens  # the preset's, in a one-token-per-column mode
    torch.manual_seed(0)
    model = build_vlm(gpt_config, encoder_config, 3).eval()
    encoder = model.encoder
    pixels = torch.randn(2, 3, 64, 512)
    features, neck = encoder(pixels, return_neck=True)
    encoder.config.ctc_to_tokens = False  # the same weights without the reading
    plain = encoder(pixels)
    encoder.config.ctc_to_tokens = True
    reading = encoder.sam.ctc_logits(neck).exp()  # (cols, B, classes)
    assert torch.allclose(reading.sum(-1), torch.ones(32, 2))
    assert torch.allclose(features, plain + reading.transpose(0, 1) @ encoder.ctc_embed.weight.T, atol=1e-5)
    features.square().mean().backward()
    assert encoder.sam.ctc_head.weight.grad.abs().sum() > 0
    assert component_of("encoder.ctc_embed.weight") == "projector"
    for mode in ("line:512:64", "line:512:64:2"):
        _, config, _ = preset_configs("lines", 300, mode)
        config.ctc_to_tokens = True
        with pytest.raises(ValueError, match="cols_per_token 1"):
            build_vlm(gpt_config, config, 3)
