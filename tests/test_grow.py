"""Growth keeps the model's function: every family x mode x kind of growth on tiny random models.

The source models have random norm gains and biases (not the 1 / 0 of a fresh init), so a wrong gain, eps or
bias scaling shows up. Exact growths must match to 1e-5 (relative max logit error, float32); the approximate
ones (post-norm LayerNorm with padded residual dims, G_stack, plain noise) are measured and bounded instead.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import UserError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.surgery.grow import check, exactness, grow, target_config
from lmforge.surgery.grow_depth import layout
from lmforge.surgery.grow_width import head_axes
from tests.families import BERT_ARCH, GPT2_ARCH

V = 97
LLAMA = ModelConfig(
    family="llama",
    vocab_size=V,
    hidden_size=48,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    ffn_size=64,
    max_seq_len=64,
    norm_eps=1e-5,
    qkv_bias=True,
    tie_embeddings=True,
)
GPT2 = ModelConfig(**GPT2_ARCH, vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_seq_len=64)
BERT = ModelConfig(**BERT_ARCH, vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_seq_len=64)
FAMILIES = {
    "llama_gqa_tied": LLAMA,
    "qwen2_gqa_untied": LLAMA.replace(family="qwen2", tie_embeddings=False),
    "gpt2_tied": GPT2,
    "bert_headless": BERT,
    "bert_classifier": BERT.replace(head="classifier", num_labels=3, pooler=True, classifier_bias=True),
}


def _growths(cfg: ModelConfig) -> dict[str, dict]:
    """Growth cases for a family; GPT-2 and BERT tie heads to hidden / head_dim, so heads grow with hidden."""
    d, h, kv = cfg.hidden_size, cfg.num_heads, cfg.n_kv_heads
    grouped = cfg.family not in ("gpt2", "bert")
    cases = {
        "hidden_x2": dict(hidden=2 * d),
        "hidden_x1.5": dict(hidden=3 * d // 2),
        "ffn_x2": dict(ffn=2 * cfg.ffn_size),
        "ffn_x1.3": dict(ffn=cfg.ffn_size * 13 // 10),
        "layers_interleave": dict(layers=5),
        "layers_top": dict(layers=3, depth="top"),
        "layers_bottom": dict(layers=4, depth="bottom"),
        "combined": dict(hidden=2 * d, ffn=3 * cfg.ffn_size, layers=3),
        "combined_x1.5": dict(hidden=3 * d // 2, ffn=2 * cfg.ffn_size, layers=4),
    }
    if grouped:  # heads without hidden (explicit head_dim), KV heads alone, query heads alone
        cases |= {
            "heads_x2": dict(heads=2 * h, kv_heads=2 * kv),
            "kv_only": dict(heads=h, kv_heads=h),
            "queries_only": dict(heads=2 * h, kv_heads=kv),
            "heads_x1.5": dict(heads=h + h // 2, kv_heads=kv + kv // 2),
        }
    return cases


def tiny(cfg: ModelConfig, dtype=torch.float32, seed=0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(cfg)
    m.init_weights()
    with torch.no_grad():  # non-trivial norms: a wrong gain / bias / eps scaling must show
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return m.to(dtype).eval()


def ids(cfg, B=2, T=16):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))


def grown(cfg, dtype=torch.float32, **kw):
    """(source model, target config, target model loaded strictly, check dict)."""
    src = tiny(cfg, dtype)
    cfg_t, tensors = grow(cfg, src.state_dict(), **kw)
    dst = Transformer(cfg_t).to(dtype)
    dst.load_state_dict(dict(tensors), strict=True)
    return src, cfg_t, dst.eval(), check(cfg, src, cfg_t, dst, ids(cfg), dtype=dtype)


CASES = [(f, mode, c) for f, cfg in FAMILIES.items() for mode in ("clone", "zero") for c in _growths(cfg)]


@pytest.mark.parametrize("family,mode,case", CASES, ids=["-".join(c) for c in CASES])
def test_growth_preserves_outputs(family, mode, case):
    cfg = FAMILIES[family]
    kw = _growths(cfg)[case]
    _, cfg_t, _, r = grown(cfg, mode=mode, **kw)
    what = exactness(cfg, cfg_t, mode, kw.get("depth", "interleave"), None)
    if what.startswith("approximate"):
        # Post-norm LayerNorm with padded residual dims: the pad should hold the mean of a LayerNorm's outputs,
        # which depends on the input unless gamma is uniform (see grow.py). Measured here: 1e-3 .. 4e-2.
        assert cfg.norm_position == "post" and kw.get("hidden", cfg.hidden_size) > cfg.hidden_size
        assert 1e-5 < r["max_rel_logit_error"] < 0.1, r
    else:
        assert r["max_rel_logit_error"] <= 1e-5, (what, r)
    if cfg.head == "lm":
        assert r["dst_loss"] == pytest.approx(r["src_loss"], abs=1e-4)
    assert r["dst_params"] > r["src_params"]


@pytest.mark.parametrize("family", ["gpt2_tied", "bert_headless", "llama_gqa_tied"])
def test_exact_growth_is_exact_in_float64(family):
    """In float64 the exact constructions are exact to rounding. (lmforge's RMSNorm takes its statistics in
    float32, as HF does, so RMSNorm models with padded dims stop at ~1e-7.)"""
    cfg = FAMILIES[family]
    tol = 1e-12 if cfg.norm == "layernorm" else 1e-6
    for kw in ({"hidden": 2 * cfg.hidden_size, "layers": 3}, {"hidden": 3 * cfg.hidden_size, "ffn": 100}):
        _, _, _, r = grown(cfg, torch.float64, **kw)
        assert r["max_rel_logit_error"] < tol, (kw, r)
    if cfg.norm == "layernorm" and cfg.norm_position == "pre":  # zero mode / non-integer: average expansion
        for kw in ({"hidden": 2 * cfg.hidden_size, "mode": "zero"}, {"hidden": 3 * cfg.hidden_size // 2}):
            assert grown(cfg, torch.float64, **kw)[3]["max_rel_logit_error"] < 1e-12, kw


def test_non_integer_clone_is_copies_plus_padding():
    """576 -> 864 style: one full copy plus padding (0 under RMSNorm) with gains * sqrt(r) and eps * r."""
    cfg = LLAMA.replace(hidden_size=48, num_heads=6)
    src, cfg_t, dst, r = grown(cfg, hidden=72)
    assert r["max_rel_logit_error"] <= 1e-5
    assert cfg_t.norm_eps == pytest.approx(cfg.norm_eps * 48 / 72)
    assert cfg_t.num_heads == 9 and cfg_t.head_dim is None  # 72 / head_dim 8
    emb = dst.embed.tok.weight
    torch.testing.assert_close(emb[:, :48], src.embed.tok.weight, rtol=0, atol=0)
    assert emb[:, 48:].abs().max() == 0
    g = dst.layers[0].attn_norm.weight
    torch.testing.assert_close(g[:48], src.layers[0].attn_norm.weight * (48 / 72) ** 0.5)


def test_layernorm_zero_mode_uses_average_expansion():
    """GPT-2 zero padding: new residual dims hold the mean of the old ones, their LayerNorm bias is 0."""
    src, cfg_t, dst, r = grown(GPT2, torch.float64, hidden=48, mode="zero")
    assert r["max_rel_logit_error"] < 1e-12
    emb = dst.embed.tok.weight
    torch.testing.assert_close(emb[:, 32:], src.embed.tok.weight.mean(1, keepdim=True).expand(-1, 16))
    assert dst.layers[0].attn_norm.bias[32:].abs().max() == 0
    assert cfg_t.norm_eps == pytest.approx(GPT2.norm_eps * 32 / 48)
    # plain zero padding (the bug this avoids) is far off: zero the new embedding dims and measure
    sd = {k: v.clone() for k, v in dst.state_dict().items()}
    for k in ("embed.tok.weight", "embed.pos.weight"):
        sd[k][:, 32:] = 0
    for k in sd:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k][32:] = 0
        if k.endswith(("o_proj.bias", "down_proj.bias")):
            sd[k][32:] = 0
    bad = Transformer(cfg_t).double()
    bad.load_state_dict(sd)
    assert check(GPT2, src, cfg_t, bad, ids(GPT2))["max_rel_logit_error"] > 1e-3  # ~7e-3 here


def test_gqa_order_is_kept_and_a_wrong_order_is_caught():
    """SmolLM2's 9 heads / 3 KV heads doubled: query heads and KV heads in the same grouped order. Swapping two
    KV heads of the grown model (the kind of mistake HyperCloning shipped) breaks it badly."""
    cfg = LLAMA.replace(hidden_size=72, num_heads=9, num_kv_heads=3)
    src, cfg_t, dst, r = grown(cfg, hidden=144)
    assert (cfg_t.num_heads, cfg_t.n_kv_heads) == (18, 6) and r["max_rel_logit_error"] <= 1e-5
    q, kv = head_axes(9, 3, 18, 6, "clone")
    assert q.src.tolist() == list(range(9)) * 2 and kv.src.tolist() == [0, 1, 2] * 2
    sd = dst.state_dict()
    d = cfg.dim_head
    for name in (
        "layers.0.attn.k_proj.weight",
        "layers.0.attn.v_proj.weight",
        "layers.0.attn.k_proj.bias",
        "layers.0.attn.v_proj.bias",
    ):
        t = sd[name].clone()
        sd[name][0:d], sd[name][d : 2 * d] = t[d : 2 * d], t[0:d]  # KV heads 0 and 1 swapped
    wrong = Transformer(cfg_t)
    wrong.load_state_dict(sd)
    assert check(cfg, src, cfg_t, wrong, ids(cfg), dtype=torch.float32)["max_rel_logit_error"] > 1e-2


def test_head_layouts_cover_every_source_head():
    q, kv = head_axes(9, 3, 12, 4, "clone")  # KV heads x4/3: KV head 0 twice, its queries twice
    assert kv.src.tolist() == [0, 1, 2, 0] and q.src.tolist() == list(range(9)) + [0, 1, 2]
    q, kv = head_axes(6, 2, 6, 6, "clone")  # GQA -> MHA: each KV head copied once per query head
    assert kv.src.tolist() == [0, 1, 0, 1, 0, 1] and q.src.tolist() == [0, 3, 1, 4, 2, 5]
    q, kv = head_axes(6, 2, 12, 4, "zero")  # zero mode: new KV heads and their queries are new
    assert kv.src.tolist() == [0, 1, -1, -1] and q.src.tolist() == [0, 1, 2, 3, 4, 5] + [-1] * 6
    with pytest.raises(UserError, match="query slots"):
        head_axes(9, 3, 10, 5, "clone")


@pytest.mark.parametrize("snr_db", [10.0, 0.0])
def test_cancel_noise_keeps_outputs_and_breaks_symmetry(snr_db):
    src, cfg_t, dst, r = grown(LLAMA, hidden=96, ffn=128, heads=12, kv_heads=4, noise_snr_db=snr_db)
    assert r["max_rel_logit_error"] <= 1e-5
    sd, d, f = dst.state_dict(), LLAMA.hidden_size, LLAMA.ffn_size
    q, down, o = (sd[f"layers.0.{n}.weight"] for n in ("attn.q_proj", "mlp.down_proj", "attn.o_proj"))
    hd, h = LLAMA.dim_head, LLAMA.num_heads
    for a, b in ((q[:, :d], q[:, d:]), (down[:, :f], down[:, f:]), (o[:, : h * hd], o[:, h * hd :])):
        assert (a - b).abs().max() > 0.1 * a.abs().max()  # the copies differ ...
    # ... and sum to what one copy of the source weight read (2 copies, each divided by 2)
    torch.testing.assert_close(
        q[:, :d] + q[:, d:], src.state_dict()["layers.0.attn.q_proj.weight"].repeat(2, 1), rtol=0, atol=1e-6
    )


def test_cancel_noise_with_uneven_copies():
    """Copy counts that differ per entry (FFN x1.3, heads 6/2 -> 9/3) take the general zero-sum path."""
    _, _, dst, r = grown(LLAMA, ffn=83, heads=9, kv_heads=3, noise_snr_db=0.0)
    assert r["max_rel_logit_error"] <= 1e-5
    down = dst.layers[0].mlp.down_proj.weight
    assert (down[:, :19] - down[:, 64:]).abs().max() > 0.1 * down.abs().max()


def test_plain_noise_changes_outputs():
    _, _, _, r = grown(LLAMA, hidden=96, noise_snr_db=10.0, noise="plain")
    assert r["max_rel_logit_error"] > 1e-3  # measured ~5e-2 at 10 dB


@pytest.mark.parametrize("snr_db", [None, 10.0])
def test_copies_diverge_in_training_only_with_noise(snr_db):
    """Without noise, duplicated residual dims get identical gradients and stay copies forever."""
    cfg = LLAMA.replace(tie_embeddings=False)
    _, _, dst, _ = grown(cfg, hidden=96, noise_snr_db=snr_db)
    dst.train()
    opt = torch.optim.SGD(dst.parameters(), lr=0.5)
    x = ids(cfg, 4, 16)
    for _ in range(2):
        logits = dst(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    o = dst.layers[0].attn.o_proj.weight  # rows write residual dim j and its copy j + d
    gap = (o[:48] - o[48:]).abs().max().item()
    assert (gap > 1e-3) if snr_db is not None else (gap < 1e-6)


def test_tied_head_stays_tied_and_exact():
    """Clone width with a tied head: the final norm absorbs the copy count (gain and bias / k)."""
    src, cfg_t, dst, r = grown(GPT2, hidden=64)
    assert cfg_t.tie_embeddings and dst.lm_head.weight is dst.embed.tok.weight
    torch.testing.assert_close(dst.norm.weight[:32], src.norm.weight / 2)
    torch.testing.assert_close(dst.norm.bias[:32], src.norm.bias / 2)
    assert r["max_rel_logit_error"] <= 1e-5


def test_tied_head_without_final_norm_is_untied():
    cfg = LLAMA.replace(final_norm=False)
    src, cfg_t, dst, r = grown(cfg, hidden=96)
    assert not cfg_t.tie_embeddings and r["max_rel_logit_error"] <= 1e-5
    torch.testing.assert_close(dst.lm_head.weight, src.embed.tok.weight.repeat(1, 2) / 2)


def test_depth_layouts():
    assert [s.src for s in layout(30, 45, "interleave") if s.new] == list(range(1, 30, 2))  # after every 2nd
    slots = layout(4, 6, "top")
    assert [(s.src, s.new) for s in slots[4:]] == [(3, True), (3, True)]
    assert [(s.src, s.new) for s in layout(2, 4, "bottom")] == [(0, True), (0, True), (0, False), (1, False)]
    assert [(s.src, s.new) for s in layout(3, 7, "stack")] == [(j % 3, False) for j in range(7)]


def test_new_pre_norm_blocks_are_identities_copied_from_a_neighbour():
    src, cfg_t, dst, _ = grown(GPT2, layers=3, depth="top")
    new = dst.layers[2]
    assert new.attn.o_proj.weight.abs().max() == 0 and new.mlp.down_proj.bias.abs().max() == 0
    torch.testing.assert_close(new.attn.q_proj.weight, src.layers[1].attn.q_proj.weight)


def test_stack_is_not_function_preserving():
    cfg_t = target_config(LLAMA, layers=4)
    assert exactness(LLAMA, cfg_t, "clone", "stack", None).startswith("not function preserving")
    assert grown(LLAMA, layers=4, depth="stack")[3]["max_rel_logit_error"] > 1e-3


def test_post_norm_identity_blocks_move_the_layernorm_affine():
    """BERT: the previous LayerNorm becomes plain normalisation, the new block's last one takes its affine;
    exact up to ~eps/variance: with BERT's eps 1e-12 at rounding, with eps 1e-5 still ~1e-6."""
    src, cfg_t, dst, r = grown(BERT, torch.float64, layers=3, depth="top")
    assert r["max_rel_logit_error"] < 1e-9
    torch.testing.assert_close(dst.layers[2].mlp_norm.weight, src.layers[1].mlp_norm.weight)
    assert torch.all(dst.layers[1].mlp_norm.weight == 1) and torch.all(dst.layers[1].mlp_norm.bias == 0)
    loose = BERT.replace(norm_eps=1e-5)
    assert grown(loose, torch.float64, layers=4)[3]["max_rel_logit_error"] < 1e-4
    with pytest.raises(UserError, match="embedding LayerNorm"):
        grow(BERT.replace(embed_norm=False), {}, layers=3, depth="bottom")


