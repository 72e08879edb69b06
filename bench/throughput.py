"""Training throughput: lmforge's Transformer versus transformers' LlamaForCausalLM of the same shape.

    python bench/throughput.py [--device cpu|cuda] [--steps N] [--warmup N] [--rounds N] [--quick]
                               [--batch N] [--max-seconds S] [--matmul-precision highest|high|medium]

Both sides run the same plain loop (forward, float32 cross-entropy, backward, fused AdamW step) on the
same random tokens, eager and under torch.compile. The four variants are timed in short rounds taken
in alternating order, so a background job slows all of them alike: tokens/s is the median over rounds,
ratios (lmforge / transformers, training FLOP/s / GEMM rate) the median of per-round ratios. On a CPU
a round in which another process took cores from the benchmark (its process CPU time fell below 90%
of wall time x threads) is set aside when clean rounds exist: there the OpenMP threads wait for each
other and a step runs up to 10x slower, which measures the neighbour, not the model.

CPU: PRESETS["llama-5m"], batch 8 x 256 tokens, float32, against this machine's float32 GEMM rate
(torch.mm of two 1024 x 1024 matrices, measured between the rounds). CUDA: PRESETS["llama-124m"],
batch 16 x 1024 tokens, bf16 autocast, MFU against the device's dense bf16 peak. The last line printed
is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmforge import metrics  # noqa: E402
from lmforge.io.hf_config import config_to_hf  # noqa: E402
from lmforge.model.config import PRESETS, ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.objectives.lm import lm_loss

CLEAN_UTIL = 0.9  # a CPU round is clean when process CPU time >= 90% of wall time x threads
SIDES = ("lmforge compiled", "hf compiled", "lmforge eager", "hf eager")


@dataclass(frozen=True)
class Setup:
    device: torch.device
    preset: str
    batch: int
    seq_len: int
    dtype: torch.dtype  # autocast dtype; float32 = no autocast
    steps: int  # timed steps per round
    warmup: int  # untimed steps before the first round (compilation happens here)
    rounds: int  # rounds of the four variants, unless max_seconds runs out first
    max_seconds: float  # timing budget: stop after this (at least 2 rounds); extra CPU rounds while any is short
    matmul_precision: str  # torch.set_float32_matmul_precision for both sides and the GEMM reference


def parse_args(argv: list[str] | None = None) -> Setup:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, help="timed steps per variant per round (CPU 3, CUDA 10)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant, compilation included (CPU 3, CUDA 5)")
    p.add_argument(
        "--rounds",
        type=int,
        help="rounds of alternating measurements, fewer if --max-seconds runs out (default 5, --quick 2)",
    )
    p.add_argument("--batch", type=int, help="sequences per step (CPU 8, CUDA 16)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=150.0,
        help="time budget of the measurements: no round starts after it once 2 are done; below it, CPU runs "
        "add rounds while a variant has fewer than 3 clean ones (default 150)",
    )
    p.add_argument(
        "--matmul-precision",
        choices=("highest", "high", "medium"),
        default="highest",
        help="torch.set_float32_matmul_precision for everything (default highest: exact float32). On a CPU "
        "'medium' lets oneDNN run float32 matmuls, in bf16 where the CPU has AMX",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds of 1 step, 2 warm-up steps")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    for name in ("steps", "warmup", "rounds", "batch"):
        v = getattr(a, name)
        if v is not None and v < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be {'>= 0' if name == 'warmup' else 'positive'}, got {v}")
    cuda = a.device == "cuda"
    quick = a.quick
    return Setup(
        device=torch.device(a.device),
        preset="llama-124m" if cuda else "llama-5m",
        batch=a.batch or (16 if cuda else 8),
        seq_len=1024 if cuda else 256,
        dtype=torch.bfloat16 if cuda else torch.float32,
        steps=a.steps or (1 if quick else 10 if cuda else 3),
        warmup=a.warmup if a.warmup is not None else (2 if quick else 5 if cuda else 3),
        rounds=a.rounds or (2 if quick else 5),
        max_seconds=0.0 if quick else a.max_seconds,  # --quick: exactly 2 rounds
        matmul_precision=a.matmul_precision,
    )


# ---- the two models ---------------------------------------------------------------------------------
def lmforge_model(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    return model


class HFLogits(torch.nn.Module):
    """LlamaForCausalLM called like lmforge's model: input_ids (B, T) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        hf = config_to_hf(cfg)  # the same shape lmforge exports: untied head, SwiGLU, RoPE, RMSNorm
        hf_cfg = AutoConfig.for_model(**hf)
        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
        self.model.float()  # float32 master weights, like lmforge's (autocast does the bf16 on a GPU)
        if self.model.config._attn_implementation != "sdpa":
            raise RuntimeError(f"transformers picked {self.model.config._attn_implementation!r}, not sdpa")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@dataclass
