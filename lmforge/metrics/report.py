"""Plots and Markdown reports from runs' metrics.jsonl: the saving, shown against a baseline."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import UserError


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read metrics {path}: {e}") from None


def curve(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) points of the rows that carry `y` (e.g. only evaluation rows carry val_loss)."""
    pts = [(r[x], r[y]) for r in rows if r.get(y) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(
    runs: dict[str, list[dict]],
    out: str | Path,
    x: str = "flops",
    title: str = "",
    train_key: str = "loss",
    val_key: str = "val_loss",
    hline: float | None = None,
) -> Path:
    """One figure: training loss (thin) and validation loss (markers) of every run against `x`; a run's events (e.g.
    the untie of share-then-untie) as dotted vertical lines in its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        tx, ty = curve(rows, x, train_key)
        if tx:
            ax.plot(tx, ty, color=color, alpha=0.35, linewidth=1)
        vx, vy = curve(rows, x, val_key)
        if vx:
            ax.plot(vx, vy, "o-", color=color, markersize=3, linewidth=1.5, label=f"{label} (validation)")
        for event in (r for r in rows if "event" in r and r.get(x) is not None):
            ax.axvline(event[x], color=color, linestyle=":", linewidth=1, label=f"{label}: {event['event']}")
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label=f"target {hline:.3f}")
    ax.set_xlabel({"flops": "training FLOPs", "tokens": "training tokens", "step": "step"}.get(x, x))
    ax.set_ylabel("loss (nats / token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_run_report(run_dir: str | Path, summary: dict, describe: str, seconds: float) -> None:
    """Every run folder's own record for a reader: loss.png (training and validation loss against tokens) and
    report.md (what ran, where it ended, every final metric, the samples). Written by the first rank at the end."""
    from lmforge.io.atomic import atomic_write_bytes

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    plot_curves({run_dir.name: rows}, run_dir / "loss.png", x="tokens", title=str(run_dir))
    skip = {"samples", "out_dir", "steps", "tokens", "flops", "stopped_by", "skipped_steps"}
    metrics = [[k, v] for k, v in summary.items() if k not in skip and isinstance(v, int | float)]
    lines = [
        f"# Run {run_dir}",
        "",
        describe.removeprefix("lmforge: "),
        "",
        markdown_table(
            ["", ""],
            [
                ["steps", f"{summary['steps']:,} (stopped by {summary['stopped_by']})"],
                ["tokens", summary["tokens"]],
                ["training FLOPs", f"{summary['flops']:.3e}"],
                ["wall time", f"{seconds:,.0f} s"],
                ["steps skipped (non-finite)", summary["skipped_steps"]],
                *metrics,
            ],
        ),
        "",
        "![loss against tokens](loss.png)",
    ]
    if summary.get("samples"):
        lines += ["", "Samples:", "", *(f"```\n{s}\n```" for s in summary["samples"])]
    atomic_write_bytes(run_dir / "report.md", ("\n".join(lines) + "\n").encode())
