"""Cost of one inner step without graph (eager and compiled) against a kept step.

    python benchmarks/step_cost/inner_step.py [--out <file>.json]

The steps before ``iota`` need only ``g = grad_w CE(f(x; w), y)``; a kept step also builds the
graph and back-propagates through it. Measured: the eager step (``torch.autograd.grad``), the
``torch.compile``d ``torch.func.grad`` step the library uses with ``compile_inner=True``, and a
kept step (the gradient with ``create_graph=True`` plus the backward through one update), median
of interleaved repeats after a warm-up, on ConvNet configs of ``trajectory_cost.py``. The
trajectory-cost analysis says SATM reaches 0.85x MTT at N = 30 only if a step without graph
costs <= 0.275 of a kept step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from sharp_bilevel.distill.networks import get_network
from sharp_bilevel.trajectory.compiled import compiled_inner_gradient
from sharp_bilevel.trajectory.student import FunctionalStudent

CONFIGS = [("w128 8x8 ipc1", 128, (1, 8, 8), 1), ("w32 28x28 ipc1", 32, (1, 28, 28), 1)]
CONFIGS += [("w128 8x8 ipc10", 128, (1, 8, 8), 10), ("w32 28x28 ipc10", 32, (1, 28, 28), 10)]
TARGET = 0.275


def measure(width: int, shape: tuple[int, ...], ipc: int, repeats: int) -> dict[str, float]:
    net = get_network("ConvNet", shape[0], 10, shape[1:], width=width, seed=0)
    student = FunctionalStudent(net)
    w0 = student.flat_parameters()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10 * ipc, *shape, generator=gen)
    y = torch.arange(10).repeat_interleave(ipc)
    compiled = compiled_inner_gradient(student, {}, False)

    def eager() -> torch.Tensor:
        w = w0.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(student(x, w, {}), y), w)
        return g

    def fast() -> torch.Tensor:
        return compiled(w0, x, y)

    def kept() -> torch.Tensor:
        w = w0.detach().requires_grad_(True)
        loss = F.cross_entropy(student(x, w, {}), y)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        (h,) = torch.autograd.grad(((w - 0.01 * g) * w0).sum(), w)
        return h

    began = time.perf_counter()
    fast()
    compile_s = time.perf_counter() - began
    fns = {"eager": eager, "compiled": fast, "kept": kept}
    for f in fns.values():
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = float((fast() - eager()).norm() / eager().norm())
    return {
        **{f"{k}_s": v for k, v in med.items()},
        "eager/kept": med["eager"] / med["kept"],
        "compiled/kept": med["compiled"] / med["kept"],
        "compiled/eager": med["compiled"] / med["eager"],
        "compile_s": compile_s,
        "relative_difference_float32": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.compile's own
    started, load = time.time(), os.getloadavg()[0]
    results = {}
    lines = [
        "| config | eager/kept | compiled/kept | compiled/eager | compile s | float32 rel. diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, width, shape, ipc in CONFIGS:
        r = measure(width, shape, ipc, args.repeats)
        results[name] = r
        lines.append(
            f"| {name} | {r['eager/kept']:.3f} | {r['compiled/kept']:.3f} | "
            f"{r['compiled/eager']:.3f} | {r['compile_s']:.1f} | "
            f"{r['relative_difference_float32']:.1e} |"
        )
        print(lines[-1], flush=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": 2,
        "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.time() - started, 1),
        "target compiled/kept": TARGET,
    }
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "configs": results}, indent=1) + "\n")
        head = [
            "# One inner step without graph: eager and compiled, against a kept step",
            "",
            f"`python benchmarks/step_cost/inner_step.py --out {args.out}` "
            f"({meta['wall_s']:.0f} s, {meta['date']}, torch {meta['torch']}, 2 threads, "
            f"1-min load {meta['load_average_1min']}). ConvNet (instance norm), 10 classes, "
            f"full batch, median of {args.repeats} interleaved repeats after a warm-up. "
            f"Target: a step without graph <= {TARGET} of a kept step.",
            "",
        ]
        args.out.with_suffix(".md").write_text("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