class Variant:
    name: str
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    tokens_per_s: list[float] = field(default_factory=list)
    util: list[float] = field(default_factory=list)  # process CPU time / (wall x threads), per round

    def ok(self) -> list[bool]:
        return [u >= CLEAN_UTIL for u in self.util]

    def clean(self) -> list[float]:
        return [t for t, ok in zip(self.tokens_per_s, self.ok()) if ok]

    def median(self) -> float:
        return statistics.median(self.clean() or self.tokens_per_s)


def paired_ratio(num: list[float], num_ok: list[bool], den: list[float], den_ok: list[bool]) -> float:
    """Median over rounds of num[r] / den[r], from the rounds clean on both sides if there are any: two
    figures taken a few seconds apart share the machine's state (clock, neighbours) better than two medians."""
    pairs = list(zip(num, num_ok, den, den_ok))
    clean = [n / d for n, a, d, b in pairs if a and b]
    return statistics.median(clean or [n / d for n, _, d, _ in pairs])


def make_step(model: torch.nn.Module, setup: Setup, compiled: bool) -> Callable:
    """One optimizer step: forward, float32 cross-entropy, backward, AdamW. Under compile the forward and
    the loss are one graph (as in nanoGPT, whose model returns the loss), so the (B*T, V) softmax fuses."""
    model.to(setup.device).train()
    # Fused AdamW (one kernel per tensor) on both sides and devices; on a CPU torch's default is a
    # Python loop over the tensors, a few ops each.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    autocast = setup.dtype != torch.float32

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(setup.device.type, dtype=setup.dtype, enabled=autocast):
            return lm_loss(model(x), y)

    loss_fn = torch.compile(loss_of) if compiled else loss_of

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


