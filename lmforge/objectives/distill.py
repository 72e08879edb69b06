"""Distillation of a causal LM: a student trained against a frozen teacher (recovery training of a fused model).

The student is a recipe's model (train.init_from: e.g. the fused model; or the model section: the same
architecture from random init, the scratch baseline). The teacher (distill.teacher: an HF folder, an lmforge
checkpoint or a .gguf) is loaded once, frozen, and run on each rank's own slice of every micro-batch. Loss:

    kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))   mean over tokens
  + lm_weight * next-token cross-entropy
  + hidden_mse_weight * MSE(student's, teacher's last-layer hidden states)   (same hidden size only)

Every train.eval_every steps the validation LM loss (val_ppl = exp of it) and val_kl, the KL from the teacher
at temperature 1 in nats per token, are logged on the same fixed validation batches. Training ends when
val_kl <= distill.stop_kl, when val_kl has not improved by more than plateau_min_delta (relative) for
plateau_patience evaluations, or when train.steps run out; the summary's "stopped_by" says which.

The recipe is lmforge's (train/recipe.py) plus a `distill:` section (DistillConfig), accepted by `lmforge distill`
only; its keys are checked the same way and it is overridable as --distill.key=value. The loop is the one loop
(train/loop.py): this module gives it an objective and two stop rules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.metrics.flops import flops_per_token
from lmforge.objectives.base import Objective
from lmforge.objectives.lm import lm_loss, perplexity
from lmforge.train.loop import RESUMABLE_KEYS, Trainer
from lmforge.train.recipe import Recipe, load_recipe_sections
from lmforge.train.stop import Plateau, StopRule, Threshold

# Rows of (rows, vocab) float32 temporaries the KL works on at once: 8M floats = 32 MB per temporary, whatever
# the vocabulary (49152 for SmolLM2 gives 170 rows), instead of several copies of the whole (B*T, V) logits.
KL_CHUNK_FLOATS = 1 << 23
# The teacher's validation log-probs are cached across evaluations when they take at most this much per rank;
# otherwise the teacher is run again at each evaluation (its outputs never change, only the cost does).
TEACHER_CACHE_BYTES = 256 << 20


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""  # HF folder, lmforge checkpoint or .gguf: the model the student learns to match
    temperature: float = 2.0  # T of the logit KL (its gradient scale is kept by the T^2 factor)
    kl_weight: float = 1.0
    lm_weight: float = 0.0  # weight of the plain next-token cross-entropy on the data
    hidden_mse_weight: float = 0.0  # MSE of the last layer's hidden states (before the final norm); same width only
    stop_kl: float = 0.0  # stop once the validation KL (T = 1, nats/token) is <= this; 0 = off
    plateau_patience: int = 0  # stop after this many evaluations without a val_kl improvement; 0 = off
    plateau_min_delta: float = 0.01  # an improvement must lower the best val_kl by more than this fraction


# Keys that may differ when a distill run is resumed: when to stop, like train.steps.
DISTILL_RESUMABLE_KEYS = ("distill.stop_kl", "distill.plateau_patience", "distill.plateau_min_delta")


def check_distill_config(d: DistillConfig, eval_every: int) -> None:
    if not d.teacher:
        raise UserError("distill.teacher is required: the teacher checkpoint (HF folder, lmforge folder or .gguf)")
    if not d.temperature > 0:
        raise UserError(f"distill.temperature must be > 0, got {d.temperature}")
    weights = {"kl_weight": d.kl_weight, "lm_weight": d.lm_weight, "hidden_mse_weight": d.hidden_mse_weight}
    for key, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise UserError(f"distill.{key} must be >= 0, got {w}")
    if not any(weights.values()):
        raise UserError("distill.kl_weight, lm_weight and hidden_mse_weight are all 0: there is no loss to train")
    if d.stop_kl < 0 or d.plateau_patience < 0 or d.plateau_min_delta < 0:
        raise UserError("distill.stop_kl, plateau_patience and plateau_min_delta must be >= 0")
    if (d.stop_kl > 0 or d.plateau_patience > 0) and eval_every <= 0:
        raise UserError("distill.stop_kl and distill.plateau_patience are judged at evaluations: set train.eval_every")


def load_distill_recipe(path: str | Path | None, overrides: list[str] = ()) -> tuple[Recipe, DistillConfig]:
    recipe, extra = load_recipe_sections(path, overrides, {"distill": DistillConfig})
    check_distill_config(extra["distill"], recipe.train.eval_every)
    return recipe, extra["distill"]


# ---- the KL -------------------------------------------------------------------------------------
def _chunk_rows(vocab: int) -> int:
    return max(1, KL_CHUNK_FLOATS // vocab)


class _TemperedKL(torch.autograd.Function):
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)), both (N, V), in float32.

    The gradient, T * (softmax(student / T) - softmax(teacher / T)) / N, is computed in the forward chunk by chunk,
    so the only (N, V) tensor kept for the backward is that gradient (in the logits' dtype): autograd through
    log_softmax would keep several float32 copies of the whole logits."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        N, V = student.shape
        rows = _chunk_rows(V)
        grad = torch.empty_like(student)  # (N, V)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for i in range(0, N, rows):
            log_q = F.log_softmax(student[i : i + rows].float() / temperature, dim=-1)  # (n, V) student
            log_p = F.log_softmax(teacher[i : i + rows].float() / temperature, dim=-1)  # (n, V) teacher
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()
            grad[i : i + rows] = (log_q.exp() - p) * (temperature / N)
        ctx.save_for_backward(grad)
        return total * (temperature * temperature / N)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None


def tempered_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over tokens; logits (..., V), the teacher's
    without grad. Differentiable in the student's logits."""
    V = student_logits.shape[-1]
    return _TemperedKL.apply(student_logits.reshape(-1, V), teacher_logits.detach().reshape(-1, V), temperature)


