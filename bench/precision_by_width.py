"""Where bfloat16 autocast starts to pay on this CPU: float32 against bf16 training steps, model width by width.

    python bench/precision_by_width.py [--widths 64,128,192,256,384,512] [--vocab 4096] [--layers 4]
                                       [--batch 16] [--seq-len 128] [--steps 6] [--rounds 3] [--out DIR]

Each width is a decoder of `--layers` layers (heads of 32, SwiGLU FFN 8/3 x width), trained eagerly by the plain
loop `lmforge train` runs (forward, float32 cross-entropy, backward, AdamW) on random tokens, in float32 and under
bf16 autocast (float32 weights and optimizer state), in rounds alternating the two, after one warm-up step each.
tokens/s is the median over rounds and the ratio the median of per-round ratios, so a background job slows both
alike. `train.precision: auto` takes bf16 only at widths where the ratio is above 1 (lmforge/train/loop.py). The last
line printed is one JSON object; with --out, also OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.experiments.harness import provenance, write_result  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.objectives.lm import lm_loss  # noqa: E402


def tokens_per_s(model, opt, x, y, dtype, steps: int) -> float:
    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * x.numel() / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="64,128,192,256,384,512")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    rows = []
    for width in (int(w) for w in a.widths.split(",")):
        cfg = ModelConfig(vocab_size=a.vocab, hidden_size=width, num_layers=a.layers, num_heads=max(1, width // 32),
                          ffn_size=int(width * 8 / 3) // 8 * 8, max_seq_len=a.seq_len)  # fmt: skip
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.init_weights()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, a.vocab, (a.batch, a.seq_len))
        y = torch.randint(0, a.vocab, (a.batch, a.seq_len))
        fp32, bf16 = [], []
        for r in range(a.rounds):
            order = (torch.float32, torch.bfloat16) if r % 2 == 0 else (torch.bfloat16, torch.float32)
            for dtype in order:
                (fp32 if dtype == torch.float32 else bf16).append(tokens_per_s(model, opt, x, y, dtype, a.steps))
        row = {
            "width": width,
            "params": model.num_params(),
            "fp32_tokens_per_s": round(statistics.median(fp32)),
            "bf16_tokens_per_s": round(statistics.median(bf16)),
            "bf16_over_fp32": round(statistics.median(b / f for b, f in zip(bf16, fp32)), 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"provenance": provenance(argv), "setup": vars(a) | {"out": str(a.out)}, "rows": rows}
    if a.out:
        write_result(a.out / "result.json", result)
    print(json.dumps({r["width"]: r["bf16_over_fp32"] for r in rows}))
    return result


if __name__ == "__main__":
    main()
