"""
Generation with a KV cache. The prompt (with its images) is prefilled once at batch size 1: the encoder runs
there and never again. The cache is then fanned out to num_samples rows and every decode step feeds one token
per row. Tokens that must never be produced (<|image|>, the turn markers) are masked to -inf before sampling.
"""

import torch

from nanovlm.gpt import KVCache

# ids the model may never sample: images come only from the encoder, turns only from the renderer
FORBIDDEN_TOKENS = ["<|image|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|output_start|>",
                    "<|output_end|>"]
STOP_TOKENS = ["<|assistant_end|>", "<|bos|>"]


def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits (B, V) -> next ids (B, 1). temperature 0 is greedy; top_k keeps the k largest logits."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        values, indices = torch.topk(logits, k, dim=-1)
        probs = torch.softmax(values / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)
        return indices.gather(1, choice)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


def prompt_forward(model, ids, images, kv_cache=None):
    """Logits of a prompt through the VLM: the encoder runs here, once, for the prompt's images (if any)."""
    return model(ids, images=images, kv_cache=kv_cache)


# A decode step of a narrow GPT is a few hundred tiny ops (4 layers of one 128-wide row each, for tiny). On a CPU a
# second thread cannot split them usefully, and waking it for every matmul and attention costs more than the work
# (tiny on 2 idle cores: 1,604 tok/s on one thread, 1,248 on two), and far more when the other core is busy. So
# steps with less work than this (rows x n_embd^2: tiny up to 16 rows) run on one thread; wider ones (d20) use all.
ONE_THREAD_DECODE_WORK = 2 ** 18


def decode_threads(gpt, ids):
    """The threads a decode step of ids (B, 1) runs on: one for a small step on a CPU, else all of them."""
    small = ids.device.type == "cpu" and ids.size(0) * gpt.config.n_embd ** 2 < ONE_THREAD_DECODE_WORK
    return 1 if small else torch.get_num_threads()


def token_forward(model, ids, kv_cache):
    """Decode step: token ids only, the encoder is not involved."""
    threads, step_threads = torch.get_num_threads(), decode_threads(model.gpt, ids)
    if step_threads == threads:
        return model.gpt(ids, kv_cache=kv_cache)
    torch.set_num_threads(step_threads)  # restored before returning: the caller (and the prefill) keep theirs
    try:
        return model.gpt(ids, kv_cache=kv_cache)
    finally:
        torch.set_num_threads(threads)


