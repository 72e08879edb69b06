"""Fusion (lmforge.surgery.fuse): same size is the identity; a model holding exact copies (grown by
lmforge.surgery.grow in clone mode) fuses back to its source's function; every family and method gives a model
that runs, exports to HF and loads in transformers with the same logits; the CLI and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.io.checkpoints import export_hf, load, model_from_tensors
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.surgery.fuse import apply_hidden_map, drop_layers, fold_norm_gains, fuse, param_count, target_config
from lmforge.surgery.fuse_math import cluster, refit
from lmforge.surgery.grow import grow
from tests.families import BERT_ARCH, GPT2_ARCH

V = 64
FAMILIES = {
    "llama": ModelConfig(
        vocab_size=V, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_size=48, tie_embeddings=True
    ),
    "gpt2": ModelConfig(
        **GPT2_ARCH, vocab_size=V, hidden_size=32, num_layers=3, num_heads=4, ffn_size=48, max_seq_len=64
    ),
    "bert": ModelConfig(
        **{**BERT_ARCH, "head": "classifier"},
        vocab_size=V,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        ffn_size=48,
        max_seq_len=64,
        num_labels=3,
        classifier_bias=True,
        pooler=True,
    ),
}
IDS = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(2))


def source(cfg: ModelConfig) -> tuple[Transformer, dict[str, torch.Tensor]]:
    """A random float64 model with non-trivial norm gains; its state without a tied lm_head."""
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model = model.double().eval()
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    return model, state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["fuse", "prune", "prune-refit", "prune-map"])
def test_same_size_is_identity(family, method):
    cfg = FAMILIES[family]
    model, state = source(cfg)
    cfg2, state2, _ = fuse(cfg, state, IDS, method=method)
    assert cfg2 == cfg
    assert torch.equal(model_from_tensors(cfg2, state2.items(), torch.float64)(IDS), model(IDS))


# (family, what to grow): every axis the family allows; GPT-2 / BERT keep head_dim = hidden / heads.
CASES = [
    ("llama", {"hidden": 64}),
    ("llama", {"ffn": 96}),
    ("llama", {"heads": 8, "kv_heads": 4}),
    ("llama", {"kv_heads": 4}),
    ("llama", {"layers": 6}),
    ("llama", {"hidden": 64, "ffn": 96, "layers": 5}),
    ("gpt2", {"hidden": 64}),
    ("gpt2", {"ffn": 96}),
    ("gpt2", {"layers": 6}),
    ("bert", {"hidden": 64}),
    ("bert", {"ffn": 96}),
]
FIELDS = {
    "hidden": "hidden_size",
    "ffn": "ffn_size",
    "heads": "num_heads",
    "kv_heads": "n_kv_heads",
    "layers": "num_layers",
}


@pytest.mark.parametrize("ridge", [0.0, None], ids=["lstsq", "auto"])
@pytest.mark.parametrize("family,sizes", CASES, ids=[f"{f}-{'-'.join(s)}" for f, s in CASES])
def test_fusing_exact_copies_recovers_the_source(family, sizes, ridge):
    """grow (clone) duplicates channels, neurons and heads and inserts identity blocks; fusing back to the
    source's sizes must find the copies and give the source's outputs, with plain least squares and with the
    default held-out ridge (whose prior, the copies' summed writers, is then exact)."""
    cfg = FAMILIES[family]
    model, state = source(cfg)
    cfg_g, grown = grow(cfg, state, mode="clone", **sizes)
    grown = dict(grown)
    back = {k: getattr(cfg, field) for k, field in FIELDS.items()}  # grow scales FFN and heads with hidden
    cfg_f, fused, _ = fuse(cfg_g, grown, IDS, ridge=ridge, **back)
    assert (cfg_f.hidden_size, cfg_f.ffn_size, cfg_f.num_heads, cfg_f.num_layers) == (
        cfg.hidden_size,
        cfg.ffn_size,
        cfg.num_heads,
        cfg.num_layers,
    )
    # Fused weights are computed in float32: agreement to float32 rounding, measured ~1e-7.
    assert rel_err(model_from_tensors(cfg_f, fused.items(), torch.float64)(IDS), model(IDS)) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["fuse", "prune", "prune-refit", "prune-map"])
