"""
The tokenizer: byte-level BPE trained with rustbpe (nanochat's split pattern), run with tiktoken.

Special tokens are nanochat's nine, then the image token and DeepSeek-OCR's grounding markup:
- <|image|> is only ever produced by render_conversation, from an `<image>` placeholder and a token count.
- the grounding markup (<|grounding|>, <|ref|>, <|/ref|>, <|det|>, <|/det|>) is part of prompts and answers,
  so render_conversation recognises it inside message text.
- the structural tokens (<|bos|>, <|user_start|>, ..., <|image|>) are never read from text: a user who types
  "<|image|>" gets the bytes of that string, not the token.

Saved as plain files (no pickle): tokenizer.bpe (one "base64(token) rank" line per token) and tokenizer.json
(split pattern and special-token ids).
"""

import base64
import copy
import json
import os
import pickle
import re

import tiktoken

from nanovlm.common import atomic_write, get_base_dir

NANOCHAT_SPECIAL_TOKENS = [
    "<|bos|>",  # every document/conversation starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]
IMAGE_TOKEN = "<|image|>"
GROUNDING_TOKENS = ["<|grounding|>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>"]
SPECIAL_TOKENS = NANOCHAT_SPECIAL_TOKENS + [IMAGE_TOKEN] + GROUNDING_TOKENS

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a prompt; rendered as N <|image|> ids
# span ids of render_conversation(spans=True): the last assistant turn (the asked answer, the "student" span) and
# the ones before it (in-context examples, the "teacher" spans); 0 is not supervised. The student is 1, what a
# plain mask gives every learned token: a single-turn render is the same with or without spans
STUDENT, TEACHER = 1, 2

# GPT-4's pattern with numbers split into groups of at most two digits (nanochat's choice)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

MARKUP_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in GROUNDING_TOKENS) + ")")


class Tokenizer:
    def __init__(self, enc, bos_token="<|bos|>"):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    # ---- construction and files

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Train a BPE with vocab_size tokens in total (the specials included) on an iterator of strings."""
        import rustbpe  # only needed for training
        num_merged = vocab_size - len(SPECIAL_TOKENS)
        if num_merged < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, num_merged, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(build_encoding(trainer.get_pattern(), ranks, SPECIAL_TOKENS))

    @classmethod
    def from_directory(cls, tokenizer_dir):
        config_path = os.path.join(tokenizer_dir, "tokenizer.json")
        ranks_path = os.path.join(tokenizer_dir, "tokenizer.bpe")
        for path in (config_path, ranks_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"tokenizer file not found: {path} (train one with python -m scripts.tok_train)")
        with open(config_path) as f:
            config = json.load(f)
        ranks = {}
        with open(ranks_path) as f:
            for line_no, line in enumerate(f, 1):
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise ValueError(f"{ranks_path}:{line_no}: malformed line {line.strip()!r}")
        enc = tiktoken.Encoding(name="nanovlm", pat_str=config["pattern"], mergeable_ranks=ranks,
                                special_tokens=config["special_tokens"])
        return cls(enc)

    def save(self, tokenizer_dir):
        os.makedirs(tokenizer_dir, exist_ok=True)
        lines = [f"{base64.b64encode(token).decode()} {rank}\n"
                 for token, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])]
        config = {"pattern": self.enc._pat_str, "special_tokens": self.enc._special_tokens}
        atomic_write(os.path.join(tokenizer_dir, "tokenizer.bpe"), "".join(lines).encode())
        atomic_write(os.path.join(tokenizer_dir, "tokenizer.json"), json.dumps(config, indent=2).encode())

    # ---- nanochat's interface

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return set(self.enc.special_tokens_set)

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode_special(self, name):
        return self.enc.encode_single_token(name)

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """
        str -> list of ids, or list of str -> list of lists. Special-token strings in the text are plain text.
        prepend/append: a special token (name or id) to put at the start/end of every sequence.
        """
        def as_ids(t):
            return [] if t is None else [t if isinstance(t, int) else self.encode_special(t)]
        head, tail = as_ids(prepend), as_ids(append)
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            return [head + ids + tail for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise ValueError(f"encode takes a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids):
        return self.enc.decode(ids)

    # ---- nanovlm additions

    def encode_with_markup(self, text):
        """Like encode(text), but the grounding markup (<|ref|>, <|det|>, ...) becomes its special ids."""
        ids = []
        for piece in MARKUP_SPLIT.split(text):
            if piece in GROUNDING_TOKENS:
                ids.append(self.encode_special(piece))
            elif piece:
                ids.extend(self.enc.encode_ordinary(piece))
        return ids

    def render_conversation(self, conversation, image_tokens=None, max_tokens=None, spans=False):
        """
        Tokenize a conversation for training. Returns (ids, mask): mask is 1 exactly on the tokens the model
        learns to produce (the assistant's text and its <|assistant_end|>), 0 on bos, prompts, images, specials.
        spans: the mask says which turn a supervised token is in instead of 1: STUDENT in the last assistant
        turn, TEACHER in the ones before it.

        conversation: a list of {"role", "content"} messages, or {"messages": [...]}. Roles alternate
        user/assistant; a leading system message is merged into the first user message. Each `<image>` in a
        user message becomes image_tokens[i] copies of <|image|> (one count per image, in order).
        max_tokens: truncate to this length; images are never cut (that is an error).
        """
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        messages = copy.deepcopy(messages)
        if messages and messages[0]["role"] == "system":
            assert len(messages) > 1 and messages[1]["role"] == "user", "a system message must precede a user message"
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        if not messages:
            raise ValueError("empty conversation")
        image_counts = list(image_tokens or [])
        last_answer = len(messages) - 1 - len(messages) % 2  # roles alternate from user: answers sit at odd indices

        ids, mask = [], []
        def add(token_ids, supervised):
            ids.extend(token_ids)
            mask.extend([supervised] * len(token_ids))

        add([self.bos_token_id], 0)
        for i, message in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if message["role"] != want:
                raise ValueError(f"message {i} has role {message['role']!r}, expected {want!r} (roles must alternate)")
            content = message["content"]
            if want == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string")
                add([self.encode_special("<|user_start|>")], 0)
                add(self.render_user_text(content, image_counts), 0)
                add([self.encode_special("<|user_end|>")], 0)
            else:
                learned = 1 if not spans else STUDENT if i == last_answer else TEACHER
                add([self.encode_special("<|assistant_start|>")], 0)
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
                for part in parts:
                    if part["type"] == "text":
                        add(self.encode_with_markup(part["text"]), learned)
                    elif part["type"] == "python":
                        add([self.encode_special("<|python_start|>")] + self.encode(part["text"])
                            + [self.encode_special("<|python_end|>")], learned)
                    elif part["type"] == "python_output":
                        # tool output is forced at inference time, so it is not learned
                        add([self.encode_special("<|output_start|>")] + self.encode(part["text"])
                            + [self.encode_special("<|output_end|>")], 0)
                    else:
                        raise ValueError(f"message {i}: unknown content part type {part['type']!r}")
                add([self.encode_special("<|assistant_end|>")], learned)
        if image_counts:
            raise ValueError(f"{len(image_counts)} image token count(s) given but no {IMAGE_PLACEHOLDER} left for them")

        if max_tokens is not None and len(ids) > max_tokens:
            image_id = self.encode_special(IMAGE_TOKEN)
            if image_id in ids[max_tokens:]:
                raise ValueError(f"conversation of {len(ids)} tokens cannot be cut to {max_tokens} without cutting an image")
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_user_text(self, text, image_counts):
        """User text with each <image> placeholder replaced by its count of <|image|> ids (consumes image_counts)."""
        ids = []
        pieces = text.split(IMAGE_PLACEHOLDER)
        for j, piece in enumerate(pieces):
            if j > 0:
                if not image_counts:
                    raise ValueError(f"more {IMAGE_PLACEHOLDER} placeholders than image token counts")
                ids.extend([self.encode_special(IMAGE_TOKEN)] * image_counts.pop(0))
            if piece:
                ids.extend(self.encode_with_markup(piece))
        return ids

    def render_for_completion(self, conversation, image_tokens=None):
        """The prompt ids for generation: the conversation without its final assistant reply, then <|assistant_start|>."""
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        messages = list(messages)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation(messages, image_tokens=image_tokens)
        return ids + [self.encode_special("<|assistant_start|>")]


def build_encoding(pattern, mergeable_ranks, special_names):
    """A tiktoken Encoding with the special tokens numbered right after the mergeable ranks."""
    offset = len(mergeable_ranks)
    special_tokens = {name: offset + i for i, name in enumerate(special_names)}
    return tiktoken.Encoding(name="nanovlm", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                             special_tokens=special_tokens)


class _EncodingState:
    """Stands in for tiktoken.Encoding while unpickling: it only records the state, it runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"tokenizer.pkl references {module}.{name}; only a tiktoken Encoding is allowed")