def room_to_generate(gpt, prompt_length):
    """How many tokens can follow a prompt before the rotary table (10x the training length) runs out. A prompt
    that leaves no room is a ValueError naming both lengths."""
    capacity = gpt.cos.size(1)
    if prompt_length >= capacity:
        raise ValueError(f"the prompt is {prompt_length} tokens; this model reads at most {capacity - 1} "
                         f"(10x its training sequence length)")
    return capacity - prompt_length


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model  # a VLM
        self.tokenizer = tokenizer
        self.forbidden_ids = [tokenizer.encode_special(t) for t in FORBIDDEN_TOKENS if t in tokenizer.get_special_tokens()]
        self.stop_ids = {tokenizer.encode_special(t) for t in STOP_TOKENS}

    def mask_forbidden(self, logits):
        if not torch.is_tensor(self.forbidden_ids) or self.forbidden_ids.device != logits.device:
            self.forbidden_ids = torch.tensor(self.forbidden_ids, dtype=torch.long, device=logits.device)
        return logits.index_fill_(1, self.forbidden_ids, float("-inf"))

    @torch.inference_mode()
    def generate(self, tokens, images=None, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42):
        """
        Stream the continuation of `tokens` (a list of prompt ids holding <|image|> runs for `images`).
        Yields (token_column, token_masks) per step: one new id per row (nanochat's interface). The mask is 1 while
        a row is live and 0 after its stop token; such finished rows keep sampling, and callers ignore them.
        """
        assert isinstance(tokens, list) and tokens and isinstance(tokens[0], int), "tokens must be a list of ids"
        gpt = self.model.gpt
        config = gpt.config
        device = gpt.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        max_tokens = min(max_tokens, room_to_generate(gpt, len(tokens)))

        # prefill once, batch 1, with a cache long enough for the whole generation
        head_dim = config.n_embd // config.n_head
        kv_cache = KVCache(1, config.n_kv_head, len(tokens) + max_tokens, head_dim, config.n_layer)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = prompt_forward(self.model, ids, images, kv_cache)[:, -1, :]  # (1, V)
        kv_cache.expand_batch(num_samples)
        logits = logits.expand(num_samples, -1).clone()  # each row samples its own first token

        done = [False] * num_samples
        for step in range(max_tokens):
            next_ids = sample_next_token(self.mask_forbidden(logits), rng, temperature, top_k)  # (B, 1)
            column = next_ids[:, 0].tolist()
            masks = []
            for row, token in enumerate(column):
                masks.append(0 if done[row] else 1)
                if token in self.stop_ids:
                    done[row] = True
            yield column, masks
            if all(done) or step == max_tokens - 1:
                return  # no forward for a token nobody will read
            logits = token_forward(self.model, next_ids, kv_cache)[:, -1, :]

    @torch.inference_mode()
    def generate_many(self, prompts, images=None, features=None, max_tokens=256, temperature=0.0, top_k=None,
                      seed=42):
        """
        Different prompts (lists of ids of any lengths), each with its own images, generated together: left-padded
        into one batch (KVCache.row_start gives each row its own positions and hides the padding), prefilled once,
        then one token per row per step; each row stops at its own stop token. images: one list of preprocessed
        images per prompt; or features: their encoded sequences, flat in prompt order (see VLM.embed).
        Returns each prompt's generated ids, without the stop token. Greedy rows equal generate() one by one.
        """
        gpt = self.model.gpt
        config = gpt.config
        device = gpt.get_device()
        longest = max(len(p) for p in prompts)
        max_tokens = min(max_tokens, room_to_generate(gpt, longest))
        ids = torch.full((len(prompts), longest), self.tokenizer.get_bos_token_id(), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        row_start = torch.tensor([longest - len(p) for p in prompts], device=device)
        kv_cache = KVCache(len(prompts), config.n_kv_head, longest + max_tokens, config.n_embd // config.n_head,
                           config.n_layer, row_start=row_start)
        flat_images = [image for row in images for image in row] if images else None
        logits = self.model(ids.to(device), images=flat_images, features=features, kv_cache=kv_cache)[:, -1, :]
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        outputs, done = [[] for _ in prompts], [False] * len(prompts)
        for step in range(max_tokens):
            next_ids = sample_next_token(self.mask_forbidden(logits), rng, temperature, top_k)  # (B, 1)
            for row, token in enumerate(next_ids[:, 0].tolist()):
                if not done[row]:
                    done[row] = token in self.stop_ids
                    if not done[row]:
                        outputs[row].append(token)
            if all(done) or step == max_tokens - 1:
                break
            logits = token_forward(self.model, next_ids, kv_cache)[:, -1, :]
        return outputs

    def generate_batch(self, tokens, images=None, num_samples=1, **kwargs):
        """Whole sequences: (prompt + generated ids per row without the stop token, masks)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        finished = [False] * num_samples
        for column, column_masks in self.generate(tokens, images, num_samples, **kwargs):
            for row, (token, mask) in enumerate(zip(column, column_masks)):
                if finished[row]:
                    continue
                if token in self.stop_ids:
                    finished[row] = True
                else:
                    results[row].append(token)
                    masks[row].append(mask)
            if all(finished):
                break
        return results, masks


@torch.inference_mode()
def generate_naive(model, tokenizer, tokens, images=None, max_tokens=256, stop=True):
    """
    The baseline: greedy decoding that re-runs the whole sequence (and the encoder) every step. The engine must
    produce exactly these tokens; the benchmark measures how much faster it does so.
    """
    engine_rules = Engine(model, tokenizer)
    gpt = model.gpt
    ids = list(tokens)
    out = []
    for _ in range(max_tokens):
        x = torch.tensor([ids], dtype=torch.long, device=gpt.get_device())
        logits = engine_rules.mask_forbidden(prompt_forward(model, x, images)[:, -1, :])
        token = int(torch.argmax(logits, dim=-1))
        if stop and token in engine_rules.stop_ids:
            break
        out.append(token)
        ids.append(token)
    return out