# ---- timing ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round(v: Variant, x: torch.Tensor, y: torch.Tensor, setup: Setup) -> None:
    _sync(setup.device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(setup.steps):
        v.step(x, y)
    _sync(setup.device)
    wall = time.perf_counter() - wall0
    v.tokens_per_s.append(setup.steps * x.numel() / wall)
    # On a GPU the host thread waits in synchronize, so CPU time says nothing: every round counts.
    cpu_util = (time.process_time() - cpu0) / wall / torch.get_num_threads()
    v.util.append(cpu_util if setup.device.type == "cpu" else 1.0)


def measure_gemm(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(FLOP/s, CPU utilisation) of a square matmul: 1024^2 float32 on a CPU, 8192^2 in `dtype` on a GPU."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if device.type == "cpu":
        flops = metrics.measure_cpu_gemm_flops(1024, torch.float32, seconds=0.5)
    else:
        n = 8192
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        torch.mm(a, b)
        _sync(device)
        start, iters = time.perf_counter(), 20
        for _ in range(iters):
            torch.mm(a, b)
        _sync(device)
        flops = 2.0 * n**3 * iters / (time.perf_counter() - start)
    util = (time.process_time() - cpu0) / (time.perf_counter() - wall0) / torch.get_num_threads()
    return flops, util if device.type == "cpu" else 1.0


# ---- report ---------------------------------------------------------------------------------------------
def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("-dirty" if dirty else "")) if rev else "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv: list[str] | None = None) -> dict:
    setup = parse_args(argv)
    cpu = setup.device.type == "cpu"
    if cpu:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.set_float32_matmul_precision(setup.matmul_precision)
    warnings.filterwarnings("ignore", module="torch._inductor")
    import transformers

    cfg = PRESETS[setup.preset]
    fpt = metrics.flops_per_token(cfg, setup.seq_len)["total"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (setup.batch, setup.seq_len), generator=gen).to(setup.device)
    y = torch.randint(0, cfg.vocab_size, (setup.batch, setup.seq_len), generator=gen).to(setup.device)

    print(
        f"# {setup.preset}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, FFN "
        f"{cfg.ffn_size}, vocab {cfg.vocab_size}; batch {setup.batch} x {setup.seq_len} tokens; "
        f"{'float32' if setup.dtype == torch.float32 else 'bf16 autocast'} on {device_name(setup.device)}, "
        f"{torch.get_num_threads()} threads, matmul precision {setup.matmul_precision}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"# training FLOPs per token {fpt / 1e6:.2f} M (lmforge.metrics.flops_per_token)", flush=True)

    variants = []
    n_params = {}
    for name in SIDES:
        t0 = time.perf_counter()
        model = lmforge_model(cfg) if name.startswith("lmforge") else HFLogits(cfg)
        n_params[name.split()[0]] = sum(p.numel() for p in model.parameters())
        v = Variant(name, make_step(model, setup, compiled=name.endswith("compiled")))
        for _ in range(setup.warmup):
            v.step(x, y)
        _sync(setup.device)
        variants.append(v)
        print(f"# {name}: {setup.warmup} warm-up steps in {time.perf_counter() - t0:.1f} s", flush=True)
    if n_params["lmforge"] != n_params["hf"]:
        raise RuntimeError(f"the two models differ in size: {n_params}")

    gemm: list[tuple[float, float]] = []
    timing_start, r = time.perf_counter(), 0
    while True:
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            time_round(v, x, y, setup)
        gemm.append(measure_gemm(setup.device, setup.dtype))
        r += 1
        # Past the time budget stop after 2 rounds, so a busy machine still finishes in minutes.
        if r >= 2 and time.perf_counter() - timing_start > setup.max_seconds:
            break
        short = cpu and any(len(v.clean()) < min(3, setup.rounds) for v in variants)
        if r >= setup.rounds and not short:
            break

    gemm_rates, gemm_ok = [f for f, _ in gemm], [u >= CLEAN_UTIL for _, u in gemm]
    clean_gemm = [f for f, ok in zip(gemm_rates, gemm_ok) if ok]
    gemm_flops = statistics.median(clean_gemm or gemm_rates)
    tps = {v.name: v.median() for v in variants}
    by_name = {v.name: v for v in variants}
    peak = metrics.peak_flops(setup.device, setup.dtype)

    def of_gemm(v: Variant) -> float:  # each round's training FLOP/s over the GEMM rate measured right after it
        return paired_ratio([t * fpt for t in v.tokens_per_s], v.ok(), gemm_rates, gemm_ok)

    def vs(a: str, b: str) -> float:
        return paired_ratio(by_name[a].tokens_per_s, by_name[a].ok(), by_name[b].tokens_per_s, by_name[b].ok())

    print(f"\n{'variant':18s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'of GEMM':>8s} {'clean':>6s}  rounds (tokens/s)")
    for v in variants:
        n_clean = f"{len(v.clean())}/{len(v.tokens_per_s)}"
        rounds = " ".join(f"{t:.0f}" for t in v.tokens_per_s)
        print(
            f"{v.name:18s} {tps[v.name]:9.0f} {tps[v.name] * fpt / 1e9:8.1f} {of_gemm(v):8.2f} {n_clean:>6s}  {rounds}"
        )
    gemm_label = "1024x1024 float32 torch.mm" if cpu else f"8192x8192 {str(setup.dtype).removeprefix('torch.')} mm"
    print(f"GEMM ({gemm_label}): {gemm_flops / 1e9:.1f} GFLOP/s, median of {len(clean_gemm or gemm)} rounds")
    print("(tokens/s: median of the clean rounds; ratios and 'of GEMM': median of per-round ratios)")
    ratio, eager_ratio = vs("lmforge compiled", "hf compiled"), vs("lmforge eager", "hf eager")
    fraction = of_gemm(by_name["lmforge compiled"])
    mfu = tps["lmforge compiled"] * fpt / peak if peak else None
    hf_mfu = tps["hf compiled"] * fpt / peak if peak else None
    print(
        f"lmforge / transformers: compiled {ratio:.2f}x, eager {eager_ratio:.2f}x; lmforge compiled reaches "
        f"{fraction:.0%} of the GEMM rate"
        + (f", MFU {mfu:.1%} (transformers {hf_mfu:.1%}) of {peak / 1e12:.0f} TFLOP/s" if peak else "")
    )
    if cpu and any(not v.clean() for v in variants):
        print(
            f"WARNING: no clean round for {', '.join(v.name for v in variants if not v.clean())}: other processes "
            "held the CPU throughout, so these figures measure the contention, not the models"
        )
    elif cpu and any(len(v.clean()) < len(v.tokens_per_s) for v in variants):
        print(f"note: rounds with CPU utilisation < {CLEAN_UTIL} (another process running) were set aside")

    result = {
        "lmforge_tokens_per_s": round(tps["lmforge compiled"], 1),
        "hf_tokens_per_s": round(tps["hf compiled"], 1),
        "ratio": round(ratio, 3),
        "lmforge_eager_tokens_per_s": round(tps["lmforge eager"], 1),
        "hf_eager_tokens_per_s": round(tps["hf eager"], 1),
        "eager_ratio": round(eager_ratio, 3),
        "gemm_gflops": round(gemm_flops / 1e9, 1),
        "gemm": gemm_label,
        "gemm_fraction": round(fraction, 3),
        "flops_per_token": fpt,
        "mfu": None if mfu is None else round(mfu, 4),
        "hf_mfu": None if hf_mfu is None else round(hf_mfu, 4),
        "peak_tflops": None if peak is None else round(peak / 1e12, 1),
        "device": setup.device.type,
        "device_name": device_name(setup.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": git_commit(),
        "shape": {
            "preset": setup.preset,
            "hidden": cfg.hidden_size,
            "layers": cfg.num_layers,
            "heads": cfg.num_heads,
            "ffn": cfg.ffn_size,
            "vocab": cfg.vocab_size,
            "seq_len": setup.seq_len,
            "batch": setup.batch,
            "params": n_params["lmforge"],
        },
        "dtype": "float32" if setup.dtype == torch.float32 else "bf16-autocast",
        "matmul_precision": setup.matmul_precision,
        "steps_per_round": setup.steps,
        "rounds": {v.name: [round(t, 1) for t in v.tokens_per_s] for v in variants},
        "clean_rounds": {v.name: len(v.clean()) for v in variants} if cpu else None,
        "contended": cpu and any(not v.clean() for v in variants),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
