"""Shared fixtures: small random checkpoints written without transformers."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.hf import save_hf
from lmforge.model import Transformer

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
