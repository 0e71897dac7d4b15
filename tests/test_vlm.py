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
    assert encoder_config.out_dim == gpt_config.n_embd == 1280 and mode == "base"
    gpt_config, encoder_config, mode = preset_configs("tiny", 1000)
    assert encoder_config.out_dim == gpt_config.n_embd
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_configs("huge", 10)
