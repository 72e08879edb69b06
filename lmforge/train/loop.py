"""The one training loop: a laptop CPU, one GPU, or many GPUs under torchrun (DDP / FSDP2).

    recipe, task, objective, stop rules -> model (random or train.init_from), optimizer, schedule
    for step: accumulate micro-batches -> clip -> AdamW step -> log / evaluate / stop? / checkpoint
    -> final evaluation, checkpoint, samples, HF export, metrics.jsonl, summary

What is trained is not the loop's business: a task (train/task.py) says what a batch is, an objective
(objectives/base.py) turns a batch into a loss and metrics, the evaluator (train/evaluate.py) averages the
objective's validation metrics, and stop rules (train/stop.py) may end the run before train.steps. The loop keeps
what it guarantees once for all of them: exact resume (model, optimizer, objective, schedule, data position, stop
rules, RNG), N ranks computing what one process computes with the same global batch (tested on 2 CPU ranks with
gloo), atomic checkpoints, the metrics log and the FLOPs count.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.errors import Diverged, Interrupted, UserError, warn
from lmforge.metrics import runinfo
from lmforge.metrics.flops import flops_per_token, mfu
from lmforge.metrics.log import MetricsLogger, Throughput
from lmforge.metrics.report import write_run_report
from lmforge.model.generate import sample_text
from lmforge.model.transformer import Transformer
from lmforge.objectives.base import Objective
from lmforge.objectives.lm import LanguageModelling
from lmforge.train import checkpoint, parallel
from lmforge.train.evaluate import Evaluator, micro_batches, rows_of_rank
from lmforge.train.optim import lr_factor, make_optimizer
from lmforge.train.recipe import Recipe, TrainConfig
from lmforge.train.sharing import LayerSharing, ShareConfig
from lmforge.train.stop import StopRule
from lmforge.train.task import TokenWindows


# ---- set-up helpers -----------------------------------------------------------------------------
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16 or AMX tiles) and this PyTorch build
    can use them through oneDNN. Elsewhere a bfloat16 matmul is emulated and slower than float32."""
    flags = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return torch.backends.mkldnn.is_available() and any(f is not None and f() for f in flags)


# Below this width a CPU step is dominated by work bf16 does not speed up (casts, norms, softmax, the optimizer), and
# autocast's casts make it slower than float32 (bench/precision_by_width.py; bench/RESULTS.md, issue 14).
CPU_BF16_MIN_WIDTH = 192


def precision(setting: str, device: torch.device, hidden_size: int | None = None) -> torch.dtype:
    """The autocast dtype of train.precision: auto is bfloat16 on a GPU, and on a CPU with native bfloat16 matmuls for
    models at least CPU_BF16_MIN_WIDTH wide; float32 elsewhere. Master weights, optimizer state and losses stay
    float32 either way."""
    if setting not in ("auto", "float32", "bfloat16"):
        raise UserError(f"train.precision must be auto, float32 or bfloat16, got {setting!r}")
    if setting == "auto":
        wide = hidden_size is None or hidden_size >= CPU_BF16_MIN_WIDTH
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16() and wide)
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, setting)


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


def model_for_recipe(recipe: Recipe, head: str = "lm") -> tuple[Transformer, Recipe]:
    """Random init from recipe.model, or the checkpoint named by train.init_from (whose config replaces the model
    section); `head` is the head the task trains."""
    tc = recipe.train
    if tc.init_from:
        from lmforge.io.checkpoints import load

        model = load(tc.init_from)
        if model.config.head != head:
            raise UserError(f"{tc.init_from} has a {model.config.head!r} head; this task trains a {head!r} head")
        recipe = replace(recipe, model=model.config)
    else:
        model = Transformer(recipe.model)
        model.init_weights(generator=torch.Generator().manual_seed(tc.seed))
    # A fresh model must cover its training length (an export would declare the smaller max_position_embeddings);
    # a checkpoint with RoPE may be trained beyond its recorded length, learned positions never.
    fresh = not tc.init_from
    if (fresh or recipe.model.position == "learned") and tc.seq_len > recipe.model.max_seq_len:
        raise UserError(
            f"train.seq_len {tc.seq_len} exceeds the model's max_seq_len {recipe.model.max_seq_len}"
            + (": raise model.max_seq_len" if fresh else "")
        )
    if tc.seq_len > recipe.model.max_seq_len:  # RoPE trained longer: the export declares the length trained at
        warn(f"train.seq_len {tc.seq_len} is beyond {tc.init_from}'s max_seq_len {recipe.model.max_seq_len}: "
             f"the trained model declares {tc.seq_len}")  # fmt: skip
        model.config = recipe.model.replace(max_seq_len=tc.seq_len)
        recipe = replace(recipe, model=model.config)
    return model, recipe


