"""AdamW moments carried through growth (lmforge.surgery.grow_optim).

The invariant: grow the weights (no noise) and the moments, then take one AdamW step on the source and on the
grown model with the same batch. Every target entry that copies a source entry must move by exactly the update
the source made to that entry (after weight decay, which scales each entry by its own value). That holds only if
the grown moments are the source's divided by A and A^2, A the copies' share of the gradient; copying the moments
unchanged breaks it (the negative control below).

Which source entry a target entry copies is found without grow_optim: `grow` is run on probe tensors (all ones,
and 1..n), so a copy holds a * 1 and a * index."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.io.checkpoints import load, model_from_tensors
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.objectives.lm import lm_loss
from lmforge.surgery.grow import grow
from lmforge.surgery.grow_depth import layout
from lmforge.surgery.grow_optim import (
    OPTIMIZER_STATE_FILE,
    grow_optimizer_state,
    load_optimizer_state,
    read_optimizer_state,
)
from tests.families import GPT2_ARCH

LLAMA = ModelConfig(
    family="llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, ffn_size=40,
    max_seq_len=32,
)  # fmt: skip
GPT2 = ModelConfig(**GPT2_ARCH, vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, ffn_size=64, max_seq_len=32)
CASES = {
    "llama-gqa-2x-width-depth": (LLAMA, dict(hidden=32, layers=3)),
    "llama-tied-ffn-2.5x-top": (LLAMA.replace(tie_embeddings=True), dict(hidden=32, ffn=100, layers=4, depth="top")),
    "llama-heads-only": (LLAMA, dict(heads=4, kv_heads=2, ffn=60)),
    "llama-zero-mode": (LLAMA, dict(hidden=24, ffn=60, layers=3, mode="zero")),
    "gpt2-tied-2x": (GPT2, dict(hidden=32, layers=3, depth="bottom")),
}
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-30, weight_decay=0.1)  # eps ~0: AdamW's update is m/sqrt(v)


def _source(cfg: ModelConfig, steps: int = 3) -> tuple[Transformer, torch.optim.AdamW]:
    """A float64 source with a few AdamW steps behind it, so its moments are not just the last gradient."""
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    model.init_weights(generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), **HYPER)
    for i in range(steps):
        _step(model, opt, _batch(cfg, 10 + i))
    return model, opt


def _batch(cfg: ModelConfig, seed: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(seed))


def _step(model: Transformer, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _by_name(model: Transformer, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}


def _copy_map(cfg: ModelConfig, sizes: dict) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """target name -> (source name, flat source index of every entry, mask of the entries that are copies),
    from `grow` on probe tensors; entries of new (identity) blocks are not copies."""
    shapes = {n: tuple(t.shape) for n, t in Transformer(cfg).state_dict().items() if n != "lm_head.weight"}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    ones = {n: torch.ones(s, dtype=torch.float64) for n, s in shapes.items()}
    index = {n: torch.arange(1, torch.Size(s).numel() + 1, dtype=torch.float64).view(s) for n, s in shapes.items()}
    cfg_t, a_stream = grow(cfg, ones, **sizes)
    a_of = dict(a_stream)
    ia_of = dict(grow(cfg, index, **sizes)[1])
    slots = layout(cfg.num_layers, cfg_t.num_layers, sizes.get("depth", "interleave"))
    out = {}
    for name, a in a_of.items():
        if name.startswith("layers."):
            _, j, rest = name.split(".", 2)
            if slots[int(j)].new:
                continue
            src = f"layers.{slots[int(j)].src}.{rest}"
        else:
            src = name
        ratio = torch.where(a != 0, ia_of[name] / torch.where(a != 0, a, 1), 0)
        idx = ratio.round()
        n_src = torch.Size(shapes[src]).numel()
        copy = (a != 0) & ((ratio - idx).abs() < 1e-6) & (idx >= 1) & (idx <= n_src)
        out[name] = (src, (idx - 1).clamp(min=0).long(), copy)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_adamw_step_on_grown_moments_repeats_the_source_update(case):
    cfg, sizes = CASES[case]
    model_s, opt_s = _source(cfg)
    before_s = {n: p.detach().clone() for n, p in model_s.named_parameters()}
    state_s = _by_name(model_s, opt_s)
    cfg_t, tensors = grow(cfg, model_s.state_dict(), **sizes)
    weights_t = {n: t.clone() for n, t in tensors}
    cfg_m, moments = grow_optimizer_state(cfg, state_s, **sizes)
    assert cfg_m == cfg_t
    copies = _copy_map(cfg, sizes)

    ids = _batch(cfg, 99)
    with torch.no_grad():
        loss_s = float(lm_loss(model_s(ids[:, :-1]), ids[:, 1:]))
    _step(model_s, opt_s, ids)
    decay = 1 - HYPER["lr"] * HYPER["weight_decay"]
    update_s = {n: p.detach() - decay * before_s[n] for n, p in model_s.named_parameters()}

    def grown_update(state) -> dict[str, torch.Tensor]:
        model_t = model_from_tensors(cfg_t, weights_t.items(), torch.float64)
        before_t = {n: p.detach().clone() for n, p in model_t.named_parameters()}
        opt_t = torch.optim.AdamW(model_t.parameters(), **HYPER)
        load_optimizer_state(opt_t, model_t, state)
        with torch.no_grad():  # growth preserved the function: the same loss before the step
            assert float(lm_loss(model_t(ids[:, :-1]), ids[:, 1:])) == pytest.approx(
                loss_s, rel=1e-6
            )  # norms: float32 stats
        _step(model_t, opt_t, ids)
        return {n: p.detach() - decay * before_t[n] for n, p in model_t.named_parameters()}

    update_t = grown_update(moments)
    checked, names = 0, []
    for name, u in update_t.items():
        if name not in copies or name.endswith("k_proj.bias"):
            # New blocks; and a key bias shifts every score of a query alike, which softmax ignores: its gradient
            # is rounding noise that Adam (eps ~0) would blow up to full-size steps in the source and target alike.
            continue
        src, idx, copy = copies[name]
        expected = update_s[src].flatten()[idx]
        torch.testing.assert_close(u[copy], expected[copy], rtol=1e-4, atol=1e-7, msg=f"{case}: {name}")
        checked += int(copy.sum())
        names.append(name)
    total = sum(t.numel() for t in update_t.values())
    assert checked > total / 3, f"only {checked} of {total} entries were checked"

    # Negative control: the source's moments copied unchanged (no division) give other updates.
    naive = {}
    for name, st in moments.items():
        src, idx, copy = copies.get(name, (None, None, None))
        naive[name] = dict(st)
        if src is not None:
            for k in ("exp_avg", "exp_avg_sq"):
                naive[name][k] = torch.where(copy, state_s[src][k].flatten()[idx], 0.0)
    update_naive = grown_update(naive)
    worst = 0.0
    for name in names:
        src, idx, copy = copies[name]
        worst = max(worst, float((update_naive[name][copy] - update_s[src].flatten()[idx][copy]).abs().max()))
    assert worst > 1e-4, worst  # updates are ~1e-2; the tolerance above 1e-7 (float32 norm statistics)


def test_new_blocks_get_zero_moments_and_the_step_is_kept():
    model_s, opt_s = _source(LLAMA)
    cfg_t, moments = grow_optimizer_state(LLAMA, _by_name(model_s, opt_s), hidden=32, layers=4, depth="interleave")
    new = {j for j, s in enumerate(layout(2, 4, "interleave")) if s.new}
    assert new == {1, 3}
    assert set(moments) == {n for n, _ in Transformer(cfg_t).named_parameters()}
    for name, st in moments.items():
        assert float(st["step"]) == 3.0
        if name.startswith("layers.") and int(name.split(".")[1]) in new:
            assert not st["exp_avg"].any() and not st["exp_avg_sq"].any(), name
        else:
            assert st["exp_avg_sq"].any(), name


@pytest.mark.parametrize("tied", [False, True])
def test_doubling_divides_moments_by_two_and_four_as_staged_training(tied):
    """2x clone: A = 2 for every tensor (each written axis has 2 copies) but the LM head, which reads 2 copies
    each divided by 2 (A = 1); with a tied head the final norm's gain was halved, so A = 2 x 1/2 = 1."""
    cfg = LLAMA.replace(num_kv_heads=None, tie_embeddings=tied)
    model_s, opt_s = _source(cfg)
    src = _by_name(model_s, opt_s)
    _, grown = grow_optimizer_state(cfg, src, hidden=32)
    q = "layers.0.attn.q_proj.weight"
    torch.testing.assert_close(grown[q]["exp_avg"][:16, :16], src[q]["exp_avg"] / 2)
    torch.testing.assert_close(grown[q]["exp_avg"][16:, 16:], src[q]["exp_avg"] / 2)
    torch.testing.assert_close(grown[q]["exp_avg_sq"][:16, 16:], src[q]["exp_avg_sq"] / 4)
    emb, norm1 = "embed.tok.weight", "layers.1.mlp_norm.weight"
    torch.testing.assert_close(grown[emb]["exp_avg"][:, 16:], src[emb]["exp_avg"] / 2)
    torch.testing.assert_close(grown[norm1]["exp_avg"][16:], src[norm1]["exp_avg"] / 2)
    torch.testing.assert_close(
        grown["norm.weight"]["exp_avg"][:16], src["norm.weight"]["exp_avg"] * (1 if tied else 0.5)
    )
    if not tied:
        torch.testing.assert_close(grown["lm_head.weight"]["exp_avg"][:, 16:], src["lm_head.weight"]["exp_avg"])


