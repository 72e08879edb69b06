"""Trace-supervised fine-tuning: the trace and the response both drive the update, and both are scored by generation.

Training loss: next-token cross-entropy of every token, weighted by the span it belongs to (train/trace_task.py:
query, trace, response), divided by the summed weights of the batch's tokens. With the default weights (query 0,
trace 1, response 1) that is the mean loss over the trace and response tokens. loss_trace and loss_response (the
plain mean over each span's tokens) are logged beside it.

Validation: the same losses (val_loss, val_loss_trace, val_loss_response), then, with `generate`, every validation
query is answered by greedy decoding (at most max_new_tokens) and scored against the truth (tasks/traces.py):
val_answer_acc (exact final answer), val_answered (the fraction that wrote an answer line at all), val_trace_values
(the fraction of the true trace's numbers written at their place) and val_trace_similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.objectives.base import Batch, Objective
from lmforge.tasks.traces import TraceExample, score_generation
from lmforge.train.trace_task import RESPONSE, TRACE, TraceTemplate


@dataclass(frozen=True)
class SpanWeights:
    query: float = 0.0
    trace: float = 1.0
    response: float = 1.0

    def tensor(self) -> Tensor:
        return torch.tensor([self.query, self.trace, self.response, 0.0])  # index -1 (no target) -> 0


def span_losses(logits: Tensor, labels: Tensor, spans: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(weighted mean loss, per-token losses (B, T)) for logits (B, T, V), labels and spans (B, T)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    ce = ce.view_as(labels)  # (B, T), 0 where there is no target
    w = weights.to(ce.device)[spans]  # spans -1 picks the last entry, 0
    return (ce * w).sum() / w.sum().clamp_min(1e-12), ce


def _span_mean(ce: Tensor, spans: Tensor, span: int) -> Tensor:
    mask = spans == span
    return (ce * mask).sum() / mask.sum().clamp_min(1)


class TraceSupervision(Objective):
    def __init__(
        self,
        weights: SpanWeights,
        template: TraceTemplate,
        scored: dict[int, list[TraceExample]],
        with_trace: bool,
        max_new_tokens: int,
        generate: bool = True,
    ):
        super().__init__()
        self.weights, self.template, self.scored = weights.tensor(), template, scored
        self.with_trace, self.max_new_tokens, self.generate = with_trace, max_new_tokens, generate

    def forward(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["input_ids"], segment_ids=batch.get("segment_ids"))  # (B, T, V)
        loss, ce = span_losses(logits, batch["labels"], batch["spans"], self.weights)
        metrics = {"loss_response": _span_mean(ce.detach(), batch["spans"], RESPONSE)}
        if self.with_trace:
            metrics["loss_trace"] = _span_mean(ce.detach(), batch["spans"], TRACE)
        return loss, metrics

    def val_metrics(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return self.val_step(model, batch)[0]

    def val_step(self, model: nn.Module, batch: Batch) -> tuple[Batch, Batch | None]:
        logits = model(batch["input_ids"])
        loss, ce = span_losses(logits, batch["labels"], batch["spans"], self.weights)
        values = {"val_loss": loss, "val_loss_response": _span_mean(ce, batch["spans"], RESPONSE)}
        if self.with_trace:
            values["val_loss_trace"] = _span_mean(ce, batch["spans"], TRACE)
        if not self.generate:
            return values, None
        new = write_completions(model, batch["prompt_ids"], self.max_new_tokens, self.template.eos_id)
        return values, {"index": batch["index"], "split": batch["split"], "generated": new}

    def finish_validation(self, values: dict[str, float], rows: Batch | None = None) -> dict[str, float]:
        if not rows:
            return values
        examples = self.scored[int(rows["split"][0])]
        tok = self.template.tok
        texts = [tok.decode([t for t in row if t >= 0], skip_special_tokens=True) for row in rows["generated"].tolist()]
        scores = [score_generation(examples[i], text) for i, text in zip(rows["index"].tolist(), texts)]
        mean = lambda key: sum(s[key] for s in scores) / len(scores)  # noqa: E731
        out = {**values, "val_answer_acc": mean("answer"), "val_answered": mean("answered")}
        if self.with_trace:
            out |= {"val_trace_values": mean("trace_values"), "val_trace_similarity": mean("trace_similarity")}
        return out

    def summary(self, val_start: dict[str, float], val_end: dict[str, float], tokens: int) -> dict:
        return {k: v for k, v in val_end.items() if k.startswith(("val_", "test_"))}


def write_completions(model: nn.Module, prompts: Tensor, max_new_tokens: int, eos_id: int | None,
                       temperature: float = 0.0, generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """What the model writes after each prompt (B, Tq) of one length: (B, max_new_tokens) ids, -1 after the end-of-text
    token (which is dropped) or past what was written. Rows decode in lockstep until the last one ends."""
    from lmforge.model.generate import generate

    plain = getattr(model, "module", model)  # DDP keeps the model in .module; generation needs no gradient sync
    ids = generate(plain, prompts, max_new_tokens, temperature=temperature, eos_id=eos_id, generator=generator)
    new = ids[:, prompts.shape[1] :].cpu()
    out = torch.full((prompts.shape[0], max_new_tokens), -1, dtype=torch.long)
    out[:, : new.shape[1]] = new
    if eos_id is not None:
        ended = (out == eos_id).long().cumsum(1) > 0  # the end token and everything after it
        out = out.masked_fill(ended, -1)
    return out