def load_nanochat_tokenizer(tokenizer_dir):
    """
    Load a nanochat tokenizer directory (tokenizer.pkl, a pickled tiktoken Encoding) and add our special tokens
    after its last id, so that a nanochat GPT plus resize_vocab(tokenizer.get_vocab_size()) becomes our model.
    Pickle files can carry code: only load one from a source you trust. We unpickle with an allow-list (the
    Encoding class only, whose state is read as plain data), which refuses anything else in the file.
    """
    path = os.path.join(tokenizer_dir, "tokenizer.pkl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"nanochat tokenizer not found: {path}")
    with open(path, "rb") as f:
        try:
            obj = _TokenizerUnpickler(f).load()
        except Exception as e:
            raise ValueError(f"{path}: not a readable nanochat tokenizer pickle ({e})") from e
    state = getattr(obj, "state", None)
    if not isinstance(state, dict) or "mergeable_ranks" not in state:
        raise ValueError(f"{path}: expected a pickled tiktoken Encoding with its ranks, got {type(obj).__name__}")
    special_tokens = dict(state["special_tokens"])
    missing = [name for name in NANOCHAT_SPECIAL_TOKENS if name not in special_tokens]
    if missing:
        raise ValueError(f"{path}: not a nanochat tokenizer, special tokens missing: {missing}")
    next_id = max(list(state["mergeable_ranks"].values()) + list(special_tokens.values())) + 1
    for name in SPECIAL_TOKENS:
        if name not in special_tokens:
            special_tokens[name] = next_id
            next_id += 1
    enc = tiktoken.Encoding(name="nanovlm", pat_str=state["pat_str"], mergeable_ranks=state["mergeable_ranks"],
                            special_tokens=special_tokens)
    return Tokenizer(enc)


def get_tokenizer(tokenizer_dir=None):
    """Our tokenizer from tokenizer_dir (default: <base dir>/tokenizer)."""
    if tokenizer_dir is None:
        tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    return Tokenizer.from_directory(tokenizer_dir)