def test_streams_one_source_tensor_at_a_time():
    """Each source tensor is read once, from a lazy mapping or a plain iterator; nothing is read before
    the output is consumed, and the output follows the source's order."""
    src = tiny(LLAMA).state_dict()

    class Lazy(dict):
        reads: list[str] = []

        def __getitem__(self, k):
            self.reads.append(k)
            return super().__getitem__(k)

    lazy = Lazy(src)
    _, out = grow(LLAMA, lazy, hidden=96, layers=3)
    assert lazy.reads == []
    names = [n for n, _ in out]
    assert sorted(lazy.reads) == sorted(src) and len(lazy.reads) == len(src)
    _, out2 = grow(LLAMA, iter(src.items()), hidden=96, layers=3)
    assert [n for n, _ in out2] == names
    _, out3 = grow(LLAMA, src, layers=4)  # depth only: new blocks must not alias their neighbour (or the source)
    kept = [t for _, t in out3] + [t for k, t in src.items() if k != "lm_head.weight"]  # (tied: same storage)
    ptrs = [t.untyped_storage().data_ptr() for t in kept]
    assert len(set(ptrs)) == len(ptrs)
    assert names.index("embed.tok.weight") < names.index("layers.0.attn.q_proj.weight")


def test_bad_targets_are_user_errors():
    sd = tiny(LLAMA).state_dict()
    bad = [
        (dict(hidden=32), "smaller than the source"),
        (dict(layers=1), "smaller than the source"),
        (dict(heads=8, kv_heads=3), "not a multiple"),
        (dict(heads=7), "give --kv-heads"),
        (dict(mode="grow"), "mode"),
        (dict(depth="middle", layers=3), "depth"),
        (dict(hidden=96, noise="loud", noise_snr_db=1), "noise kind"),
        (dict(hidden=96, mode="zero", noise_snr_db=10), "clone mode"),
        (dict(layers=3, noise_snr_db=10), "duplicated inputs"),
    ]
    for kw, msg in bad:
        with pytest.raises(UserError, match=msg):
            grow(LLAMA, sd, **kw)
    with pytest.raises(UserError, match="head_dim"):
        grow(GPT2, tiny(GPT2).state_dict(), hidden=48, heads=4)
    with pytest.raises(UserError, match="missing tensor"):
        grow(LLAMA, {k: v for k, v in sd.items() if "q_proj" not in k}, hidden=96)
    with pytest.raises(UserError, match="shape"):
        list(grow(LLAMA, {**sd, "norm.weight": torch.ones(5)}, hidden=96)[1])
    with pytest.raises(UserError, match="missing tensor"):  # an iterator is checked as it ends
        list(grow(LLAMA, ((k, v) for k, v in sd.items() if k != "norm.weight"), hidden=96)[1])


