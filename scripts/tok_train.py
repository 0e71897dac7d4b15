"""
Train the BPE tokenizer (rustbpe), save it as plain files in <base dir>/tokenizer.

    python -m scripts.tok_train                                  # offline default corpus
    python -m scripts.tok_train --vocab_size=32768 --data=corpus.txt,data/synth_train/dataset.json

The default corpus needs no download: the Python documentation that ships with Python (pydoc_data.topics) plus
the prompts and answers of the committed tier-1 dataset. --data takes comma-separated paths: .txt files (one
document per blank-line separated paragraph block), dataset .json files (prompts and answers) and .jsonl files
of conversations; the word `default` stands for the built-in corpus (--data=default,my_set/dataset.json).
"""

import json
import os
import time

from configurator import configure
from nanovlm.common import get_base_dir
from nanovlm.dataloader import record_turns
from nanovlm.tokenizer import IMAGE_PLACEHOLDER, Tokenizer

vocab_size = 4096  # total, special tokens included; nanochat uses 65536 for a d20
data = ""  # comma-separated corpus files; "default" (or empty) = the built-in offline corpus
max_chars = 2_000_000_000  # stop reading the corpus after this many characters
doc_cap = 10_000  # characters kept per document
out_dir = ""  # default: <base dir>/tokenizer
user_config = configure(globals())

TIER1 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tier1", "dataset.json")


def dataset_texts(path):
    with open(path) as f:
        records = json.load(f)
    for record in records:
        for message in record_turns(record)[0]:  # a conversation record's every turn
            yield message["content"].replace(IMAGE_PLACEHOLDER, "")


def conversation_texts(path):
    with open(path) as f:
        for line in f:
            if line.strip():
                conversation = json.loads(line)
                messages = conversation["messages"] if isinstance(conversation, dict) else conversation
                for message in messages:
                    if isinstance(message["content"], str):
                        yield message["content"]


def text_file_docs(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for doc in f.read().split("\n\n"):
            if doc.strip():
                yield doc


def default_corpus():
    import pydoc_data.topics  # ships with CPython: a few hundred KB of English prose and code
    yield from pydoc_data.topics.topics.values()
    if os.path.exists(TIER1):
        yield from dataset_texts(TIER1)


def corpus(paths):
    for path in paths or ["default"]:
        if path == "default":
            yield from default_corpus()
        elif not os.path.exists(path):
            raise SystemExit(f"--data: file not found: {path}")
        elif path.endswith(".jsonl"):
            yield from conversation_texts(path)
        elif path.endswith(".json"):
            yield from dataset_texts(path)
        else:
            yield from text_file_docs(path)


def capped(texts):
    seen = 0
    for text in texts:
        text = text[:doc_cap]
        seen += len(text)
        yield text
        if seen >= max_chars:
            return


t0 = time.time()
tokenizer = Tokenizer.train_from_iterator(capped(corpus([p for p in data.split(",") if p])), vocab_size)
dt = time.time() - t0
tokenizer_dir = out_dir or os.path.join(get_base_dir(), "tokenizer")
tokenizer.save(tokenizer_dir)

# sanity: an exact round trip on a mix of scripts, digits and whitespace
sample = "Total: $1,234.56\n\tTéléphone 07 12 34 — 東京 🙂  <|image|> done"
assert tokenizer.decode(tokenizer.encode(sample)) == sample, "tokenizer round trip failed"
ids = tokenizer.encode(sample)
print(f"trained vocab {tokenizer.get_vocab_size():,} in {dt:.2f}s | sample: {len(sample)} chars -> {len(ids)} tokens "
      f"({len(sample.encode()) / len(ids):.2f} bytes/token) | saved to {tokenizer_dir}")
