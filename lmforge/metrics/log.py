"""The run's metrics log: JSON lines, one console line every N steps, a progress bar; tokens/s."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from collections import deque
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from lmforge.io.atomic import atomic_write_bytes


# ---- throughput, MFU and memory -------------------------------------------------------------------
class Throughput:
    """Tokens/s over the last `window` steps, leaving out the first `warmup` steps (torch.compile,
    allocator and cache warm-up). The caller times only the training step, so evaluation and
    checkpoint pauses never count."""

    def __init__(self, window: int = 20, warmup: int = 2):
        self.warmup = warmup
        self.steps = 0
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds) per step

    def update(self, tokens: int, seconds: float) -> None:
        """One step processed `tokens` tokens (all ranks) in `seconds` of wall time."""
        self.steps += 1
        if self.steps > self.warmup:
            self.samples.append((tokens, seconds))

    @property
    def tokens_per_s(self) -> float | None:
        """None until a step past the warm-up has been timed."""
        seconds = sum(s for _, s in self.samples)
        return sum(n for n, _ in self.samples) / seconds if self.samples and seconds > 0 else None


def memory_gb(device: torch.device | str | None = None) -> float:
    """Peak GPU memory allocated by PyTorch on a CUDA device, else the process's peak RSS, in GB (1e9)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


# ---- the run's log --------------------------------------------------------------------------------
def _fmt_lr(lr: float) -> str:
    mantissa, exp = f"{lr:.1e}".split("e")  # '5.9e-04' -> '5.9e-4'
    return f"{mantissa}e{int(exp)}"


def _json_value(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN / inf
    return x


class MetricsLogger:
    """Rank 0 appends one JSON object per record to run_dir/metrics.jsonl (flushed at once), prints
    a console line every `log_every` steps and drives a tqdm bar; on other ranks every call is a no-op.

    Step records: step, tokens and flops (cumulative, all ranks), loss, val_loss (only when given),
    lr, grad_norm, tokens_per_s (all ranks), mfu (0..1 or null), mem (GB: peak CUDA memory on a GPU,
    peak process RSS on CPU), plus any extra keyword fields. Eval records: step, tokens, flops,
    val_loss, extras. Pass start_step when resuming: lines of later steps that the interrupted run
    left behind are then dropped, so the file reads as one trajectory (without it, lines are only appended)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        rank: int = 0,
        *,
        total_steps: int | None = None,
        log_every: int = 10,
        start_step: int | None = None,
        device: torch.device | str | None = None,
        progress: bool | None = None,
        stream: TextIO | None = None,
    ):
        self.enabled = rank == 0
        self.total_steps, self.log_every, self.start_step = total_steps, max(1, log_every), start_step
        self.device, self.stream = device, stream
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self._bar = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step is not None:
            self._drop_after(start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the logger
        if progress is None:  # a bar only for a person watching; CI logs get the plain lines
            progress = sys.stderr.isatty()
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step or 0, unit="step", dynamic_ncols=True)

    def _drop_after(self, step: int) -> None:
        """Keep only complete lines of earlier steps and the training and event lines of `step` itself (a crash can
        also leave a torn last line): the resumed run logs its evaluation at `step` again, every later line once."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)):
                continue
            if rec["step"] < step or (rec["step"] == step and (rec.get("loss") is not None or "event" in rec)):
                kept.append(line + "\n")
        atomic_write_bytes(self.path, "".join(kept).encode())

    def log_step(
        self,
        step: int,
        *,
        tokens: int,
        flops: float | None,
        loss: float | None,
        lr: float | None,
        grad_norm: float | None = None,
        tokens_per_s: float | None = None,
        mfu: float | None = None,
        val_loss: float | None = None,
        **extra: Any,
    ) -> dict | None:
        """Record training step `step` (after its optimizer step). Returns the record on rank 0."""
        if not self.enabled:
            return None
        rec: dict[str, Any] = {"step": step, "tokens": tokens, "flops": flops, "loss": loss}
        if val_loss is not None:
            rec["val_loss"] = val_loss
        rec.update(lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s, mfu=mfu, mem=memory_gb(self.device))
        rec = self._write({**rec, **extra})
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if rec["loss"] is not None:
                self._bar.set_postfix_str(f"loss {rec['loss']:.3f}", refresh=False)
        first = step == (self.start_step or 0) + 1
        last = self.total_steps is not None and step >= self.total_steps
        if first or last or step % self.log_every == 0 or val_loss is not None:
            self.write(self.format_line(rec))
        return rec

    def log_eval(self, step: int, tokens: int, flops: float | None, val_loss: float, **extra: Any) -> dict | None:
        """Record an evaluation at `step` (no training loss); always printed."""
        if not self.enabled:
            return None
        rec = self._write({"step": step, "tokens": tokens, "flops": flops, "val_loss": val_loss, **extra})
        self.write(self.format_line(rec))
        return rec

    def log_event(self, step: int, tokens: int, flops: float | None, event: str, **extra: Any) -> dict | None:
        """Record an event of the run after step `step` (e.g. "untie"); always printed."""
        if not self.enabled:
            return None
        rec = self._write({"step": step, "tokens": tokens, "flops": flops, "event": event, **extra})
        details = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items() if v is not None
        )
        self.write(f"step {step} | {event}" + (f" ({details})" if details else ""))
        return rec

    def format_line(self, rec: dict) -> str:
        """`step 120/2000 | loss 3.812 | lr 5.9e-4 | gnorm 0.84 | 1,204 tok/s | mfu 41.2% | mem 2.1 GB`"""
        total = f"/{self.total_steps}" if self.total_steps is not None else ""
        parts = [f"step {rec['step']}{total}"]
        if rec.get("loss") is not None:
            parts.append(f"loss {rec['loss']:.3f}")
        if rec.get("val_loss") is not None:
            parts.append(f"val_loss {rec['val_loss']:.3f}")
        if rec.get("val_ppl") is not None:  # distillation's evaluations (objectives/distill.py)
            parts.append(f"val_ppl {rec['val_ppl']:.2f}")
        if rec.get("val_kl") is not None:
            parts.append(f"val_kl {rec['val_kl']:.4f}")
        if rec.get("teacher_val_ppl") is not None:
            parts.append(f"teacher_ppl {rec['teacher_val_ppl']:.2f}")
        # fine-tuning; trace SFT's generation scores; multi-task's average score; eval_test
        for key in ("val_accuracy", "val_f1", "val_mcc", "val_pearson", "val_answer_acc", "val_trace_values",
                    "val_answered", "val_score", "test_loss", "test_answer_acc"):  # fmt: skip
            if rec.get(key) is not None:
                parts.append(f"{key} {rec[key]:.4f}")
        if rec.get("lr") is not None:
            parts.append(f"lr {_fmt_lr(rec['lr'])}")
        if rec.get("grad_norm") is not None:
            parts.append(f"gnorm {rec['grad_norm']:.2f}")
        if rec.get("tokens_per_s") is not None:
            parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
        if rec.get("mfu") is not None:
            parts.append(f"mfu {100 * rec['mfu']:.1f}%")
        if rec.get("mem") is not None:
            parts.append(f"mem {rec['mem']:.1f} GB")
        return " | ".join(parts)

    def write(self, message: str) -> None:
        """A console line on rank 0 that does not break the progress bar."""
        if self.enabled:
            tqdm.write(message, file=self.stream)

    def _write(self, rec: dict) -> dict:
        rec = {k: _json_value(v) for k, v in rec.items()}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        return rec

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
