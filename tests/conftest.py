"""Shared fixtures: small random checkpoints written without transformers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmforge.data.tokens import build_dataset
from lmforge.io.hf_tensors import save_hf
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

TINY_LLAMA = ModelConfig(
    family="llama",
    vocab_size=128,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_size=64,
    max_seq_len=64,
)


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A 2-layer random Llama (GQA) saved as an HF folder (config.json + model.safetensors)."""
    torch.manual_seed(0)
    model = Transformer(TINY_LLAMA)
    model.init_weights()
    out = tmp_path / "tiny-hf"
    save_hf(TINY_LLAMA, model.state_dict(), out)
    return out


WORDS = ["the", "a", "king", "queen", "said", "and", "of", "to", "in", "his", "her", "land", "sea", "ship"]
WORDS += ["war", "peace", "night", "day", "old", "new", "man", "woman"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small corpus of random sentences, tokenized with a 300-token BPE."""
    src = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for d in range(24):
        text = "\n".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 15))) + "." for _ in range(40))
        (src / f"doc{d:02d}.txt").write_text(text)
    out = tmp_path_factory.mktemp("data") / "tiny"
    build_dataset(out, starter=False, inputs=[str(src)], tokenizer="bpe:300", val_fraction=0.1, seed=0)
    return out
