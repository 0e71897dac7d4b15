import os
import pickle

import pydoc_data.topics
import pytest
import tiktoken

from nanovlm.tokenizer import (NANOCHAT_SPECIAL_TOKENS, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, build_encoding,
                               load_nanochat_tokenizer)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(iter(list(pydoc_data.topics.topics.values())), 1024)


def test_vocab_and_special_ids(tok):
    assert tok.get_vocab_size() == 1024
    # the specials are the last ids, in order: nanochat's nine, then <|image|>, then the grounding markup
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(1024 - len(SPECIAL_TOKENS), 1024))
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>")
    assert len(SPECIAL_TOKENS) == 15


@pytest.mark.parametrize("text", [
    "hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n", "digits 1234567 3.14159 -42",
    "naïve café, Zürich — “quotes”", "日本語のテキスト", "emoji 🙂👍🏽 mixed", "", "\x00\x7f control",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_digits_split_in_pairs(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234567")]
    assert all(len(p) <= 2 for p in pieces)


def test_special_strings_in_text_are_plain_text(tok):
    specials = set(tok.encode_special(s) for s in SPECIAL_TOKENS)
    text = "user wrote <|image|> and <|bos|> and <|assistant_end|> and <|ref|>"
    ids = tok.encode(text)
    assert not specials & set(ids)
    assert tok.decode(ids) == text
    # inside a conversation too: only the markup is recognised, never the structural tokens
    ids, _ = tok.render_conversation([{"role": "user", "content": "<|image|><|assistant_end|>"},
                                      {"role": "assistant", "content": "<|bos|>"}])
    assert ids.count(tok.encode_special("<|image|>")) == 0
    assert ids.count(tok.encode_special("<|bos|>")) == 1  # only the one the renderer puts first
    assert ids.count(tok.encode_special("<|assistant_end|>")) == 1


def test_prepend_append_and_batch(tok):
    bos = tok.get_bos_token_id()
    assert tok.encode("hi", prepend="<|bos|>")[0] == bos
    assert tok.encode("hi", append=bos)[-1] == bos
    assert tok.encode(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_render_mask_two_turns_with_image(tok):
    conversation = [
        {"role": "user", "content": "<image>\n<|grounding|>OCR this image."},
        {"role": "assistant", "content": "<|ref|>TOTAL<|/ref|><|det|>[[10, 20, 30, 40]]<|/det|>"},
        {"role": "user", "content": "And the date?"},
        {"role": "assistant", "content": "2024-01-02"},
    ]
    ids, mask = tok.render_conversation(conversation, image_tokens=[5])
    special = {s: tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert len(ids) == len(mask)
    assert ids[0] == special["<|bos|>"] and ids[1] == special["<|user_start|>"]
    assert ids[2:7] == [special["<|image|>"]] * 5 and mask[2:7] == [0] * 5
    assert special["<|grounding|>"] in ids and special["<|ref|>"] in ids and special["<|det|>"] in ids
    # supervised tokens are exactly the two answers and their end tokens
    supervised = [i for i, m in zip(ids, mask) if m]
    answer1 = tok.encode_with_markup(conversation[1]["content"])
    answer2 = tok.encode("2024-01-02")
    assert supervised == answer1 + [special["<|assistant_end|>"]] + answer2 + [special["<|assistant_end|>"]]
    assert tok.decode(answer1) == conversation[1]["content"]
    # nothing structural is ever supervised except the end token
    for i, m in zip(ids, mask):
        if m and i in special.values():
            assert i in (special["<|assistant_end|>"], special["<|ref|>"], special["<|/ref|>"],
                         special["<|det|>"], special["<|/det|>"])


def test_render_errors(tok):
    user = {"role": "user", "content": "<image> and <image>"}
    with pytest.raises(ValueError, match="placeholders"):
        tok.render_conversation([user], image_tokens=[3])
    with pytest.raises(ValueError, match="no <image> left"):
        tok.render_conversation([{"role": "user", "content": "x"}], image_tokens=[3])
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation([{"role": "assistant", "content": "x"}])
    ids, mask = tok.render_conversation([{"role": "user", "content": "<image>hi"},
                                         {"role": "assistant", "content": "a long answer " * 20}],
                                        image_tokens=[4], max_tokens=20)
    assert len(ids) == 20 == len(mask)
    with pytest.raises(ValueError, match="cutting an image"):
        tok.render_conversation([user], image_tokens=[8, 8], max_tokens=10)


def test_render_for_completion(tok):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>Read it."},
                    {"role": "assistant", "content": "ignored"}]
    ids = tok.render_for_completion(conversation, image_tokens=[2])
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    assert "ignored" not in tok.decode(ids) and "Be brief.\n\n" in tok.decode(ids)


def test_save_and_load_without_pickle(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.bpe", "tokenizer.json"]
    again = Tokenizer.from_directory(tmp_path)
    text = "Receipt #12: 3 x apples @ 1.25 = 3.75 🙂"
    assert again.encode(text) == tok.encode(text) and again.get_vocab_size() == tok.get_vocab_size()
    assert again.encode_special("<|det|>") == tok.encode_special("<|det|>")


def write_nanochat_tokenizer(directory, tok):
    """A tokenizer.pkl the way nanochat writes it: a pickled tiktoken Encoding with its nine specials."""
    enc = build_encoding(SPLIT_PATTERN, tok.enc._mergeable_ranks, NANOCHAT_SPECIAL_TOKENS)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.pkl"), "wb") as f:
        pickle.dump(enc, f)
    return enc


def test_load_nanochat_tokenizer_adds_specials_after_last_id(tok, tmp_path):
    enc = write_nanochat_tokenizer(tmp_path, tok)
    ours = load_nanochat_tokenizer(tmp_path)
    n = enc.n_vocab
    assert ours.get_vocab_size() == n + 6
    for name in NANOCHAT_SPECIAL_TOKENS:  # nanochat's ids are unchanged
        assert ours.encode_special(name) == enc.encode_single_token(name)
    assert [ours.encode_special(s) for s in SPECIAL_TOKENS[9:]] == list(range(n, n + 6))
    text = "the same ids as nanochat 123"
    assert ours.encode(text) == enc.encode_ordinary(text)


def test_nanochat_tokenizer_pickle_with_other_objects_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(ValueError, match="only a tiktoken Encoding is allowed"):
        load_nanochat_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_nanochat_tokenizer(tmp_path / "nowhere")
