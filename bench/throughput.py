"""Training throughput: lmforge's Transformer versus transformers' LlamaForCausalLM of the same shape.

    python bench/throughput.py [--device cpu|cuda] [--dtypes float32,bfloat16] [--steps N] [--warmup N]
                               [--rounds N] [--quick] [--batch N] [--max-seconds S]
                               [--matmul-precision highest|high|medium]

Both sides run the same plain loop (forward, float32 cross-entropy, backward, fused AdamW step) on the
same random tokens, eager and under torch.compile, in float32 and under bfloat16 autocast (float32 master
weights and optimizer state, as `lmforge train` does). The variants are timed in short rounds taken in
alternating order, so a background job slows all of them alike: tokens/s is the median over rounds,
ratios (one variant / another, training FLOP/s / GEMM rate) the median of per-round ratios. On a CPU a
round in which another process took cores from the benchmark (its process CPU time fell below 90% of
wall time x threads) is set aside when clean rounds exist: there the OpenMP threads wait for each other
and a step runs up to 10x slower, which measures the neighbour, not the model.

CPU: PRESETS["llama-5m"], batch 8 x 256 tokens, float32 and bf16 autocast, against this machine's GEMM
rate in each dtype (torch.mm of two 1024 x 1024 matrices, measured between the rounds). CUDA:
PRESETS["llama-124m"], batch 16 x 1024 tokens, bf16 autocast, MFU against the device's dense bf16 peak.
The last line printed is one JSON object with every number.
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

from lmforge.io.hf_config import config_to_hf  # noqa: E402
from lmforge.metrics.flops import flops_per_token, measure_cpu_gemm_flops, peak_flops  # noqa: E402
from lmforge.model.config import PRESETS, ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.objectives.lm import lm_loss  # noqa: E402

CLEAN_UTIL = 0.9  # a CPU round is clean when process CPU time >= 90% of wall time x threads
SIDES = ("lmforge compiled", "hf compiled", "lmforge eager", "hf eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Setup:
    device: torch.device
    preset: str
    batch: int
    seq_len: int
    dtypes: tuple[torch.dtype, ...]  # each side runs in each: float32 = no autocast, else autocast to it
    steps: int  # timed steps per round
    warmup: int  # untimed steps before the first round (compilation happens here)
    rounds: int  # rounds of the four variants, unless max_seconds runs out first
    max_seconds: float  # timing budget: stop after this (at least 2 rounds); extra CPU rounds while any is short
    matmul_precision: str  # torch.set_float32_matmul_precision for both sides and the GEMM reference


def parse_args(argv: list[str] | None = None) -> Setup:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtypes",
        help="comma-separated precisions, each side timed in each: float32 (no autocast), bfloat16 (autocast) "
        "(default: CPU float32,bfloat16; CUDA bfloat16)",
    )
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
    names = (a.dtypes or ("bfloat16" if cuda else "float32,bfloat16")).split(",")
    if not names or any(n not in DTYPES for n in names) or len(set(names)) < len(names):
        p.error(f"--dtypes: a comma-separated subset of {', '.join(DTYPES)}, got {a.dtypes!r}")
    return Setup(
        device=torch.device(a.device),
        preset="llama-124m" if cuda else "llama-5m",
        batch=a.batch or (16 if cuda else 8),
        seq_len=1024 if cuda else 256,
        dtypes=tuple(DTYPES[n] for n in names),
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
    name: str  # "lmforge compiled fp32": side, compilation, precision
    dtype: torch.dtype
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


def make_step(model: torch.nn.Module, setup: Setup, dtype: torch.dtype, compiled: bool) -> Callable:
    """One optimizer step: forward, float32 cross-entropy, backward, AdamW. Under compile the forward and
    the loss are one graph (as in nanoGPT, whose model returns the loss), so the (B*T, V) softmax fuses."""
    model.to(setup.device).train()
    # Fused AdamW (one kernel per tensor) on both sides and devices; on a CPU torch's default is a
    # Python loop over the tensors, a few ops each.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    autocast = dtype != torch.float32

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(setup.device.type, dtype=dtype, enabled=autocast):
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
    """(FLOP/s, CPU utilisation) of a square matmul in `dtype`: 1024^2 on a CPU, 8192^2 on a GPU."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if device.type == "cpu":
        flops = measure_cpu_gemm_flops(1024, dtype, seconds=0.5)
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
    fpt = flops_per_token(cfg, setup.seq_len)["total"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (setup.batch, setup.seq_len), generator=gen).to(setup.device)
    y = torch.randint(0, cfg.vocab_size, (setup.batch, setup.seq_len), generator=gen).to(setup.device)

    precisions = ", ".join("float32" if d == torch.float32 else f"{SHORT[d]} autocast" for d in setup.dtypes)
    print(
        f"# {setup.preset}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, FFN "
        f"{cfg.ffn_size}, vocab {cfg.vocab_size}; batch {setup.batch} x {setup.seq_len} tokens; {precisions} on "
        f"{device_name(setup.device)}, {torch.get_num_threads()} threads, matmul precision "
        f"{setup.matmul_precision}; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"# training FLOPs per token {fpt / 1e6:.2f} M (lmforge.flops_per_token)", flush=True)

    variants = []
    n_params = {}
    for dtype in setup.dtypes:
        for side in SIDES:
            name = f"{side} {SHORT[dtype]}"
            t0 = time.perf_counter()
            model = lmforge_model(cfg) if side.startswith("lmforge") else HFLogits(cfg)
            n_params[side.split()[0]] = sum(p.numel() for p in model.parameters())
            v = Variant(name, dtype, make_step(model, setup, dtype, compiled=side.endswith("compiled")))
            for _ in range(setup.warmup):
                v.step(x, y)
            _sync(setup.device)
            variants.append(v)
            print(f"# {name}: {setup.warmup} warm-up steps in {time.perf_counter() - t0:.1f} s", flush=True)
    if n_params["lmforge"] != n_params["hf"]:
        raise RuntimeError(f"the two models differ in size: {n_params}")

    gemm: dict[torch.dtype, list[tuple[float, float]]] = {d: [] for d in setup.dtypes}
    timing_start, r = time.perf_counter(), 0
    while True:
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            time_round(v, x, y, setup)
        for d in setup.dtypes:
            gemm[d].append(measure_gemm(setup.device, d))
        r += 1
        # Past the time budget stop after 2 rounds, so a busy machine still finishes in minutes.
        if r >= 2 and time.perf_counter() - timing_start > setup.max_seconds:
            break
        short = cpu and any(len(v.clean()) < min(3, setup.rounds) for v in variants)
        if r >= setup.rounds and not short:
            break

    gemm_rates = {d: [f for f, _ in g] for d, g in gemm.items()}
    gemm_ok = {d: [u >= CLEAN_UTIL for _, u in g] for d, g in gemm.items()}
    gemm_flops = {}
    for d, rates in gemm_rates.items():
        clean = [f for f, ok in zip(rates, gemm_ok[d]) if ok]
        gemm_flops[d] = statistics.median(clean or rates)
    tps = {v.name: v.median() for v in variants}
    by_name = {v.name: v for v in variants}

    def of_gemm(name: str) -> float:  # each round's training FLOP/s over its dtype's GEMM rate measured after it
        v = by_name[name]
        return paired_ratio([t * fpt for t in v.tokens_per_s], v.ok(), gemm_rates[v.dtype], gemm_ok[v.dtype])

    def vs(a: str, b: str) -> float:
        return paired_ratio(by_name[a].tokens_per_s, by_name[a].ok(), by_name[b].tokens_per_s, by_name[b].ok())

    print(f"\n{'variant':23s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'of GEMM':>8s} {'clean':>6s}  rounds (tokens/s)")
    for v in variants:
        n_clean = f"{len(v.clean())}/{len(v.tokens_per_s)}"
        rounds = " ".join(f"{t:.0f}" for t in v.tokens_per_s)
        g = tps[v.name] * fpt / 1e9
        print(f"{v.name:23s} {tps[v.name]:9.0f} {g:8.1f} {of_gemm(v.name):8.2f} {n_clean:>6s}  {rounds}")
    size = 1024 if cpu else 8192
    for d in setup.dtypes:
        n_gemm = sum(gemm_ok[d]) or len(gemm_ok[d])
        print(f"GEMM ({size}x{size} {SHORT[d]} torch.mm): {gemm_flops[d] / 1e9:.1f} GFLOP/s, median of {n_gemm} rounds")
    print("(tokens/s: median of the clean rounds; ratios and 'of GEMM': median of per-round ratios)")

    # The first precision's figures keep the keys earlier runs used (float32 on a CPU, bf16 on a GPU).
    base = SHORT[setup.dtypes[0]]
    peak = peak_flops(setup.device, setup.dtypes[0])
    ratio, eager_ratio = (
        vs(f"lmforge compiled {base}", f"hf compiled {base}"),
        vs(f"lmforge eager {base}", f"hf eager {base}"),
    )
    fraction = of_gemm(f"lmforge compiled {base}")
    mfu = tps[f"lmforge compiled {base}"] * fpt / peak if peak else None
    hf_mfu = tps[f"hf compiled {base}"] * fpt / peak if peak else None
    print(
        f"{base}: lmforge / transformers: compiled {ratio:.2f}x, eager {eager_ratio:.2f}x; lmforge compiled reaches "
        f"{fraction:.0%} of the {base} GEMM rate"
        + (f", MFU {mfu:.1%} (transformers {hf_mfu:.1%}) of {peak / 1e12:.0f} TFLOP/s" if peak else "")
    )
    result = {
        "lmforge_tokens_per_s": round(tps[f"lmforge compiled {base}"], 1),
        "hf_tokens_per_s": round(tps[f"hf compiled {base}"], 1),
        "ratio": round(ratio, 3),
        "lmforge_eager_tokens_per_s": round(tps[f"lmforge eager {base}"], 1),
        "hf_eager_tokens_per_s": round(tps[f"hf eager {base}"], 1),
        "eager_ratio": round(eager_ratio, 3),
        "gemm_gflops": round(gemm_flops[setup.dtypes[0]] / 1e9, 1),
        "gemm": f"{size}x{size} {str(setup.dtypes[0]).removeprefix('torch.')} torch.mm",
        "gemm_fraction": round(fraction, 3),
    }
    if cpu and set(setup.dtypes) == {torch.float32, torch.bfloat16}:
        # What a user gets from transformers without changing anything is float32 (compiled, its best); lmforge's
        # CPU default is bf16 autocast, eager (train.compile auto), and compiled with train.compile: true.
        bf16 = {
            "bf16_tokens_per_s": round(tps["lmforge compiled bf16"], 1),
            "bf16_eager_tokens_per_s": round(tps["lmforge eager bf16"], 1),
            "hf_bf16_tokens_per_s": round(tps["hf compiled bf16"], 1),
            "hf_bf16_eager_tokens_per_s": round(tps["hf eager bf16"], 1),
            "bf16_ratio_vs_hf_fp32": round(vs("lmforge compiled bf16", "hf compiled fp32"), 3),
            "bf16_eager_ratio_vs_hf_fp32": round(vs("lmforge eager bf16", "hf compiled fp32"), 3),
            "bf16_ratio_vs_hf_bf16": round(vs("lmforge compiled bf16", "hf compiled bf16"), 3),
            "bf16_eager_ratio_vs_hf_bf16": round(vs("lmforge eager bf16", "hf eager bf16"), 3),
            "bf16_speedup": round(vs("lmforge compiled bf16", "lmforge compiled fp32"), 3),
            "bf16_eager_speedup": round(vs("lmforge eager bf16", "lmforge eager fp32"), 3),
            "bf16_gemm_gflops": round(gemm_flops[torch.bfloat16] / 1e9, 1),
            "bf16_gemm_fraction": round(of_gemm("lmforge compiled bf16"), 3),
            "bf16_eager_gemm_fraction": round(of_gemm("lmforge eager bf16"), 3),
        }
        result.update(bf16)
        print(
            f"bf16 autocast: lmforge compiled {bf16['bf16_ratio_vs_hf_fp32']:.2f}x transformers' float32 compiled "
            f"(eager {bf16['bf16_eager_ratio_vs_hf_fp32']:.2f}x), {bf16['bf16_ratio_vs_hf_bf16']:.2f}x its bf16 "
            f"compiled; {bf16['bf16_speedup']:.2f}x lmforge's float32; {bf16['bf16_gemm_fraction']:.0%} of the bf16 "
            f"GEMM rate (eager {bf16['bf16_eager_gemm_fraction']:.0%})"
        )
    if cpu and any(not v.clean() for v in variants):
        print(
            f"WARNING: no clean round for {', '.join(v.name for v in variants if not v.clean())}: other processes "
            "held the CPU throughout, so these figures measure the contention, not the models"
        )
    elif cpu and any(len(v.clean()) < len(v.tokens_per_s) for v in variants):
        print(f"note: rounds with CPU utilisation < {CLEAN_UTIL} (another process running) were set aside")

    result |= {
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
        "dtypes": ["float32" if d == torch.float32 else "bf16-autocast" for d in setup.dtypes],
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
