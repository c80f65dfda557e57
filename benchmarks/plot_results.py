"""Draw two studies' recorded results into the docs: ``python benchmarks/plot_results.py``.

Reads ``benchmarks/step_cost/results/trajectory_cost.json`` and
``benchmarks/evidence/results/accuracy.json``, and writes ``docs/assets/bench_cost.png`` and
``docs/assets/bench_accuracy.png``. It serves both studies, so it sits beside their folders.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
STEP_COST = ROOT / "benchmarks" / "step_cost" / "results"
EVIDENCE = ROOT / "benchmarks" / "evidence" / "results"
ASSETS = ROOT / "docs" / "assets"


def plot_cost() -> Path:
    data = json.loads((STEP_COST / "trajectory_cost.json").read_text())
    rows = data["configs"]
    names = [r["config"] for r in rows]
    series = [
        ("time SATM/MTT", "time satm/mtt", 0.85),
        ("time SATM/naive SAM", "time satm/sam", 0.40),
        ("saved bytes SATM/MTT", "saved satm/mtt", 0.36),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), sharey=False)
    for ax, (title, key, target) in zip(axes, series, strict=True):
        values = [r[key] for r in rows]
        ax.barh(range(len(names)), values, color="#4c72b0")
        ax.axvline(target, color="#c44e52", linestyle="--", label=f"target {target}")
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names))
        ax.set_title(title)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = ASSETS / "bench_cost.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_accuracy() -> Path:
    data = json.loads((EVIDENCE / "accuracy.json").read_text())
    order = ["random real", "MTT", "FTD (EMA)", "SAM", "ASAM", "GSAM", "VaSSO", "SATM"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    for ax, arch in zip(axes, ("ConvNet", "MLP"), strict=True):
        means, spreads = [], []
        for row in order:
            # IPC 1: mean over distillation seeds of the per-seed means (spread: their std).
            values = [
                r["accuracy"][arch]["mean"]
                for r in data["runs"]
                if r["row"] == row and r["ipc"] == 1
            ]
            means.append(100 * statistics.fmean(values))
            spreads.append(100 * statistics.pstdev(values) if len(values) > 1 else 0.0)
        ax.bar(range(len(order)), means, yerr=spreads, color="#55a868", capsize=3)
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(min(means) - 8, max(means) + 4)
        ax.set_title(f"digits IPC 1, evaluated on {arch} (%)")
    fig.tight_layout()
    out = ASSETS / "bench_accuracy.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    for path in (plot_cost(), plot_accuracy()):
        print(path)
