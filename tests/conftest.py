"""Shared test fixtures: a small trained tokenizer, a tiny random VLM, a tiny image dataset on disk."""

import json
import os
import random

import pydoc_data.topics
import pytest
import torch
from PIL import Image, ImageDraw

from nanovlm.deepencoder import DeepEncoderConfig
from nanovlm.gpt import GPTConfig
from nanovlm.tokenizer import Tokenizer
from nanovlm.vlm import build_vlm

torch.set_num_threads(min(2, os.cpu_count() or 1))

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")  # bitsandbytes / peft references


@pytest.fixture
def one_thread():
    """Small matmuls on one thread: on a busy 2-core machine two threads wait on each other up to 100x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer.train_from_iterator(iter(list(pydoc_data.topics.topics.values())), 600)


def tiny_vlm(tokenizer, seed=0, n_layer=2, sequence_len=256):
    torch.manual_seed(seed)
    gpt_config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=n_layer,
                           n_head=2, n_kv_head=1, n_embd=32)
    encoder_config = DeepEncoderConfig.tiny(out_dim=32)
    return build_vlm(gpt_config, encoder_config, tokenizer.encode_special("<|image|>"))


@pytest.fixture
def vlm(tokenizer):
    model = tiny_vlm(tokenizer)
    with torch.no_grad():  # the GPT's init zeroes its output layers: give them values so outputs vary
        for name, p in model.gpt.named_parameters():
            if name.endswith("c_proj.weight") or name.startswith("lm_head"):
                p.normal_(0, 0.05)
    return model.eval()


def write_dataset(directory, answers, size=(160, 96), prompt="<image>\nOCR this image."):
    """A dataset JSON with one rendered image per answer; returns the JSON path."""
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    records = []
    for i, answer in enumerate(answers):
        image = Image.new("RGB", size, (255, 255, 255))
        ImageDraw.Draw(image).text((6 + 9 * i, 30 + 5 * i), answer, fill=(0, 0, 0))
        image.save(os.path.join(directory, "images", f"{i}.png"))
        records.append({"id": f"r{i}", "image": f"images/{i}.png", "prompt": prompt, "answer": answer,
                        "source": "test", "type": "doc"})
    path = os.path.join(directory, "dataset.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def write_pdf(path, content):
    """A one-page letter-size PDF of the content stream (PDF operators), with 12 pt Courier as /F1."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               "/Resources << /Font << /F1 5 0 R >> >> >>",
               f"<< /Length {len(content)} >>\nstream\n{content}endstream",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Courier >>"]
    data, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(data))
        data += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(data)
    data += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    data += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    data += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def made_up_words(count=400, seed=0):
    """Sorted words of four consonant-vowel pairs: a stand-in word list no real word shows up in by chance."""
    rng = random.Random(seed)
    return sorted({"".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(4))
                   for _ in range(count)})
