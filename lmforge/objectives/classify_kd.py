"""Knowledge distillation of a sequence classifier: hard labels, soft targets, features, and uncertainty.

    loss = ce_weight * CE(student, labels)
         + kd_weight * T^2 * KL(teacher_T || student_T)           [per example x (1 - H(teacher)/log K) if teacher-
                                                                    uncertainty weighting is on]
         + feature_weight * mean over mapped layers of the feature loss of student layer i against teacher layer
           layer_map[i] (through a learned projection when the widths differ):
               plain:                 MSE(f_s, f_t)
               student uncertainty:   0.5 * exp(-s) * MSE(f_s, f_t) + 0.5 * s,  s = a log-variance predicted per
                                      example from the student's first-token features (Huang et al. 2023)

Each term is a pure function below, tested on hand-checkable tensors. The log-variance is clamped to [-8, 8]: the
0.5 * s term already stops s from growing without bound, but as the MSE goes to 0 the optimum s = log(MSE) runs to
-inf and exp(-s) overflows bfloat16 long before; 8 nats either way is far beyond any variance ratio seen in practice.
The teacher is frozen and kept outside the module tree (not trained, not saved); the projections and the
uncertainty head are this objective's parameters, trained with the student and saved in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.objectives.classify import Classification, _inputs

LOG_VAR_LIMIT = 8.0


def soft_target_loss(student: Tensor, teacher: Tensor, temperature: float, weights: Tensor | None = None) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), per example then averaged (weighted if given)."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_example = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2  # (B,)
    if weights is None:
        return per_example.mean()
    return (per_example * weights).sum() / weights.sum().clamp_min(1e-12)


def teacher_confidence(teacher: Tensor) -> Tensor:
    """1 - H(p_teacher) / log K per example, in [0, 1]: 1 for a one-hot teacher, 0 for a uniform one."""
    logp = F.log_softmax(teacher.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return 1.0 - entropy / math.log(teacher.shape[-1])


def feature_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per example (B,): the mean squared difference over its real tokens (mask (B, T), 1 = token) and channels."""
    sq = (student.float() - teacher.float()).pow(2).mean(-1)  # (B, T)
    if mask is None:
        return sq.mean(-1)
    m = mask.float()
    return (sq * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def uncertainty_feature_loss(mse: Tensor, log_var: Tensor) -> Tensor:
    """mean over examples of 0.5 * exp(-s) * mse + 0.5 * s; mse and log_var (B,), s clamped to +-LOG_VAR_LIMIT."""
    s = log_var.float().clamp(-LOG_VAR_LIMIT, LOG_VAR_LIMIT)
    return (0.5 * torch.exp(-s) * mse + 0.5 * s).mean()


@dataclass(frozen=True)
class KDConfig:
    teacher: str = ""  # a fine-tuned classifier of the same task and tokenizer
    temperature: float = 2.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    feature_weight: float = 0.0
    layer_map: tuple[int, ...] = ()  # teacher layer of each student layer's feature target; () = evenly spaced
    uncertainty: str = "none"  # none | student (log-variance head on features) | teacher (entropy-weighted KD)
    freeze: tuple[str, ...] = ()  # glob patterns of student parameters kept frozen, e.g. "layers.*.attn.*"


class ClassifierDistillation(Classification):
    """The KD loss above for training; validation scores the student like fine-tuning does."""

    def __init__(self, kind: str, num_labels: int, config: KDConfig, teacher: nn.Module, student_cfg, layer_map):
        super().__init__(kind, num_labels)
        if config.uncertainty not in ("none", "student", "teacher"):
            raise UserError(f"kd.uncertainty must be none, student or teacher, got {config.uncertainty!r}")
        if kind != "classification" and (config.kd_weight or config.uncertainty == "teacher"):
            raise UserError("soft targets need a classification task; for regression use only the feature loss")
        self.config, self.layer_map = config, list(layer_map)
        self._teacher = [teacher.eval().requires_grad_(False)]  # a list: outside the module tree, never saved
        Cs, Ct = student_cfg.hidden_size, teacher.config.hidden_size
        n = len(self.layer_map) if config.feature_weight else 0
        self.projections = nn.ModuleList(nn.Linear(Cs, Ct, bias=False) for _ in range(n if Cs != Ct else 0))
        self.log_var = nn.Linear(Cs, 1) if config.uncertainty == "student" and n else None

    def prepare(self, trainer) -> None:
        self._teacher[0].to(trainer.env.device)

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        c, inputs = self.config, _inputs(batch)
        logits, states = model(batch["input_ids"], **inputs, return_states=True)
        with torch.no_grad():
            t_logits, t_states = self._teacher[0](batch["input_ids"], **inputs, return_states=True)
        metrics: dict[str, Tensor] = {}
        loss = torch.zeros((), device=logits.device)
        if c.ce_weight:
            metrics["ce"] = self._loss(logits, batch["labels"])
            loss = loss + c.ce_weight * metrics["ce"]
        if c.kd_weight:
            weights = teacher_confidence(t_logits) if c.uncertainty == "teacher" else None
            metrics["kd"] = soft_target_loss(logits, t_logits, c.temperature, weights)
            loss = loss + c.kd_weight * metrics["kd"]
        if c.feature_weight:
            terms = []
            for i, j in enumerate(self.layer_map):
                f_s, f_t = states["hidden"][i + 1], t_states["hidden"][j + 1]  # block outputs
                if self.projections:
                    f_s = self.projections[i](f_s)
                mse = feature_mse(f_s, f_t, batch.get("attention_mask"))  # (B,)
                if self.log_var is not None:
                    s = self.log_var(states["hidden"][i + 1][:, 0]).squeeze(-1)  # (B,) from the first token
                    terms.append(uncertainty_feature_loss(mse, s))
                else:
                    terms.append(mse.mean())
            metrics["feature"] = torch.stack(terms).mean()
            loss = loss + c.feature_weight * metrics["feature"]
        return loss, {k: v.detach() for k, v in metrics.items()}
