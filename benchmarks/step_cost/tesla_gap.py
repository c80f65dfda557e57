"""How far TESLA's hypergradient is from exact BPTT (and where TUH sits), on two problems.

    python benchmarks/step_cost/tesla_gap.py [--quick] [--out <file>.json]

* ridge: a linear student ``f(x) = W x`` with a squared-error inner loss, so the dropped
  Hessian-chain terms are ``(I - alpha H)`` products with ``H = X^T X / n`` constant;
* ConvNet: MTT's ConvNet (width 32, instance norm) on random 1x8x8 images, 10 classes, DSA off.

For each unroll length ``N`` the image gradient of TESLA and of TUH (keep ``N/3``) is compared
with exact BPTT: cosine similarity and norm ratio (all float64, one expert segment per seed,
three seeds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharp_bilevel.trajectory.hypergradient import UnrollSettings
from sharp_bilevel.trajectory.matching import TrajectoryMatching
from sharp_bilevel.trajectory.step_plan import StepPlan
from sharp_bilevel.trajectory.student import FunctionalStudent
from sharp_bilevel.trajectory.tesla import tesla_backward, tesla_forward
from sharp_bilevel.trajectory.unroll import _InnerProblem, matching_loss, unroll

F64 = torch.float64


def compare(a: Tensor, b: Tensor) -> tuple[float, float]:
    """(cosine, ||a|| / ||b||) of two gradients."""
    a, b = a.reshape(-1), b.reshape(-1)
    return float(torch.dot(a, b) / (a.norm() * b.norm())), float(a.norm() / b.norm())


def ridge_case(steps: int, seed: int, alpha: float) -> dict[str, tuple[float, float]]:
    gen = torch.Generator().manual_seed(seed)
    n, d = 20, 16
    net = nn.Linear(d, 1, bias=False).double()
    student = FunctionalStudent(net)
    images = torch.randn(n, d, generator=gen, dtype=F64).requires_grad_(True)
    targets = torch.randn(n, 1, generator=gen, dtype=F64)
    start = torch.randn(d, generator=gen, dtype=F64)
    target = start + 0.3 * torch.randn(d, generator=gen, dtype=F64)
    syn_lr = torch.tensor(alpha, dtype=F64)
    plan = StepPlan.mtt(n, steps, generator=torch.Generator().manual_seed(seed))
    mse = F.mse_loss

    def bptt(keep: int) -> Tensor:
        result = unroll(
            student, start, images, targets, syn_lr, plan, graph_from=steps - keep, loss_fn=mse
        )
        (g,) = torch.autograd.grad(matching_loss(result.final, target, start), [images])
        return g

    problem = _InnerProblem(student, {}, images, targets, None, False, mse)
    trajectory = tesla_forward(problem, start, syn_lr, plan, first_term=0)
    point = trajectory.result.final.detach().requires_grad_(True)
    (v,) = torch.autograd.grad(matching_loss(point, target, start), [point])
    (tesla,) = tesla_backward(problem, trajectory, plan, syn_lr, v, [images], steps)
    assert tesla is not None
    exact = bptt(steps)
    return {"tesla": compare(tesla, exact), "tuh": compare(bptt(max(1, steps // 3)), exact)}


def convnet_case(steps: int, seed: int) -> dict[str, tuple[float, float]]:
    from sharp_bilevel.distill.networks import get_network

    gen = torch.Generator().manual_seed(seed)
    net = get_network("ConvNet", 1, 10, (8, 8), width=32, seed=seed).double()
    images = torch.randn(10, 1, 8, 8, generator=gen, dtype=F64).requires_grad_(True)
    labels = torch.arange(10)
    syn_lr = torch.tensor(0.01, dtype=F64, requires_grad=True)
    start = FunctionalStudent(net).flat_parameters().to(F64)
    target = start + 0.01 * torch.randn(start.shape, generator=gen, dtype=F64)

    def grad(settings: UnrollSettings) -> Tensor:
        images.grad = None
        objective = TrajectoryMatching(
            net,
            images,
            syn_lr,
            labels,
            expert_start=start,
            expert_target=target,
            syn_steps=steps,
            settings=settings,
            seed=seed,
        )
        objective()
        assert images.grad is not None
        return images.grad.clone()

    exact = grad(UnrollSettings(lr_gradient="first_order"))
    tesla = grad(UnrollSettings.tesla())
    tuh = grad(UnrollSettings(keep=max(1, steps // 3), lr_gradient="first_order"))
    return {"tesla": compare(tesla, exact), "tuh": compare(tuh, exact)}


def summarise(rows: list[dict[str, tuple[float, float]]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in ("tesla", "tuh"):
        cos = [r[key][0] for r in rows]
        ratio = [r[key][1] for r in rows]
        out[key] = {
            "cosine_mean": statistics.mean(cos),
            "cosine_min": min(cos),
            "norm_ratio_mean": statistics.mean(ratio),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two lengths, one seed")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    seeds = [0] if args.quick else [0, 1, 2]
    ridge_lengths = [5, 20] if args.quick else [5, 10, 20, 40]
    conv_lengths = [5, 10] if args.quick else [10, 20, 40]
    alpha = 0.05
    results: dict[str, dict] = {"ridge": {}, "convnet": {}}
    for steps in ridge_lengths:
        results["ridge"][steps] = summarise([ridge_case(steps, s, alpha) for s in seeds])
    for steps in conv_lengths:
        results["convnet"][steps] = summarise([convnet_case(steps, s) for s in seeds])
        print(f"convnet N={steps}: {results['convnet'][steps]}", flush=True)
    lines = [
        "| problem | N | TESLA cosine (min) | TESLA norm ratio | TUH N/3 cosine (min) | "
        "TUH norm ratio |",
        "|---|---|---|---|---|---|",
    ]
    for problem, by_n in results.items():
        for steps, s in by_n.items():
            t, u = s["tesla"], s["tuh"]
            lines.append(
                f"| {problem} | {steps} | {t['cosine_mean']:.3f} ({t['cosine_min']:.3f}) | "
                f"{t['norm_ratio_mean']:.3f} | {u['cosine_mean']:.3f} ({u['cosine_min']:.3f}) | "
                f"{u['norm_ratio_mean']:.3f} |"
            )
    print("\n".join(lines))
    meta = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seeds": seeds,
        "ridge_alpha": alpha,
        "quick": args.quick,
        "wall_s": round(time.time() - started, 1),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"meta": meta, "results": results}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        head = [
            "# TESLA and TUH against exact BPTT",
            "",
            f"`python benchmarks/step_cost/tesla_gap.py --out {args.out}` ({meta['wall_s']:.0f} s, "
            f"{meta['date']}, torch {meta['torch']}). Image gradients in float64, seeds "
            f"{seeds}: cosine with exact BPTT (mean, min over seeds) and norm ratio. Ridge: "
            f"linear student, squared error, 20 samples of 16 features, alpha = {alpha}. "
            "ConvNet: width 32, 10 random 1x8x8 images, a random expert segment (0.01 away), "
            "alpha = 0.01, full batch, no DSA. TUH keeps N/3 steps.",
            "",
        ]
        args.out.with_suffix(".md").write_text("\n".join(head + lines) + "\n")
    if not all(
        math.isfinite(v)
        for p in results.values()
        for s in p.values()
        for k in s.values()
        for v in k.values()
    ):
        sys.exit("non-finite result")


if __name__ == "__main__":
    main()
