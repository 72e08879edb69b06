"""PSP++ held-out heads: each parameter set learns from its own loss only, inference is the training forward, and the
model trains, resumes, runs on 2 ranks, saves, loads, scores and generates through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.io.checkpoints import load
from lmforge.metrics.flops import flops_per_token
from lmforge.model.config import ModelConfig
from lmforge.model.shapes import expected_shapes, param_count
from lmforge.model.transformer import KVCache, Transformer
from lmforge.objectives.lm import lm_loss
from lmforge.train.loop import Trainer
from tests.test_train import losses, recipe_file, run_cli

PSP = ModelConfig(
    vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, ffn_size=64, max_seq_len=64,
    heldout_layers=2, heldout_heads=2, heldout_head_dim=6, heldout_width=16,
)  # fmt: skip


def model(cfg: ModelConfig = PSP) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights()
    return m


def grads_of(m: Transformer, loss: torch.Tensor) -> dict[str, bool]:
    m.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in m.named_parameters()}


@pytest.mark.parametrize("detach", [True, False])
def test_each_loss_trains_only_its_own_parameters(detach):
    m = model(PSP.replace(heldout_detach=detach))
    ids = torch.randint(0, 128, (2, 12))
    main_grads = grads_of(m, lm_loss(*(m(ids[:, :-1]), ids[:, 1:])))
    logits, states = m(ids[:, :-1], return_states=True)
    held_grads = grads_of(m, lm_loss(states["heldout_logits"], ids[:, 1:]))
    held = {n for n in main_grads if n.startswith("heldout.")}
    assert held and all(held_grads[n] for n in held)  # the held-out loss trains every held-out parameter ...
    assert not any(held_grads[n] for n in main_grads if n not in held)  # ... and no main one
    assert all(main_grads[n] for n in main_grads if n not in held)
    # the main loss reaches the held-out heads only without the detach (the ablation)
    assert any(main_grads[n] for n in held) == (not detach)


def test_inference_is_the_training_forward_with_and_without_the_cache():
    m = model().eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        plain = m(ids)
        trained, _ = m(ids, return_states=True)
        cache = KVCache.empty(PSP, 2, 10, "cpu", torch.float32)
        stepped = torch.cat([m(ids[:, :6], cache=cache), m(ids[:, 6:7], cache=cache), m(ids[:, 7:], cache=cache)], 1)
    assert torch.equal(plain, trained)
    assert torch.allclose(stepped, plain, atol=1e-5)


def test_shapes_parameters_and_flops_count_the_held_out_model():
    m = model()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected_shapes(PSP)
    assert list(m.state_dict()) == list(expected_shapes(PSP))
    assert param_count(PSP) == sum(p.numel() for p in m.parameters())
    base, psp = flops_per_token(PSP.replace(heldout_layers=0), 64), flops_per_token(PSP, 64)
    C, W, nd, V = 32, 16, 12, 128
    assert psp["heldout_params"] == 2 * C * W + 2 * (4 * W * nd + nd * C) + C * V
    assert psp["total"] == pytest.approx(base["total"] + 6 * psp["heldout_params"] + 12 * 2 * nd * 64)


def psp_recipe(tmp, data, **train):
    recipe = recipe_file(tmp, data, **{"precision": "float32", "sample_prompts": ["the king"], **train})
    text = recipe.read_text().replace("model:\n", "model:\n  heldout_layers: 1\n  heldout_heads: 2\n", 1)
    recipe.write_text(text + "heldout:\n  loss_weight: 0.5\n")
    return recipe


def test_train_saves_lmforge_form_that_eval_and_generate_read(tmp_path, data_dir, capsys):
    recipe = psp_recipe(tmp_path, data_dir)
    assert main(["train", str(recipe)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("loss") is not None]
    assert all(r["loss"] == pytest.approx(r["main_loss"] + 0.5 * r["heldout_loss"], rel=1e-5) for r in steps)
    assert all("val_heldout_loss" in r for r in rows if "val_loss" in r)
    final = tmp_path / "run" / "final"
    assert load(final).config.heldout_layers == 1
    capsys.readouterr()
    assert main(["eval", str(final), "--data", str(data_dir), "--seq-len", "32", "--batches", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] > 0
    assert main(["generate", str(final), "--prompt", "the king", "--max-new-tokens", "5", "--greedy"]) == 0
    capsys.readouterr()
    assert main(["convert", str(final), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "held-out heads" in err[0]
    assert not (tmp_path / "hf").exists()


def test_resume_is_exact(tmp_path, data_dir):
    from lmforge.commands.train import load_train_recipe
    from lmforge.objectives.heldout import HeldOutLanguageModelling

    def trainer(tmp, resume=False, **train):
        recipe, extra = load_train_recipe(psp_recipe(tmp, data_dir, **train))
        return Trainer(recipe, objective=HeldOutLanguageModelling(extra["heldout"]), resume=resume)

    trainer(tmp_path / "a").run()
    t = trainer(tmp_path / "b", ckpt_every=3)
    for _ in range(3):
        t.train_step()
    t.save()
    del t
    trainer(tmp_path / "b", resume=True, ckpt_every=3).run()
    assert losses(tmp_path / "b" / "run")[-3:] == losses(tmp_path / "a" / "run")[-3:]


def test_each_parameter_set_is_clipped_by_its_own_norm(tmp_path, data_dir):
    from lmforge.commands.train import load_train_recipe
    from lmforge.objectives.heldout import HeldOutLanguageModelling

    recipe, extra = load_train_recipe(psp_recipe(tmp_path, data_dir), ["--optim.grad_clip=1.0"])
    t = Trainer(recipe, objective=HeldOutLanguageModelling(extra["heldout"]))
    held = set(map(id, t.model.heldout.parameters()))
    for p in t.model.parameters():  # main gradients of norm 100 in all, held-out ones of norm 0.5
        p.grad = torch.zeros_like(p)
    main_p = [p for p in t.model.parameters() if id(p) not in held]
    held_p = [p for p in t.model.parameters() if id(p) in held]
    main_p[0].grad.view(-1)[0], held_p[0].grad.view(-1)[0] = 100.0, 0.5
    assert t._clip() == pytest.approx((100.0**2 + 0.5**2) ** 0.5)
    assert main_p[0].grad.view(-1)[0].item() == pytest.approx(1.0, rel=1e-5)  # clipped to 1
    assert held_p[0].grad.view(-1)[0].item() == 0.5  # untouched by the main set's large norm


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, data_dir, mode):
    run_cli(psp_recipe(tmp_path / "one", data_dir, sample_prompts=[]), 1)
    run_cli(psp_recipe(tmp_path / "two", data_dir, parallel=mode, sample_prompts=[]), 2)
    one, two = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert len(one) == len(two) == 6 and max(abs(x - y) for x, y in zip(one, two)) <= 1e-5, (one, two)


def test_a_heldout_section_without_held_out_heads_is_refused(tmp_path, data_dir, capsys):
    recipe = recipe_file(tmp_path, data_dir)
    assert main(["train", str(recipe), "--heldout.loss_weight=2"]) == 2
    assert "heldout" in capsys.readouterr().err


def test_surgery_refuses_held_out_heads():
    from lmforge.errors import UserError
    from lmforge.surgery import fuse, grow

    for target_config in (grow.target_config, fuse.target_config):
        with pytest.raises(UserError, match="held-out heads"):
            target_config(PSP, hidden=64)
