"""Sequence classification and regression: the fine-tuning objective, and the model it trains.

Classification: cross-entropy of the classifier's logits (B, C) against the labels (B,). Regression (one output,
e.g. STS-B): mean squared error of that output against the float labels, as transformers does for num_labels == 1.
Validation logs val_loss (averaged over the batches) and, from every validation prediction at once: accuracy, macro
F1, Matthews correlation (and binary F1 with two classes), or Pearson and Spearman correlation for regression.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.metrics.classification import classification_scores
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.objectives.base import Batch, Objective


def _inputs(batch: Batch) -> dict[str, Tensor]:
    return {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}


class Classification(Objective):
    def __init__(self, kind: str, num_labels: int):
        super().__init__()
        if kind not in ("classification", "regression"):
            raise ValueError(f"kind {kind!r}")
        self.kind, self.num_labels = kind, num_labels

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.kind == "regression":
            return F.mse_loss(logits.float().squeeze(-1), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def forward(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self._loss(model(batch["input_ids"], **_inputs(batch)), batch["labels"]), {}

    def val_metrics(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return self.val_step(model, batch)[0]

    def val_step(self, model: nn.Module, batch: Batch) -> tuple[Batch, Batch]:
        logits = model(batch["input_ids"], **_inputs(batch))  # (B, C)
        rows = {"pred": logits.float(), "label": batch["labels"]}
        return {"val_loss": self._loss(logits, batch["labels"])}, rows

    def finish_validation(self, values: dict[str, float], rows: Batch | None = None) -> dict[str, float]:
        n = self.num_labels if self.kind == "classification" else 0
        scores = classification_scores(rows["pred"], rows["label"].tolist(), n)
        return {**values, **{f"val_{k}": v for k, v in scores.items()}}

    def summary(self, val_start: dict[str, float], val_end: dict[str, float], tokens: int) -> dict:
        return {k: v for k, v in val_end.items() if k.startswith(("val_", "test_"))}


def classifier_config(cfg: ModelConfig, num_labels: int, pad_token_id: int | None) -> ModelConfig:
    """The same body with a classification head of num_labels outputs: BERT's (pooler + biased linear), or a
    decoder's `score` (no bias) on the last non-padding token, which needs a pad id."""
    bert = cfg.family == "bert"
    return cfg.replace(
        head="classifier",
        num_labels=num_labels,
        classifier_bias=bert,
        pooler=bert,
        pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else pad_token_id,
    )


def model_for_task(path: str, num_labels: int, seed: int, new_head: bool) -> Transformer:
    """The checkpoint at `path` with a classifier head of num_labels: its own if it has one of that size; a fresh one
    (said in one line on stderr) when it has none (an LM or a bare encoder); a checkpoint whose classifier has
    another size is refused unless new_head. The checkpoint must carry its tokenizer (tasks are encoded with it);
    a decoder without a pad id takes the tokenizer's pad token, else its end-of-text token."""
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.io.checkpoints import read_checkpoint

    cfg, tensors, side = read_checkpoint(path)
    if "tokenizer.json" not in side:
        raise UserError(f"{path} carries no tokenizer.json: fine-tuning encodes the task with the model's own")
    tok = Tokenizer.from_files(side)
    pad_token_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if cfg.head == "classifier" and cfg.num_labels != num_labels and not new_head:
        raise UserError(
            f"{path} is a classifier with {cfg.num_labels} labels, the task has {num_labels} "
            "(set finetune.new_head: true to replace its head)"
        )
    target = classifier_config(cfg, num_labels, pad_token_id)
    if cfg.family != "bert" and target.pad_token_id is None:
        raise UserError(f"{path} names no pad token, which a decoder classifier needs to find each row's last token")
    model = Transformer(target)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    own = model.state_dict()
    kept = set()
    with torch.no_grad():
        for name, t in tensors:
            if name.startswith(("lm_head.", "classifier.")) and not (cfg.head == "classifier" and not new_head):
                continue  # a head of another kind or size: the fresh one stays
            if name in own:
                own[name].copy_(t)
                kept.add(name)
    fresh = sorted(n for n in own if n not in kept)
    if fresh:
        print(f"lmforge: fresh {', '.join(sorted({n.rsplit('.', 1)[0] for n in fresh}))} "
              f"for {num_labels} label(s) on {path}", file=sys.stderr)  # fmt: skip
    model.tokenizer_files = side
    return model
