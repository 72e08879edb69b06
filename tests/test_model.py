"""Model invariants that parity with transformers does not cover on its own."""

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from tests.families import BERT_ARCH

LLAMA = ModelConfig(vocab_size=97, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, ffn_size=80)
BERT = ModelConfig(**BERT_ARCH, vocab_size=97, hidden_size=48, num_layers=2, num_heads=4, ffn_size=80, max_seq_len=64)


def model(cfg):
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights()
    return m.eval()


def test_causal_model_ignores_the_future():
    m, x = model(LLAMA), torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 8:] = torch.randint(0, 97, (2, 4))
    torch.testing.assert_close(m(x)[:, :8], m(y)[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(m(x)[:, 8:], m(y)[:, 8:])


def test_bidirectional_model_sees_the_future():
    m, x = model(BERT), torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 97
    assert not torch.allclose(m(x)[:, 0], m(y)[:, 0])


def test_sliding_window_limits_attention():
    cfg = LLAMA.replace(sliding_window=4, num_layers=1)
    m, x = model(cfg), torch.randint(0, 97, (1, 10))
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % 97  # token 0 is outside the window of positions >= 4 (one layer)
    torch.testing.assert_close(m(x)[:, 4:], m(y)[:, 4:], rtol=0, atol=1e-6)
    assert not torch.allclose(m(x)[:, 3], m(y)[:, 3])


def test_padding_mask_makes_padding_irrelevant():
    m = model(BERT)
    x = torch.randint(0, 97, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[:, 7:] = 0
    y = x.clone()
    y[:, 7:] = 0
    torch.testing.assert_close(m(x, attention_mask=mask)[:, :7], m(y, attention_mask=mask)[:, :7], rtol=0, atol=1e-5)


def test_states_have_one_entry_per_layer():
    m, x = model(LLAMA), torch.randint(0, 97, (2, 5))
    logits, states = m(x, return_states=True)
    assert len(states["hidden"]) == LLAMA.num_layers + 1 and len(states["attn"]) == LLAMA.num_layers
    assert states["attn"][0].shape == (2, 5, 48)
    torch.testing.assert_close(logits, m(x))


def test_tied_embeddings_share_storage_and_count_once():
    tied = model(LLAMA.replace(tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed.tok.weight
    assert model(LLAMA).num_params() - tied.num_params() == 97 * 48
