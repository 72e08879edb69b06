"""16-bit storage: `exactness(..., dtype)` says "exact" exactly where a bfloat16 growth measures exact (<= 1e-5)."""

import pytest
import torch
from test_grow import FAMILIES, check, exactness, grow, ids, tiny

from lmforge.model.transformer import Transformer

CASES = {
    "hidden_x2": dict(hidden=2), "hidden_x4": dict(hidden=4), "hidden_x3": dict(hidden=3),
    "hidden_x1.5": dict(hidden=1.5), "zero_x2": dict(hidden=2, mode="zero"), "zero_x4": dict(hidden=4, mode="zero"),
    "ffn_x1.5": dict(ffn=1.5), "ffn_x3": dict(ffn=3), "layers": dict(layers=5),
    "noise_x2": dict(hidden=2, noise_snr_db=10.0),
}  # fmt: skip


@pytest.mark.parametrize("family", ["llama_gqa_tied", "qwen2_gqa_untied", "gpt2_tied"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16])  # float16 rounds 8x finer: its inexact cases reach ~6e-6
def test_16_bit_storage_is_exact_where_exactness_says(family, case, dtype):
    cfg = FAMILIES[family]
    kw = dict(CASES[case])
    for key, size in (("hidden", cfg.hidden_size), ("ffn", cfg.ffn_size)):
        if key in kw:
            kw[key] = int(kw[key] * size)
    src = tiny(cfg).to(dtype)
    cfg_t, tensors = grow(cfg, src.state_dict(), **kw)
    dst = Transformer(cfg_t)
    dst.load_state_dict({k: v.float() for k, v in tensors}, strict=True)
    # float64 compute: only the storage rounding of the grown tensors shows
    err = check(cfg, src.double(), cfg_t, dst.double().eval(), ids(cfg), dtype=torch.float64)["max_rel_logit_error"]
    noise = "cancel" if kw.get("noise_snr_db") is not None else None
    what = exactness(cfg, cfg_t, kw.get("mode", "clone"), "interleave", noise, dtype)
    assert exactness(cfg, cfg_t, kw.get("mode", "clone"), "interleave", noise, torch.float32) == "exact"
    if what == "exact":
        assert err <= 1e-5, (what, err)
    else:
        assert "rounding" in what and err > 1e-5, (what, err)