# Recipe keys that may differ when a run is resumed (extending it, logging differently, the folder moved).
RESUMABLE_KEYS = (
    "train.steps",
    "train.out_dir",
    "train.max_bad_steps",
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
    """Train the recipe's model (or `model`, built by the caller) on `task` (default: token windows of
    recipe.data.path) for `objective` (default: language modelling), until train.steps or the first of `stop_rules`
    that fires. `sections` are config sections beyond the recipe's own (e.g. {"distill": {...}}): recorded in every
    checkpoint and checked on resume, except for `resumable_keys`, which a resumed run may change. `share` trains
    groups of layers as shared units until its untie condition holds (train/sharing.py); it is recorded as the
    "share" section."""

    def __init__(
        self,
        recipe: Recipe,
        task=None,
        objective: Objective | None = None,
        stop_rules: tuple[StopRule, ...] = (),
        resume: bool = False,
        sections: dict | None = None,
        resumable_keys: tuple[str, ...] = RESUMABLE_KEYS,
        model: Transformer | None = None,
        share: ShareConfig | None = None,
    ):
        self.env = env = parallel.setup(recipe.train.device)
        tc = recipe.train
        self.out = Path(tc.out_dir)
        torch.manual_seed(tc.seed)

        self.task = task = task if task is not None else TokenWindows(recipe.data.path, tc)
        if model is None:
            model, recipe = model_for_recipe(recipe, task.head)
            eos = getattr(task, "eos_id", None)
            if not tc.init_from and eos is not None and recipe.model.eos_token_id is None:
                # the data's end-of-text token, so an export tells transformers' generate where to stop
                model.config = recipe.model.replace(eos_token_id=eos)
                recipe = replace(recipe, model=model.config)
        else:  # built by the caller (e.g. a checkpoint given a new head): its config is the run's
            recipe = replace(recipe, model=model.config)
        task.check_model(model)
        self.sharing = None
        sections = dict(sections or {})
        if share is not None and share.groups != "none":
            self.sharing = LayerSharing(share, model.config.num_layers, tc.steps)
            # the copies start equal; a resumed run's checkpoint then brings its tied (or untied) weights
            model.load_state_dict(self.sharing.tie(model.state_dict()))
            sections["share"] = asdict(share)
        self.recipe, self.tc, self.oc = recipe, tc, recipe.optim
        self.sections, self.resumable_keys = sections, resumable_keys
        self.micro, self.accum = _micro_batch(tc, env.world)
        self.dtype = precision(tc.precision, env.device, recipe.model.hidden_size)
        if tc.max_bad_steps < 1:
            raise UserError(f"train.max_bad_steps must be >= 1, got {tc.max_bad_steps}")
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
        self.objective = objective = (objective if objective is not None else LanguageModelling()).to(env.device)
        self.optimizer = make_optimizer(model, self.oc, fused=env.device.type == "cuda", extra=objective)
        # What the optimizer's state is named after in checkpoints: the model, and the objective beside it when it
        # has parameters of its own (torch's state-dict API names every optimized parameter by a module path).
        has_own = any(True for _ in objective.parameters())
        self.optimized = nn.ModuleDict({"model": model, "objective": objective}) if has_own else model
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.oc, tc.steps))
        # A task may evaluate in micro-batches of its own size (no gradients kept: generation gains from wide batches).
        eval_micro = getattr(task, "eval_micro", None) or self.micro
        self.evaluator = Evaluator(task.val_batches(), eval_micro, env)
        # The test split is scored beside validation only when asked (train.eval_test): for the claim, never to tune.
        self.test_evaluator = Evaluator(task.val_batches("test"), eval_micro, env) if tc.eval_test else None
        self.stop_rules = tuple(stop_rules)
        self.step = 0
        self.tokens_seen, self.flops_seen = 0, 0.0  # summed batch by batch when batches differ in shape
        self.bad_steps, self.skipped_steps = 0, 0  # consecutive / all steps skipped for a non-finite loss or gradient
        self.signal_received: int | None = None  # SIGTERM / SIGINT: checkpoint at the end of the step, then stop
        objective.prepare(self)
        if resume and checkpoint.find_latest(self.out) is None:  # killed before its first checkpoint was complete
            if env.is_main:
                print(f"lmforge: no complete checkpoint in {self.out}: starting the run from the beginning", flush=True)
        elif resume:
            self._resume()
        elif self.out.exists() and any(self.out.iterdir()):
            raise UserError(f"output {self.out} already exists and is not empty (use --resume or another path)")
        parallel.barrier()
        if env.is_main:
            runinfo.write_run_info(self.out, self.run_config(), tc.seed)
        self.log = MetricsLogger(
            self.out, env.rank, total_steps=tc.steps, log_every=tc.log_every, start_step=self.step, device=env.device
        )

    def run_config(self) -> dict:
        """The config a checkpoint records and a resume must match (outside `resumable_keys`)."""
        return {**self.recipe.to_dict(), **self.sections}

    # -- one optimizer step over the global batch --
    def autocast(self):
        if self.dtype == torch.float32 or self.mode == "fsdp":  # FSDP casts parameters itself
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.dtype)

    def train_step(self) -> tuple[float, float, dict[str, float]]:
        """One optimizer step: (mean loss, grad norm, the objective's training metrics averaged likewise)."""
        env = self.env
        batch = self.task.next_batch()
        if not self.task.fixed_shape:
            rows, T = self.task.batch_tokens(batch)
            self.tokens_seen += rows * T
            self.flops_seen += rows * T * flops_per_token(self.recipe.model, T)["total"]
        batch = rows_of_rank(batch, env.rank, env.world, env.device)  # (B_global / world, ...)
        loss_sum = torch.zeros((), device=env.device)
        metric_sums: dict[str, Tensor] = {}
        parts = micro_batches(batch, self.micro)
        for i, mb in enumerate(parts):
            last = i == len(parts) - 1
            sync = contextlib.nullcontext() if last or self.mode != "ddp" else self.wrapped.no_sync()
            if self.mode == "fsdp":
                self.wrapped.set_requires_gradient_sync(last)
            with sync, self.autocast():
                loss, metrics = self.objective(self.wrapped, mb)
                loss = loss / self.accum
            loss.backward()
            loss_sum += loss.detach()
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value.detach() / self.accum
        parallel.all_reduce_grads(self.objective.parameters())  # DDP / FSDP sync the model's gradients, not these
        if self.sharing is not None:  # tied layers: every copy gets the group's mean gradient
            self.sharing.after_backward(self.model, self.step + 1)
        gnorm = self._clip()
        loss = parallel.all_reduce_mean(loss_sum).item()
        # A non-finite loss or gradient (the same on every rank: both are global) would poison the weights and the
        # AdamW moments: the update is skipped, the step still counts (its batch is spent, the schedule moves on).
        finite = math.isfinite(loss) and math.isfinite(gnorm)
        if finite:
            self.optimizer.step()
        self.bad_steps = 0 if finite else self.bad_steps + 1
        self.skipped_steps += not finite
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = {name: parallel.all_reduce_mean(v).item() for name, v in metric_sums.items()}
        return loss, gnorm, metrics

    def _clip(self) -> float:
        """Clip the gradients to optim.grad_clip; return their norm (over every set). A model whose parameter sets
        learn from separate losses (PSP++'s held-out heads) has each set clipped by its own norm, so one loss's
        large gradients never shrink the other set's step."""
        max_norm = self.oc.grad_clip if self.oc.grad_clip > 0 else float("inf")
        separate = getattr(self.model, "separate_parameter_sets", list)()
        apart = {id(p) for params in separate for p in params}
        rest = [p for p in self.model.parameters() if id(p) not in apart]
        sets = [[*rest, *self.objective.parameters()], *separate]
        norms = []
        for params in sets:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
                norm = norm.full_tensor()
            norms.append(norm.item())
        return norms[0] if len(norms) == 1 else math.sqrt(sum(n * n for n in norms))

    def validate(self) -> dict[str, float]:
        """The objective's validation metrics averaged over the task's validation batches (all ranks), then the same
        metrics on the test split as test_* when train.eval_test is on."""
        self.wrapped.eval()
        step = lambda mb: self.objective.val_step(self.wrapped, mb)  # noqa: E731
        with self.autocast():
            val = self.objective.finish_validation(*self.evaluator.run_with_rows(step))
            test = {}
            if self.test_evaluator is not None:
                test = self.objective.finish_validation(*self.test_evaluator.run_with_rows(step))
        self.wrapped.train()
        return {**val, **{k.replace("val_", "test_", 1): v for k, v in test.items() if k.startswith("val_")}}

    def progress(self) -> tuple[int, float]:
        """(tokens, training FLOPs) so far: from the step count when every batch has the same shape, else the sums
        over the batches seen (padded tokens, each batch's FLOPs at its own length)."""
        if self.task.fixed_shape:
            tokens = self.step * self.task.tokens_per_step
            return tokens, tokens * self.flops["total"]
        return self.tokens_seen, self.flops_seen

    def stop_reason(self, val: dict[str, float] | None) -> str | None:
        """The name of the first stop rule that fires after this step (val: its evaluation, None if none)."""
        flops = self.progress()[1]
        return next((rule.name for rule in self.stop_rules if rule(self.step, flops, val)), None)

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
            get_optimizer_state_dict(self.optimized, self.optimizer, options=opts),
        )

    def save(self) -> None:
        model_state, optim_state = self._state()  # collective under FSDP: every rank calls it
        if self.env.is_main:
            objective_state = {k: v.cpu() for k, v in self.objective.state_dict().items()}
            checkpoint.save_checkpoint(
                self.out,
                self.step,
                model_state=model_state,
                optimizer_state=optim_state,
                scheduler_state=self.scheduler.state_dict(),
                sampler_state=self.task.state_dict(),
                rng_state=checkpoint.rng_state(),
                config=self.run_config(),
                keep_last=self.tc.keep_last,
                extra={
                    "stop_rules": {rule.name: rule.state_dict() for rule in self.stop_rules},
                    "sharing": self.sharing.state_dict() if self.sharing is not None else None,
                    "tokens_seen": self.tokens_seen,
                    "flops_seen": self.flops_seen,
                    "skipped_steps": self.skipped_steps,
                },
                objective_state=objective_state or None,
            )
        parallel.barrier()

    def _resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = checkpoint.load_checkpoint(self.out, expected_config=self.run_config(), ignore=self.resumable_keys)
        if state["step"] > self.tc.steps:  # going on would rewrite the run's config and metrics as a shorter run
            raise UserError(
                f"{self.out} reached step {state['step']}, beyond train.steps {self.tc.steps}: a resumed run only "
                f"goes on (give --train.steps={state['step']} or more)"
            )
        if self.env.is_main:
            print(f"lmforge: resuming {self.out} at step {state['step']} of {self.tc.steps}", flush=True)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=opts)
        if state["objective"] is not None:
            self.objective.load_state_dict(state["objective"])
        set_optimizer_state_dict(self.optimized, self.optimizer, state["optimizer"], options=opts)
        self.scheduler.load_state_dict(state["scheduler"])
        self.task.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
        self.tokens_seen = state["extra"].get("tokens_seen", 0)
        self.flops_seen = state["extra"].get("flops_seen", 0.0)
        self.skipped_steps = state["extra"].get("skipped_steps", 0)
        saved_rules = state["extra"].get("stop_rules", {})
        for rule in self.stop_rules:
            rule.load_state_dict(saved_rules.get(rule.name, {}))
        if self.sharing is not None:
            self.sharing.load_state_dict(state["extra"].get("sharing") or {})

    # -- the run --
    def describe(self) -> str:
        """One line on what runs where: size, device, precision, compilation, parallelism, budget."""
        n = sum(p.numel() for p in self.model.parameters())
        prec = "float32" if self.dtype == torch.float32 else f"{str(self.dtype).removeprefix('torch.')} autocast"
        ranks = f", {self.env.world} ranks ({self.mode})" if self.env.world > 1 else ""
        return (
            f"lmforge: {n / 1e6:.2f}M parameters on {self.env.device.type}{ranks}, {prec} (train.precision "
            f"{self.tc.precision}), compile {'on' if _compile_enabled(self.tc, self.env.device) else 'off'}; "
            f"{self.tc.steps} steps x {self.tc.batch_size} x {self.tc.seq_len} tokens"
        )

    def _untie_if_due(self, val: dict[str, float] | None) -> None:
        tokens, flops = self.progress()
        corr = self.sharing.last_corr
        reason = self.sharing.after_step(self.step, flops, val)
        if reason is not None:
            self.log.log_event(self.step, tokens, flops, "untie", reason=reason, grad_corr=corr)

    def _log_eval(self, val: dict[str, float]) -> None:
        tokens, flops = self.progress()
        self.log.log_eval(self.step, tokens, flops, **val)

    def run(self) -> dict:
        """Train until train.steps or until a stop rule fires; the summary's "stopped_by" names the rule ("budget"
        when the steps ran out). SIGTERM (a cluster's preemption) or SIGINT saves a checkpoint at the end of the step
        and raises Interrupted; train.max_bad_steps non-finite steps in a row raise Diverged, nothing saved."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there

            def note(signum, frame):
                if self.signal_received is not None:  # asked twice: stop now, without waiting for the step's end
                    raise KeyboardInterrupt
                self.signal_received = signum

            handlers = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            summary = self._run()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if self.signal_received is not None:  # came during the last step, evaluation or export: all of it is saved
            name = signal.Signals(self.signal_received).name
            raise Interrupted(f"{name} after the run's last step: its final checkpoint is saved", self.signal_received)
        return summary

    def _stop_for_signal(self) -> None:
        """At a step boundary: if any rank got SIGTERM / SIGINT, all save a checkpoint and stop together."""
        got = self.signal_received or 0
        if self.env.world > 1:  # one rank may get it first: agree on it, so every rank joins the save
            got = int(parallel.all_reduce_max(torch.tensor(float(got), device=self.env.device)).item())
        if not got:
            return
        self.save()
        self.log.close()
        name = signal.Signals(got).name
        raise Interrupted(
            f"{name} at step {self.step}: checkpoint saved in {self.out}; the same command with the run folder "
            f"{self.out} in place of the recipe and --resume continues from step {self.step}",
            got,
        )

    def _check_finite(self, loss: float, gnorm: float) -> None:
        if self.bad_steps == 0:
            return
        tokens, flops = self.progress()
        self.log.log_event(self.step, tokens, flops, "skipped_nonfinite", loss=loss, grad_norm=gnorm)
        if self.bad_steps >= self.tc.max_bad_steps:
            last = checkpoint.find_latest(self.out)
            self.log.close()
            raise Diverged(
                f"training diverged: {self.bad_steps} steps in a row with a non-finite loss or gradient (to step "
                f"{self.step}; each was skipped); "
                + (f"the last checkpoint, {last.name}, is intact" if last else "no checkpoint was written")
                + ": lower optim.lr or raise optim.warmup_steps"
            )

    def _run(self) -> dict:
        tc, env = self.tc, self.env
        started = time.perf_counter()
        self.log.write(self.describe())
        val0 = self.validate()
        self._log_eval(val0)
        # A fresh run may already meet its goal; a resumed one judged its last evaluation before the save.
        stopped_by = self.stop_reason(val0) if self.step == 0 else None
        val = val0 if stopped_by is not None else None  # the evaluation of the step training ended at, if any
        timer = Throughput()
        tokens, _ = self.progress()
        while stopped_by is None and self.step < tc.steps:
            t0 = time.perf_counter()
            loss, gnorm, step_metrics = self.train_step()
            self._check_finite(loss, gnorm)
            if self.sharing is not None and self.sharing.checked:  # the gradient rule's measurement, every check
                step_metrics["grad_corr"] = self.sharing.last_corr
            before = tokens
            tokens, flops = self.progress()
            timer.update(tokens - before, time.perf_counter() - t0)
            flops_per_tok = self.flops["total"] if self.task.fixed_shape else flops / max(tokens, 1)
            self.log.log_step(
                step=self.step,
                tokens=tokens,
                flops=flops,
                loss=loss,
                lr=self.scheduler.get_last_lr()[0],
                grad_norm=gnorm,
                tokens_per_s=timer.tokens_per_s,
                mfu=mfu(flops_per_tok, timer.tokens_per_s, env.device, self.dtype, env.world),
                **step_metrics,
            )
            val = None
            if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                val = self.validate()
                self._log_eval(val)
            if self.sharing is not None:
                self._untie_if_due(val)
            stopped_by = self.stop_reason(val)
            if stopped_by is None and tc.ckpt_every and self.step % tc.ckpt_every == 0 and self.step < tc.steps:
                self.save()
            if self.step < tc.steps and stopped_by is None:
                self._stop_for_signal()
        if stopped_by is None or val is None:
            val = self.validate()
            self._log_eval(val)
        tokens, flops = self.progress()
        self.save()
        samples = self.finish()
        summary = {
            "steps": self.step,
            "tokens": tokens,
            "flops": flops,
            "val_loss_start": val0["val_loss"],
            "val_loss": val["val_loss"],
            **{k: v for k, v in val.items() if k.startswith("test_")},  # train.eval_test: the final test metrics
            "stopped_by": stopped_by or "budget",
            "skipped_steps": self.skipped_steps,
            "samples": samples,
            "out_dir": str(self.out),
            **self.objective.summary(val0, val, tokens),
        }
        self.log.close()
        if env.is_main:
            write_run_report(self.out, summary, self.describe(), time.perf_counter() - started)
        return summary

    def finish(self) -> list[str]:
        """Gather the full model on rank 0 as a plain module: sample text, export to HF."""
        if not isinstance(self.model, Transformer):  # a model of its own kind (model/multitask.py) exports itself
            if self.env.is_main and self.tc.export_hf:
                self.model.export(self.out / "final")
            return []
        model_state, _ = self._state()
        if not self.env.is_main:
            return []
        final = Transformer(self.recipe.model)
        final.load_state_dict(model_state)
        final.eval()
        tok_files = self.task.tokenizer_files
        final.tokenizer_files = tok_files
        samples = []
        if final.config.head == "lm":
            samples = sample_text(final, tok_files, self.tc.sample_prompts, self.tc.sample_tokens, self.tc.seed)
        for prompt, text in zip(self.tc.sample_prompts, samples):
            self.log.write(f"sample | {prompt!r} -> {text!r}")
        if self.tc.export_hf:
            from lmforge.io.checkpoints import export_hf, save

            # held-out heads (PSP++) have no transformers architecture: the final model is written in lmforge form
            (save if final.config.heldout_layers else export_hf)(final, self.out / "final", overwrite=True)
        return samples


def run_trainer(make: Callable[[], Trainer]) -> tuple[Trainer, dict]:
    """Build a trainer with make(), run it, and leave the process group whatever happens: how every command and
    experiment trains. Returns (trainer, summary)."""
    try:
        trainer = make()
        summary = trainer.run()
    finally:
        parallel.teardown()
    return trainer, summary
