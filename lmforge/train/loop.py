"""The one training loop: a laptop CPU, one GPU, or many GPUs under torchrun (DDP / FSDP2).

    recipe -> data, model (random or init_from), optimizer, schedule
    for step: accumulate micro-batches -> clip -> AdamW step -> log / eval / checkpoint
    -> final validation loss, samples, HF export, metrics.jsonl

A subclass changes what is trained without copying the loop (lmforge/distill.py does): `prepare` (its own
set-up, before anything is written), `compute_loss` (one micro-batch), `validate` (the evaluation's
metrics), `stop_reason` (end before the step budget), `run_config` / `extra_state` (what a checkpoint
records and a resume restores) and `summary_extra`.

Every rank draws the same global batch and keeps its slice of it, so N ranks compute exactly
what one process computes with the same global batch (tested on 2 CPU ranks with gloo).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from lmforge.data.tokens import BatchSampler, TokenDataset, check_tokenizer_matches
from lmforge.errors import UserError
from lmforge.metrics import runinfo
from lmforge.metrics.flops import flops_per_token, mfu
from lmforge.metrics.log import MetricsLogger, Throughput
from lmforge.model.generate import sample_text
from lmforge.model.transformer import Transformer, lm_loss
from lmforge.train import checkpoint, parallel
from lmforge.train.optim import lr_factor, make_optimizer
from lmforge.train.recipe import Recipe, TrainConfig


# ---- set-up helpers -----------------------------------------------------------------------------
def _precision(tc: TrainConfig, device: torch.device) -> torch.dtype:
    if tc.precision not in ("auto", "float32", "bfloat16"):
        raise UserError(f"train.precision must be auto, float32 or bfloat16, got {tc.precision!r}")
    if tc.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, tc.precision)


def _compile_enabled(tc: TrainConfig, device: torch.device) -> bool:
    if tc.compile not in ("auto", "true", "false"):
        raise UserError(f"train.compile must be auto, true or false, got {tc.compile!r}")
    return tc.compile == "true" or (tc.compile == "auto" and device.type == "cuda")


def _micro_batch(tc: TrainConfig, world: int) -> tuple[int, int]:
    """(per-rank micro-batch, accumulation steps) from the global batch."""
    if tc.batch_size % world:
        raise UserError(f"train.batch_size {tc.batch_size} is not divisible by the {world} ranks")
    per_rank = tc.batch_size // world
    micro = tc.micro_batch_size or per_rank
    if per_rank % micro:
        raise UserError(f"per-rank batch {per_rank} is not divisible by train.micro_batch_size {micro}")
    return micro, per_rank // micro


def build_model(recipe: Recipe) -> tuple[Transformer, Recipe]:
    """Random init from recipe.model, or the checkpoint named by train.init_from."""
    tc = recipe.train
    if tc.init_from:
        from lmforge.io.checkpoints import load

        model = load(tc.init_from)
        if model.config.head != "lm":
            raise UserError(f"{tc.init_from} has a {model.config.head!r} head; pre-training needs an LM head")
        recipe = replace(recipe, model=model.config)
    else:
        model = Transformer(recipe.model)
        model.init_weights(generator=torch.Generator().manual_seed(tc.seed))
    if recipe.model.position == "learned" and tc.seq_len > recipe.model.max_seq_len:
        raise UserError(f"train.seq_len {tc.seq_len} exceeds the model's max_seq_len {recipe.model.max_seq_len}")
    return model, recipe


# Recipe keys that may differ when a run is resumed (extending it, logging differently).
RESUMABLE_KEYS = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.ckpt_every",
    "train.keep_last",
    "train.sample_prompts",
    "train.sample_tokens",
    "train.export_hf",
    "train.compile",
    "train.device",
)


# ---- the loop ------------------------------------------------------------------------------------
class Trainer:
    resumable_keys: tuple[str, ...] = RESUMABLE_KEYS

    def __init__(self, recipe: Recipe, resume: bool = False):
        self.env = env = parallel.setup(recipe.train.device)
        tc = recipe.train
        self.out = Path(tc.out_dir)
        torch.manual_seed(tc.seed)

        self.train_data = TokenDataset(recipe.data.path, "train")
        self.val_data = TokenDataset(recipe.data.path, "val")
        model, recipe = build_model(recipe)
        check_tokenizer_matches(
            self.train_data.manifest, model.config.vocab_size, getattr(model, "tokenizer_files", None)
        )
        self.recipe, self.tc, self.oc = recipe, tc, recipe.optim
        self.micro, self.accum = _micro_batch(tc, env.world)
        self.dtype = _precision(tc, env.device)
        self.mode = parallel.resolve_mode(tc.parallel, env.world)
        self.flops = flops_per_token(recipe.model, tc.seq_len)

        model.to(env.device)
        self.model = model  # the plain module: its parameter names are the checkpoint's
        if _compile_enabled(tc, env.device):
            if self.mode == "fsdp":
                for block in model.layers:
                    block.compile()
            else:
                model.compile()
        fsdp_dtype = self.dtype if self.mode == "fsdp" and self.dtype != torch.float32 else None
        self.wrapped = parallel.parallelize(model, self.mode, env, param_dtype=fsdp_dtype)
        self.optimizer = make_optimizer(model, self.oc, fused=env.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.oc, tc.steps))
        self.sampler = BatchSampler(self.train_data, tc.batch_size, tc.seq_len, tc.seed)
        self.step = 0
        self.prepare()
        if resume:
            self._resume()
        elif self.out.exists() and any(self.out.iterdir()):
            raise UserError(f"output {self.out} already exists and is not empty (use --resume or another path)")
        parallel.barrier()
        if env.is_main:
            runinfo.write_run_info(self.out, self.run_config(), tc.seed)
        self.log = MetricsLogger(
            self.out, env.rank, total_steps=tc.steps, log_every=tc.log_every, start_step=self.step, device=env.device
        )

    # -- hooks for subclasses --
    def prepare(self) -> None:
        """A subclass's own set-up and checks: the model exists, nothing has been written yet."""

    def run_config(self) -> dict:
        """The config a checkpoint records and a resume must match (outside `resumable_keys`)."""
        return self.recipe.to_dict()

    def extra_state(self) -> dict:
        """JSON-able state beyond model / optimizer / data that a resume must restore."""
        return {}

    def load_extra_state(self, extra: dict) -> None:
        """Restore what extra_state() returned, on resume."""

    def compute_loss(self, xs: Tensor, ys: Tensor) -> Tensor:
        """The loss of one micro-batch xs, ys (B_micro, T) on this rank (the caller averages over accumulation)."""
        return lm_loss(self.wrapped(xs), ys)

    def validate(self) -> dict[str, float]:
        """The metrics of one evaluation, logged to metrics.jsonl; "val_loss" is required."""
        return {"val_loss": self.evaluate()}

    def stop_reason(self, step: int, val: dict[str, float] | None) -> str | None:
        """Why to end training now, after `step` (val: this step's evaluation, None if there was none);
        None: go on until train.steps. Must give the same answer on every rank (val is all-reduced)."""
        return None

    def summary_extra(self, val_start: dict[str, float], val_end: dict[str, float]) -> dict:
        """Keys a subclass adds to run()'s summary."""
        return {}

    # -- one optimizer step over the global batch --
    def _autocast(self):
        if self.dtype == torch.float32 or self.mode == "fsdp":  # FSDP casts parameters itself
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.dtype)

    def _rank_slice(self, x: Tensor) -> Tensor:
        return x[self.env.rank :: self.env.world].to(self.env.device, non_blocking=True)

    def train_step(self) -> tuple[float, float]:
        x, y = self.sampler.next_batch()  # (B_global, T) on every rank
        x, y = self._rank_slice(x), self._rank_slice(y)  # (B_global / world, T)
        loss_sum = torch.zeros((), device=self.env.device)
        for i in range(self.accum):
            xs, ys = x[i * self.micro : (i + 1) * self.micro], y[i * self.micro : (i + 1) * self.micro]
            last = i == self.accum - 1
            sync = contextlib.nullcontext() if last or self.mode != "ddp" else self.wrapped.no_sync()
            if self.mode == "fsdp":
                self.wrapped.set_requires_gradient_sync(last)
            with sync, self._autocast():
                loss = self.compute_loss(xs, ys) / self.accum
            loss.backward()
            loss_sum += loss.detach()
        gnorm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return parallel.all_reduce_mean(loss_sum).item(), gnorm

    def _clip(self) -> float:
        max_norm = self.oc.grad_clip if self.oc.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        return norm.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        self.wrapped.eval()
        total = torch.zeros((), device=self.env.device)
        batches = self.val_data.val_batches(self.tc.eval_batches, self.tc.batch_size, self.tc.seq_len)
        for x, y in batches:
            x, y = self._rank_slice(x), self._rank_slice(y)
            for i in range(0, x.shape[0], self.micro):
                with self._autocast():
                    loss = lm_loss(self.wrapped(x[i : i + self.micro]), y[i : i + self.micro])
                total += loss * (x[i : i + self.micro].shape[0] / x.shape[0])
        self.wrapped.train()
        return parallel.all_reduce_mean(total / len(batches)).item()

    # -- checkpoints --
    def _state(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (
            get_model_state_dict(self.model, options=opts),
            get_optimizer_state_dict(self.model, self.optimizer, options=opts),
        )

    def save(self) -> None:
        model_state, optim_state = self._state()  # collective under FSDP: every rank calls it
        if self.env.is_main:
            checkpoint.save_checkpoint(
                self.out,
                self.step,
                model_state=model_state,
                optimizer_state=optim_state,
                scheduler_state=self.scheduler.state_dict(),
                sampler_state=self.sampler.state_dict(),
                rng_state=checkpoint.rng_state(),
                config=self.run_config(),
                keep_last=self.tc.keep_last,
                extra=self.extra_state(),
            )
        parallel.barrier()

    def _resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = checkpoint.load_checkpoint(self.out, expected_config=self.run_config(), ignore=self.resumable_keys)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
        self.load_extra_state(state["extra"])

    # -- the run --
    def _log_eval(self, val: dict[str, float]) -> None:
        tokens = self.step * self.tc.batch_size * self.tc.seq_len
        self.log.log_eval(self.step, tokens, tokens * self.flops["total"], **val)

    def run(self) -> dict:
        """Train until train.steps or until stop_reason() says otherwise; the summary's "stopped_by" says which
        ("budget" when the steps ran out)."""
        tc, env = self.tc, self.env
        tokens_per_step = tc.batch_size * tc.seq_len
        val0 = self.validate()
        self._log_eval(val0)
        # A fresh run may already meet its goal; a resumed one judged its last evaluation before the save.
        stopped_by = self.stop_reason(self.step, val0) if self.step == 0 else None
        val = val0 if stopped_by is not None else None  # the evaluation of the step training ended at, if any
        timer = Throughput()
        while stopped_by is None and self.step < tc.steps:
            t0 = time.perf_counter()
            loss, gnorm = self.train_step()
            timer.update(tokens_per_step, time.perf_counter() - t0)
            tokens = self.step * tokens_per_step
            self.log.log_step(
                step=self.step,
                tokens=tokens,
                flops=tokens * self.flops["total"],
                loss=loss,
                lr=self.scheduler.get_last_lr()[0],
                grad_norm=gnorm,
                tokens_per_s=timer.tokens_per_s,
                mfu=mfu(self.flops["total"], timer.tokens_per_s, env.device, self.dtype, env.world),
            )
            val = None
            if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                val = self.validate()
                self._log_eval(val)
            stopped_by = self.stop_reason(self.step, val)
            if stopped_by is None and tc.ckpt_every and self.step % tc.ckpt_every == 0 and self.step < tc.steps:
                self.save()
        if stopped_by is None or val is None:
            val = self.validate()
            self._log_eval(val)
        tokens = self.step * tokens_per_step
        self.save()
        samples = self.finish()
        summary = {
            "steps": self.step,
            "tokens": tokens,
            "flops": tokens * self.flops["total"],
            "val_loss_start": val0["val_loss"],
            "val_loss": val["val_loss"],
            "stopped_by": stopped_by or "budget",
            "samples": samples,
            "out_dir": str(self.out),
            **self.summary_extra(val0, val),
        }
        self.log.close()
        return summary

    def finish(self) -> list[str]:
        """Gather the full model on rank 0 as a plain module: sample text, export to HF."""
        model_state, _ = self._state()
        if not self.env.is_main:
            return []
        final = Transformer(self.recipe.model)
        final.load_state_dict(model_state)
        final.eval()
        tok_files = self.train_data.tokenizer_files
        final.tokenizer_files = tok_files
        samples = sample_text(final, tok_files, self.tc.sample_prompts, self.tc.sample_tokens, self.tc.seed)
        for prompt, text in zip(self.tc.sample_prompts, samples):
            self.log.write(f"sample | {prompt!r} -> {text!r}")
        if self.tc.export_hf:
            from lmforge.io.checkpoints import export_hf

            export_hf(final, self.out / "final", overwrite=True)
        return samples