def test_fused_model_exports_and_loads_in_transformers(family, method, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = FAMILIES[family]
    _, state = source(cfg)
    sizes = {"hidden": 24, "ffn": 32, "layers": 2} if family == "llama" else {"hidden": 16, "ffn": 32, "layers": 2}
    if family == "llama":
        sizes |= {"heads": 3, "kv_heads": 1}  # head_dim 8 kept, hidden 24 = 3 x 8
    told = []
    cfg_f, fused, report = fuse(cfg, state, IDS, method=method, **sizes, progress=lambda *a: told.append(a))
    assert report["target_params"] == param_count(cfg_f) < report["source_params"]
    # progress has a total from the start, counts every unit once, and ends complete
    totals, done = {t for _, _, t in told}, [d for _, d, _ in told]
    assert len(totals) == 1 and done == list(range(len(told)))
    assert told[-1] == ("done", *totals, *totals)
    model = model_from_tensors(cfg_f, fused.items(), torch.float32)
    export_hf(model, tmp_path / "hf")
    auto = (
        transformers.AutoModelForSequenceClassification
        if cfg.head == "classifier"
        else transformers.AutoModelForCausalLM
    )
    hf = auto.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ours, theirs = model(IDS), hf(IDS).logits
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max().item() < 1e-4


def test_fusion_beats_pruning_on_redundant_model():
    """A model with near-copies (grown, then perturbed): merging the copies keeps more of the function than
    keeping the most active half, measured as logit error against the grown model."""
    cfg = FAMILIES["llama"]
    _, state = source(cfg)
    cfg_g, grown = grow(cfg, state, mode="clone", hidden=64, ffn=96, noise_snr_db=20.0, noise="plain")
    grown = dict(grown)
    ref = model_from_tensors(cfg_g, grown.items(), torch.float64)(IDS)
    errs = {}
    for method in ("fuse", "prune"):
        cfg_f, fused, _ = fuse(cfg_g, grown, IDS, hidden=32, ffn=48, method=method)
        errs[method] = rel_err(model_from_tensors(cfg_f, fused.items(), torch.float64)(IDS), ref)
    assert errs["fuse"] < errs["prune"] / 3, errs


def test_prune_refit_keeps_what_pruning_keeps_and_refits_only_the_writers():
    """The baselines that isolate merging: prune-refit reads with exactly pruning's weights and refits o_proj and
    down_proj, which lowers the layers' reconstruction error on the calibration tokens."""
    cfg = FAMILIES["llama"]
    model, state = source(cfg)
    sizes = {"ffn": 32, "heads": 2, "kv_heads": 1}  # hidden kept: no map, so the readers compare directly
    cfg_p, pruned, _ = fuse(cfg, state, IDS, method="prune", **sizes)
    _, refitted, _ = fuse(cfg, state, IDS, method="prune-refit", **sizes)
    for name in pruned:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert not torch.equal(pruned[name], refitted[name]), name
        else:
            assert torch.equal(pruned[name], refitted[name]), name
    ref = model(IDS)
    err = {
        m: rel_err(model_from_tensors(cfg_p, sd.items(), torch.float64)(IDS), ref)
        for m, sd in (("prune", pruned), ("prune-refit", refitted))
    }
    assert err["prune-refit"] < err["prune"], err


def test_cluster_merges_duplicates_first():
    feats = torch.randn(100, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    feats = torch.cat([feats, feats[:, [1, 4]] * torch.tensor([2.0, -0.5], dtype=torch.float64)], dim=1)  # 8 ch
    groups = cluster(feats.T @ feats, 6, signed=True)
    assert sorted(g.members.tolist() for g in groups if len(g.members) > 1) == [[1, 6], [4, 7]]
    for g in groups:
        assert torch.allclose(g.coef.norm(), torch.tensor(1.0, dtype=torch.float64))
    unsigned = cluster(feats.T @ feats, 6, signed=False)  # the anti-correlated copy (ch 7 = -0.5 ch 4) is refused
    assert [4, 7] not in [g.members.tolist() for g in unsigned]


@pytest.mark.parametrize("tied", [True, False])
def test_folding_norm_gains_keeps_the_function(tied):
    cfg = FAMILIES["llama"].replace(tie_embeddings=tied)
    model, state = source(cfg)
    folded = fold_norm_gains(cfg, state)
    assert all(
        torch.equal(folded[k], torch.ones_like(folded[k])) for k in folded if k.startswith("layers.") and "norm" in k
    )
    assert torch.equal(folded["norm.weight"], state["norm.weight"]) == tied  # a tied head keeps the final gain
    assert rel_err(model_from_tensors(cfg, folded.items(), torch.float64)(IDS), model(IDS)) < 1e-12


def test_a_rotation_of_the_stream_with_folded_gains_keeps_the_function():
    """The PCA map is a rotation when nothing is cut: with the gains folded (an untied head), every norm commutes
    with it, so the rotated model computes the same function."""
    cfg = FAMILIES["llama"].replace(tie_embeddings=False)
    model, state = source(cfg)
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    rotated = apply_hidden_map(fold_norm_gains(cfg, state), q)
    # RMSNorm takes its statistics in float32 (as HF does), so a rotated stream agrees to float32 rounding.
    assert rel_err(model_from_tensors(cfg, rotated.items(), torch.float64)(IDS), model(IDS)) < 1e-6


def test_tied_final_gain_fit():
    """The final gain of a tied head after a hidden map: the source's own gain under the identity map, and in
    general the minimiser of the logit error summed over the calibration tokens' normalised final streams u,
    sum ||emb (e (g * e^T u) - g_f * u)||^2 (its gradient there, by autograd on the tokens themselves, is ~0)."""
    from lmforge.surgery.fuse import _tied_final_gain
    from lmforge.surgery.fuse_calib import calibrate

    cfg = FAMILIES["llama"]
    model, state = source(cfg)
    state["norm.weight"] = torch.linspace(-1.0, 3.0, 32, dtype=torch.float64)  # a gain far from uniform
    finals: list[torch.Tensor] = []
    hook = model.norm.register_forward_pre_hook(lambda _m, args: finals.append(args[0]))
    calib = calibrate(model.float(), IDS)
    hook.remove()
    metric = state["embed.tok.weight"].T @ state["embed.tok.weight"]  # (C, C)
    gain = _tied_final_gain(metric, state["norm.weight"], torch.eye(32, dtype=torch.float64), calib.final_unit_gram)
    assert torch.allclose(gain, state["norm.weight"], rtol=1e-6)

    x = finals[0].reshape(-1, 32).double()
    u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)  # (N, C)
    e = torch.linalg.eigh(calib.final_unit_gram)[1][:, -24:]  # (C, C')
    g = (_tied_final_gain(metric, state["norm.weight"], e, calib.final_unit_gram) / math.sqrt(32 / 24)).requires_grad_()
    emb, g_f = state["embed.tok.weight"], state["norm.weight"]
    loss = ((((u @ e) * g) @ e.T - g_f * u) @ emb.T).pow(2).sum()
    loss.backward()
    assert g.grad.norm() < 1e-8 * loss.item(), (g.grad.norm(), loss)


def test_refit_ridge_is_chosen_on_held_out_rows():
    """Few noisy rows: plain least squares memorises the noise; the held-out ridge stays near the true writer
    (here the prior), and an exact linear target is reproduced whatever the ridge."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 48, dtype=torch.float64, generator=gen)
    w_true = torch.randn(16, 48, dtype=torch.float64, generator=gen)
    noisy = x @ w_true.T + 3.0 * torch.randn(80, 16, dtype=torch.float64, generator=gen)
    w_ls, _ = refit(x, noisy, bias=False, ridge=0.0, prior=w_true)
    w_auto, _ = refit(x, noisy, bias=False, prior=w_true)
    assert (w_auto - w_true).norm() < (w_ls - w_true).norm() / 3
    w_prior, _ = refit(x, noisy, bias=False, ridge=float("inf"), prior=w_true)
    assert torch.equal(w_prior, w_true)
    b_true = torch.randn(16, dtype=torch.float64, generator=gen)
    for ridge in (0.0, None):
        w, b = refit(x, x @ w_true.T + b_true, bias=True, ridge=ridge, prior=w_true * 0.5)
        assert torch.allclose(x @ w.T + b, x @ w_true.T + b_true, atol=1e-8)


def test_target_config_rules():
    cfg = FAMILIES["llama"]
    assert target_config(cfg) == cfg
    t = target_config(cfg, hidden=16)  # heads follow hidden at head_dim 8; the GQA ratio is kept
    assert (t.num_heads, t.n_kv_heads, t.dim_head, t.norm_eps) == (2, 1, 8, cfg.norm_eps * 2)
    with pytest.raises(UserError, match="between 1 and"):
        target_config(cfg, hidden=64)
    with pytest.raises(UserError, match="multiple of"):
        target_config(cfg, heads=3, kv_heads=2)
    with pytest.raises(UserError, match="hidden = heads x head_dim"):
        target_config(FAMILIES["gpt2"], hidden=20)


def test_drop_layers_keeps_the_most_influential():
    cfg = FAMILIES["llama"]
    _, state = source(cfg)
    cfg_g, grown = grow(cfg, state, mode="clone", layers=6)  # 3 identity blocks: influence 0
    cfg_d, dropped, report = drop_layers(cfg_g, dict(grown), IDS, 3)
    assert cfg_d.num_layers == 3 and len(report["layer_groups"]) == 3
    model, _ = source(cfg)
    assert rel_err(model_from_tensors(cfg_d, dropped.items(), torch.float64)(IDS), model(IDS)) < 1e-12


# ---- the CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory):
    """A tiny trained-looking checkpoint with a BPE tokenizer and a dataset built with that tokenizer."""
    from lmforge.data.tokens import build_dataset

    root = tmp_path_factory.mktemp("fuse")
    docs = root / "docs"
    docs.mkdir()
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "a",
        "is",
        "that",
        "for",
        "it",
        "as",
        "was",
        "with",
        "be",
        "by",
        "on",
        "not",
        "he",
        "this",
        "are",
        "or",
        "his",
        "from",
        "at",
        "which",
    ]
    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        idx = torch.randint(0, len(words), (300,), generator=gen).tolist()
        (docs / f"d{i}.txt").write_text(" ".join(words[j] for j in idx) + ".\n")
    build_dataset(root / "data", inputs=[str(docs)], tokenizer="bpe:300")
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    cfg = FAMILIES["llama"].replace(vocab_size=manifest["vocab_size"], max_seq_len=128)
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.tokenizer_files = {"tokenizer.json": (root / "data" / "tokenizer.json").read_bytes()}
    export_hf(model, root / "teacher")
    return root


@pytest.mark.parametrize("method", ["fuse", "prune", "prune-refit", "prune-map", "drop", "random"])
def test_cli_writes_a_loadable_smaller_model(teacher_and_data, method, capsys):
    root = teacher_and_data
    out = root / f"out-{method}"
    argv = ["fuse", str(root / "teacher"), "--out", str(out), "--hidden", "16", "--ffn", "24", "--layers", "2"]
    argv += ["--method", method, "--data", str(root / "data"), "--calib-seqs", "4", "--seq-len", "64"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = load(out)
    assert report["target_params"] == model.num_params() < report["source_params"]
    assert report["ppl"] > 1 and report["source_ppl"] > 1
    if method != "drop":
        assert model.config.hidden_size == 16


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--hidden", "64"], "between 1 and"),
        (["--calib-seqs", "0"], "must be positive"),
        (["--heads", "3", "--kv-heads", "2"], "multiple of"),
        (["--ridge", "-1"], "is not 'auto' or a non-negative number"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(teacher_and_data, extra, message, capsys):
    root = teacher_and_data
    out = root / "bad"
    try:
        code = main(["fuse", str(root / "teacher"), "--out", str(out), "--data", str(root / "data"), *extra])
    except SystemExit as e:  # argparse's own errors (a bad --ridge) exit from the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_data_with_another_tokenizer(teacher_and_data, tmp_path, capsys):
    root = teacher_and_data
    cfg = FAMILIES["llama"]  # vocab 64: not the dataset's tokenizer
    model = Transformer(cfg)
    model.init_weights()
    export_hf(model, tmp_path / "other")
    assert main(["fuse", str(tmp_path / "other"), "--out", str(tmp_path / "o"), "--data", str(root / "data")]) == 2
    assert "vocab" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