# ---- the CLI: a training checkpoint grown with --optimizer-state -----------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 3-step training run of a tiny model on a tiny corpus (lmforge data + lmforge train machinery)."""
    from lmforge.data.tokens import build_dataset
    from lmforge.train.loop import Trainer
    from lmforge.train.recipe import load_recipe

    root = tmp_path_factory.mktemp("grow-optim")
    (root / "text").mkdir()
    words = ("the", "king", "said", "to", "the", "queen", "that", "the", "sea", "was", "wide", "and", "night", "old")
    g = torch.Generator().manual_seed(0)
    for d in range(12):
        lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (10,), generator=g)) for _ in range(30)]
        (root / "text" / f"d{d}.txt").write_text(".\n".join(lines))
    build_dataset(root / "data", inputs=[str(root / "text")], tokenizer="bpe:300", val_fraction=0.1, seed=0)
    overrides = {
        "model.vocab_size": 300, "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 4,
        "model.ffn_size": 64, "model.max_seq_len": 64, "data.path": str(root / "data"), "train.steps": 3,
        "train.batch_size": 4, "train.seq_len": 32, "train.eval_every": 0, "train.eval_batches": 1,
        "train.out_dir": str(root / "run"), "train.sample_prompts": [], "train.export_hf": False,
    }  # fmt: skip
    Trainer(load_recipe(None, [f"--{k}={json.dumps(v)}" for k, v in overrides.items()])).run()
    return root / "run"


