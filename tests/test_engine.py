import torch
from PIL import Image

from nanovlm.engine import Engine, generate_naive, sample_next_token
from nanovlm.image_process import count_image_tokens, preprocess

MODE = "resize:128"


def image_prompt(tokenizer):
    image = preprocess(Image.new("RGB", (90, 70), (30, 120, 200)), MODE)
    n = count_image_tokens(90, 70, MODE)
    ids = tokenizer.render_for_completion([{"role": "user", "content": "<image>\nOCR this image."}], image_tokens=[n])
    return ids, image


def test_greedy_engine_equals_naive_loop_with_image(tokenizer, vlm):
    ids, image = image_prompt(tokenizer)
    naive = generate_naive(vlm, tokenizer, ids, [image], max_tokens=24)
    out, _ = Engine(vlm, tokenizer).generate_batch(ids, images=[image], max_tokens=24, temperature=0.0)
    assert out[0][len(ids):] == naive and len(naive) > 0


def test_greedy_engine_equals_naive_loop_text_only(tokenizer, vlm):
    ids = tokenizer.render_for_completion([{"role": "user", "content": "Hello there"}])
    naive = generate_naive(vlm, tokenizer, ids, None, max_tokens=24)
    out, _ = Engine(vlm, tokenizer).generate_batch(ids, max_tokens=24, temperature=0.0)
    assert out[0][len(ids):] == naive


def test_image_token_never_sampled_even_when_forced_highest(tokenizer, vlm):
    image_id = tokenizer.encode_special("<|image|>")
    with torch.no_grad():
        vlm.gpt.lm_head.weight[image_id] = vlm.gpt.lm_head.weight.abs().max() * 50  # dominates every logit
    ids, image = image_prompt(tokenizer)
    engine = Engine(vlm, tokenizer)
    for temperature, top_k in [(0.0, None), (1.0, None), (1.0, 3), (5.0, None)]:
        out, _ = engine.generate_batch(ids, images=[image], num_samples=2, max_tokens=16, temperature=temperature,
                                       top_k=top_k)
        for row in out:
            assert image_id not in row[len(ids):]


def test_encoder_runs_once_per_generate(tokenizer, vlm, monkeypatch):
    calls = []
    original = vlm.encoder.encode_images
    monkeypatch.setattr(vlm.encoder, "encode_images", lambda images: calls.append(1) or original(images))
    ids, image = image_prompt(tokenizer)
    Engine(vlm, tokenizer).generate_batch(ids, images=[image], num_samples=3, max_tokens=12, temperature=1.0)
    assert len(calls) == 1


def test_samples_differ_and_are_reproducible(tokenizer, vlm):
    ids, image = image_prompt(tokenizer)
    engine = Engine(vlm, tokenizer)
    kwargs = dict(images=[image], num_samples=4, max_tokens=12, temperature=1.5, seed=7)
    a, _ = engine.generate_batch(ids, **kwargs)
    b, _ = engine.generate_batch(ids, **kwargs)
    assert a == b
    assert len({tuple(row) for row in a}) > 1  # rows sample independently, the first token included
    c, _ = engine.generate_batch(ids, **dict(kwargs, seed=8))
    assert c != a


def test_stops_at_assistant_end(tokenizer, vlm):
    end = tokenizer.encode_special("<|assistant_end|>")
    with torch.no_grad():
        vlm.gpt.lm_head.weight[end] = vlm.gpt.lm_head.weight.abs().max() * 50
    ids, image = image_prompt(tokenizer)
    steps = list(Engine(vlm, tokenizer).generate(ids, images=[image], max_tokens=10, temperature=0.0))
    assert len(steps) == 1 and steps[0][0] == [end]


def test_sample_next_token_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    rng = torch.Generator().manual_seed(0)
    picks = {int(sample_next_token(logits, rng, 1.0, top_k=2)) for _ in range(50)}
    assert picks <= {1, 2}
    assert int(sample_next_token(logits, rng, 0.0)) == 1


def test_generate_many_equals_one_by_one_and_keeps_threads(tokenizer, vlm):
    # left-padded rows of different lengths (each decode step's mask is sliced from one over the whole cache),
    # decoded on one thread (a narrow model): the same greedy tokens as each prompt alone, the thread count kept
    image = image_prompt(tokenizer)[1]
    prompts = [image_prompt(tokenizer)[0],
               tokenizer.render_for_completion([{"role": "user", "content": "Hello there, a longer one"}]),
               tokenizer.render_for_completion([{"role": "user", "content": "Hi"}])]
    images = [[image], [], []]
    engine = Engine(vlm, tokenizer)
    threads = torch.get_num_threads()
    many = engine.generate_many(prompts, images=images, max_tokens=12)
    assert torch.get_num_threads() == threads
    for prompt, im, out in zip(prompts, images, many):
        alone, _ = engine.generate_batch(prompt, images=im or None, max_tokens=12, temperature=0.0)
        assert out == alone[0][len(prompt):]
