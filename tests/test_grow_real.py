"""The real SmolLM2-135M (GGUF, hidden 576, 30 layers, GQA 9/3, tied head) grown in clone mode to 2x width,
1.5x width (576 -> 864) and 45 layers: outputs equal the source's within 1e-5 (max relative logit error,
float32) on English text. The 2x growth goes the way `lmforge grow` goes (streamed into an HF folder, read
back by lmforge) and that folder loads in transformers with lmforge's logits. Slow: one 93 MB download on
first use, then about a minute on 2 cores."""

from __future__ import annotations

import pytest
import torch

from lmforge.commands.grow import HELD_OUT_TEXT
from lmforge.data.tokenizer import Tokenizer
from lmforge.io.checkpoints import load, model_from_tensors
from lmforge.io.gguf import smollm2_gguf_path
from lmforge.io.hf_tensors import save_hf
from lmforge.surgery.grow import check, grow

pytestmark = pytest.mark.slow
MAX_REL_ERR = 1e-5


@pytest.fixture(scope="module")
def source():
    """(SmolLM2-135M in float32, input ids (1, T) of English text), loaded once for every case."""
    model = load(smollm2_gguf_path())
    ids = Tokenizer.from_files(model.tokenizer_files).encode(HELD_OUT_TEXT)
    assert len(ids) >= 100
    return model, torch.tensor([ids])


def _assert_exact(src, cfg_t, dst, ids) -> dict:
    r = check(src.config, src, cfg_t, dst, ids, dtype=torch.float32)
    print(f"\n{cfg_t.hidden_size} x {cfg_t.num_layers}: {r}")
    assert r["max_rel_logit_error"] <= MAX_REL_ERR, r
    assert abs(r["dst_loss"] - r["src_loss"]) <= 1e-4 and r["src_loss"] < 5  # a trained model on English text
    return r


@pytest.mark.parametrize(
    "kw, shape",
    [
        (dict(hidden=864), (864, 30, 9, 3, 2304)),  # 1 copy + 288 padded dims; heads stay (864 / 64 is no integer)
        (dict(layers=45), (576, 45, 9, 3, 1536)),
    ],
    ids=["1.5x_width", "45_layers"],
)
def test_grown_in_memory_is_exact(source, kw, shape):
    src, ids = source
    cfg_t, tensors = grow(src.config, src.state_dict(), mode="clone", **kw)
    got = (cfg_t.hidden_size, cfg_t.num_layers, cfg_t.num_heads, cfg_t.n_kv_heads, cfg_t.ffn_size)
    assert got == shape
    _assert_exact(src, cfg_t, model_from_tensors(cfg_t, tensors), ids)


def test_2x_width_streamed_to_hf_is_exact_and_loads_in_transformers(source, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src, ids = source
    cfg_t, tensors = grow(src.config, src.state_dict(), hidden=1152, mode="clone")
    save_hf(cfg_t, tensors, tmp_path / "grown", src.tokenizer_files)  # as `lmforge grow` writes it
    ours = load(tmp_path / "grown")
    assert (ours.config.hidden_size, ours.config.num_heads, ours.config.n_kv_heads) == (1152, 18, 6)
    assert ours.config.tie_embeddings  # kept tied: the final norm absorbs the copy count
    _assert_exact(src, ours.config, ours, ids)
    head = ids[:, :64]  # implementation parity: a shorter prefix of the same text is enough, and halves the time
    with torch.no_grad():
        want = ours(head)
    del ours  # 1.9 GB: not twice in memory
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "grown", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(head).logits
    rel = float((logits - want).abs().max() / want.abs().max())
    print(f"transformers vs lmforge on the grown model: max relative logit difference {rel:.2e}")
    assert rel <= MAX_REL_ERR