def test_grow_cli_carries_the_optimizer_state(trained_run, tmp_path, capsys):
    dst = tmp_path / "grown"
    rc = main([
        "grow", str(trained_run), "--out", str(dst), "--hidden", "64", "--layers", "3", "--format", "lmforge",
        "--optimizer-state", "--noise-snr-db", "10", "--check",
    ])  # fmt: skip
    assert rc == 0
    check = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert check["max_rel_logit_error"] < 1e-5
    state = read_optimizer_state(dst)
    model = load(dst)
    assert set(state) == {n for n, _ in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert load_optimizer_state(opt, model, state) == len(state)
    p = model.layers[0].attn.q_proj.weight
    torch.testing.assert_close(opt.state[p]["exp_avg"], state["layers.0.attn.q_proj.weight"]["exp_avg"])
    assert float(opt.state[p]["step"]) == 3.0
    assert (dst / OPTIMIZER_STATE_FILE).is_file() and (dst / "tokenizer.json").is_file()


def test_grow_cli_optimizer_state_needs_a_training_checkpoint(tiny_hf_dir, tmp_path, capsys):
    rc = main(["grow", str(tiny_hf_dir), "--out", str(tmp_path / "x"), "--hidden", "64", "--optimizer-state"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint" in err
    assert not (tmp_path / "x").exists()