@torch.no_grad()
def kl_from_log_probs(student_logits: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Mean over tokens of KL(teacher || softmax(student)) at temperature 1; (..., V) each, no grad. A float32
    scalar."""
    V = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, V), teacher_log_probs.reshape(-1, V)
    rows, total = _chunk_rows(V), torch.zeros((), dtype=torch.float32, device=s.device)
    for i in range(0, s.shape[0], rows):
        log_q = F.log_softmax(s[i : i + rows].float(), dim=-1)  # (n, V)
        log_p = t[i : i + rows].float()
        total += (log_p.exp() * (log_p - log_q)).sum()
    return total / s.shape[0]


# ---- the objective --------------------------------------------------------------------------------
class Distillation(Objective):
    """The distillation loss against `config.teacher` on batches {"input_ids", "labels"}; validation logs the LM loss
    (val_loss, val_ppl) and val_kl, the KL from the teacher at temperature 1 in nats per token, plus the teacher's
    own val_loss / val_ppl in the first evaluation of each process. Under DDP / FSDP2 the teacher is replicated on
    every rank and runs on the rank's own rows."""

    def __init__(self, config: DistillConfig):
        super().__init__()
        self.config = config
        self.teacher_runs = config.kl_weight > 0 or config.hidden_mse_weight > 0  # an LM-loss-only run needs none
        self.teacher_val_loss: float | None = None
        self._teacher_logged = False

    # -- set-up: the teacher, checked before the trainer writes anything --
    def prepare(self, trainer) -> None:
        from lmforge.io.checkpoints import load

        d, student_cfg, tc, env = self.config, trainer.recipe.model, trainer.tc, trainer.env
        # fp32 on CPU; on a GPU with bf16 training the teacher is held in bf16 (inference only, half the memory).
        dtype = torch.float32 if env.device.type == "cpu" else trainer.dtype
        teacher = load(d.teacher, dtype=dtype, device=env.device)
        cfg = teacher.config
        if cfg.head != "lm":
            raise UserError(f"teacher {d.teacher} has a {cfg.head!r} head; distillation needs an LM head")
        if cfg.vocab_size != student_cfg.vocab_size:
            raise UserError(
                f"teacher {d.teacher} has vocab_size {cfg.vocab_size}, the student {student_cfg.vocab_size}: "
                "distillation compares their distributions token by token, so they must match"
            )
        if d.hidden_mse_weight > 0 and cfg.hidden_size != student_cfg.hidden_size:
            raise UserError(
                f"distill.hidden_mse_weight needs equal hidden sizes: the teacher has {cfg.hidden_size}, "
                f"the student {student_cfg.hidden_size} (set it to 0)"
            )
        if cfg.position == "learned" and tc.seq_len > cfg.max_seq_len:
            raise UserError(f"train.seq_len {tc.seq_len} exceeds the teacher's max_seq_len {cfg.max_seq_len}")
        trainer.task.check_model(teacher)
        teacher.requires_grad_(False)
        # Not a submodule: a frozen teacher is neither trained, nor saved in checkpoints, nor moved with the objective.
        object.__setattr__(self, "teacher", teacher.eval())
        self.teacher_flops = flops_per_token(cfg, tc.seq_len)["forward"]
        self.teacher_params = teacher.num_params()
        self.student_params = trainer.model.num_params()
        self._teacher_val_pass(trainer)

    @torch.no_grad()
    def _teacher_val_pass(self, trainer) -> None:
        """The teacher's own validation loss (once), caching its log-probs in the validation micro-batches when they
        fit TEACHER_CACHE_BYTES; otherwise val_metrics runs the teacher again at each evaluation."""
        tc, env = trainer.tc, trainer.env
        rows = len(range(env.rank, tc.batch_size, env.world))  # this rank's rows of a batch
        cache = tc.eval_batches * rows * tc.seq_len * trainer.recipe.model.vocab_size * 4 <= TEACHER_CACHE_BYTES

        def teacher_loss(mb: dict[str, Tensor]) -> dict[str, Tensor]:
            with trainer.autocast():
                logits = self.teacher(mb["input_ids"])  # (b, T, V)
            if cache:
                mb["teacher_log_probs"] = F.log_softmax(logits.float(), dim=-1)
            return {"loss": lm_loss(logits, mb["labels"])}

        self.teacher_val_loss = trainer.evaluator.run(teacher_loss)["loss"]

    # -- what is trained --
    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        d, xs = self.config, batch["input_ids"]
        hidden = d.hidden_mse_weight > 0
        s_out = model(xs, return_states=hidden)
        s_logits, s_states = s_out if hidden else (s_out, None)  # (B, T, V), {"hidden": [(B, T, C), ...]}
        loss = torch.zeros((), device=s_logits.device)
        if self.teacher_runs:
            with torch.no_grad():
                t_out = self.teacher(xs, return_states=hidden)
            t_logits, t_states = t_out if hidden else (t_out, None)
        if d.kl_weight > 0:
            loss = loss + d.kl_weight * tempered_kl(s_logits, t_logits, d.temperature)
        if d.lm_weight > 0:
            loss = loss + d.lm_weight * lm_loss(s_logits, batch["labels"])
        if hidden:  # the last layer's output (B, T, C), before the final norm
            loss = loss + d.hidden_mse_weight * F.mse_loss(
                s_states["hidden"][-1].float(), t_states["hidden"][-1].float()
            )
        return loss, {}

    # -- evaluation --
    def val_metrics(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = model(batch["input_ids"])  # (b, T, V)
        teacher_lp = batch.get("teacher_log_probs")
        if teacher_lp is None:
            teacher_lp = F.log_softmax(self.teacher(batch["input_ids"]).float(), dim=-1)
        return {"val_loss": lm_loss(logits, batch["labels"]), "val_kl": kl_from_log_probs(logits, teacher_lp)}

    def finish_validation(self, values: dict[str, float], rows=None) -> dict[str, float]:
        val = {"val_loss": values["val_loss"], "val_ppl": perplexity(values["val_loss"]), "val_kl": values["val_kl"]}
        if not self._teacher_logged:  # the teacher's own numbers, once per process: the reference for val_ppl
            self._teacher_logged = True
            val.update(teacher_val_loss=self.teacher_val_loss, teacher_val_ppl=perplexity(self.teacher_val_loss))
        return val

    def summary(self, val_start: dict[str, float], val_end: dict[str, float], tokens: int) -> dict:
        teacher_ppl = perplexity(self.teacher_val_loss)
        return {
            "val_ppl_start": val_start["val_ppl"],
            "val_ppl": val_end["val_ppl"],
            "val_kl_start": val_start["val_kl"],
            "val_kl": val_end["val_kl"],
            "teacher": self.config.teacher,
            "teacher_params": self.teacher_params,
            "student_params": self.student_params,
            "teacher_val_loss": self.teacher_val_loss,
            "teacher_val_ppl": teacher_ppl,
            "ppl_ratio": val_end["val_ppl"] / teacher_ppl,
            # The teacher's forward passes on the training tokens, on top of the student's training FLOPs (none when
            # the loss needs no teacher: an LM-loss-only run).
            "teacher_flops": tokens * self.teacher_flops if self.teacher_runs else 0.0,
        }


def stop_rules(d: DistillConfig) -> tuple[StopRule, ...]:
    """distill.stop_kl and distill.plateau_* as stop rules on val_kl, in that order."""
    rules: list[StopRule] = []
    if d.stop_kl > 0:
        rules.append(Threshold("val_kl", d.stop_kl, name="stop_kl"))
    if d.plateau_patience > 0:
        rules.append(Plateau("val_kl", d.plateau_patience, d.plateau_min_delta))
    return tuple(rules)


def distill_trainer(recipe: Recipe, d: DistillConfig, resume: bool = False) -> Trainer:
    """The one loop set up to distil recipe's student from d.teacher."""
    check_distill_config(d, recipe.train.eval_every)
    return Trainer(
        recipe,
        objective=Distillation(d),
        stop_rules=stop_rules(d),
        resume=resume,
        sections={"distill": dataclasses.asdict(d)},
        resumable_keys=RESUMABLE_KEYS + DISTILL_RESUMABLE_KEYS,
    )