# ---- the command ----------------------------------------------------------------------------------------------------
def _cli(argv):
    from lmforge.cli import _Parser
    from lmforge.commands import grow as grow_cli

    parser = _Parser(prog="lmforge")
    grow_cli.register(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    args = parser.parse_args(["grow", *argv])
    return args.func(args)


def test_cli_grows_an_hf_checkpoint_and_checks_it(tiny_hf_dir, tmp_path, capsys):
    from lmforge.io.checkpoints import load

    out = tmp_path / "grown"
    assert (
        _cli(
            [str(tiny_hf_dir), "--out", str(out), "--hidden", "64", "--layers", "3", "--check", "--noise-snr-db", "10"]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert "exact" in lines[0]
    r = json.loads(lines[-1])
    assert r["max_rel_logit_error"] <= 1e-5 and r["dst_params"] > r["src_params"] and "random ids" in r["input"]
    m = load(out)
    assert (m.config.hidden_size, m.config.num_layers, m.config.num_heads, m.config.n_kv_heads) == (64, 3, 8, 4)
    with pytest.raises(UserError, match="not empty"):  # nothing overwritten without --overwrite
        _cli([str(tiny_hf_dir), "--out", str(out), "--hidden", "64"])
    with pytest.raises(UserError, match="smaller"):
        _cli([str(tiny_hf_dir), "--out", str(tmp_path / "x"), "--hidden", "16"])
    assert not (tmp_path / "x").exists()


def test_cli_lmforge_format_and_hf_parity(tiny_hf_dir, tmp_path):
    """The grown model in lmforge form loads back; in HF form transformers gives lmforge's logits."""
    transformers = pytest.importorskip("transformers")
    from lmforge.io.checkpoints import load

    _cli([str(tiny_hf_dir), "--out", str(tmp_path / "lm"), "--hidden", "48", "--ffn", "100", "--format", "lmforge"])
    _cli([str(tiny_hf_dir), "--out", str(tmp_path / "hf"), "--hidden", "48", "--ffn", "100"])
    a, b = load(tmp_path / "lm"), load(tmp_path / "hf")
    x = ids(a.config)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, b(x), rtol=1e-4, atol=1e-5)
