"""Problems run both sharded (on gloo ranks, via _distributed.run_ranks) and in one process.

Every function here builds the same problem from fixed seeds, so a sharded run and a
single-process run can be compared value by value.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sharp_bilevel import DSA, SharpBilevelOptimizer, TrajectoryMatching, UnrollSettings
from sharp_bilevel.distill.networks import get_network
from sharp_bilevel.trajectory.sharded import Shard

F64 = torch.float64
N_IMAGES, CLASSES, SYN_STEPS, BATCH = 7, 3, 6, 5

#: rule settings: perturbation, its keyword arguments, soft labels, unroll settings
CASES: dict[str, dict[str, Any]] = {
    "mtt-hard": {"perturbation": "none", "soft": False},
    "mtt-soft": {"perturbation": "none", "soft": True},
    "sam": {"perturbation": "sam", "rho": 0.05, "soft": True},
    "asam": {"perturbation": "asam", "rho": 0.5, "soft": True},
    "gsam": {"perturbation": "gsam", "rho": 0.05, "alpha": 0.4, "soft": True},
    "vasso": {"perturbation": "vasso", "rho": 0.05, "theta": 0.4, "soft": True},
    "bsam": {"perturbation": "bsam", "rho": 0.05, "num_data": 100.0, "delta": 0.01, "soft": True},
    "satm": {
        "perturbation": "ssam",
        "rho": 0.05,
        "smooth": 0.01,
        "soft": True,
        "settings": UnrollSettings.satm(keep=2),
    },
}


def problem() -> dict[str, Any]:
    """Network, whole synthetic set, soft-label logits and an expert window (float64)."""
    gen = torch.Generator().manual_seed(0)
    net = get_network("ConvNet", 1, CLASSES, (8, 8), width=4, seed=0).to(F64)
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return {
        "net": net,
        "images": torch.randn(N_IMAGES, 1, 8, 8, generator=gen, dtype=F64),
        "hard": torch.arange(N_IMAGES) % CLASSES,
        "logits": torch.randn(N_IMAGES, CLASSES, generator=gen, dtype=F64),
        "start": w0,
        "target": w0 + 0.05 * torch.randn(w0.shape, generator=gen, dtype=F64),
    }


def build(name: str, shard: Shard | None, **optimizer_kwargs: Any):  # type: ignore[no-untyped-def]
    """The outer variables (this rank's rows when sharded), the optimizer and a closure maker."""
    case = CASES[name]
    p = problem()
    images, labels = p["images"], p["logits"] if case["soft"] else p["hard"]
    if shard is not None:
        images, labels = shard.rows(images), shard.rows(labels)
    images = images.clone().requires_grad_(True)
    labels = labels.clone().requires_grad_(case["soft"])
    syn_lr = torch.tensor(0.01, dtype=F64, requires_grad=True)
    sharded = shard is not None
    groups: list[dict[str, Any]] = [
        {"params": [images], "sharded": sharded},
        {"params": [syn_lr], "perturb": False, "lr": 1e-3},
    ]
    if case["soft"]:
        groups.append({"params": [labels], "perturb": False, "lr": 5.0, "sharded": sharded})
    rule = {k: v for k, v in case.items() if k not in ("perturbation", "soft", "settings")}
    opt = SharpBilevelOptimizer(
        groups,
        torch.optim.SGD,
        perturbation=case["perturbation"],
        lr=100.0,
        momentum=0.5,
        seed=7,
        closure_options={"unroll": case.get("settings") or UnrollSettings()},
        process_group=dist.group.WORLD if sharded else None,
        **rule,
        **optimizer_kwargs,
    )

    def closure(step: int) -> TrajectoryMatching:
        return TrajectoryMatching(
            p["net"],
            images,
            syn_lr,
            labels,
            expert_start=p["start"],
            expert_target=p["target"],
            syn_steps=SYN_STEPS,
            batch_syn=BATCH,
            soft_labels=case["soft"],
            augmentation=DSA(),
            seed=100 + step,
            shard=shard,
        )

    return images, labels, syn_lr, opt, closure


def run_case(name: str, shard: Shard | None, steps: int = 3) -> dict[str, Tensor]:
    """What ``steps`` outer steps change: deltas of images, labels and syn_lr, and the losses."""
    images, labels, syn_lr, opt, closure = build(name, shard)
    before = [t.detach().clone() for t in (images, labels, syn_lr)]
    losses = [float(opt.step(closure(k))) for k in range(steps)]
    after = [t.detach().clone() for t in (images, labels, syn_lr)]
    names = ("images", "labels", "syn_lr")
    out = {
        n: a - b if a.is_floating_point() else a
        for n, a, b in zip(names, after, before, strict=True)
    }
    out["losses"] = torch.tensor(losses, dtype=F64)
    out["grad_norm"] = torch.tensor(opt.last_step.grad_norm, dtype=F64)
    return out


def exactness(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    """Worker: every case on this rank's shard; also the shard it had."""
    shard = Shard.current(N_IMAGES)
    results: dict[str, Any] = {n: run_case(n, shard) for n in names}
    results["shard"] = torch.tensor([shard.offset, shard.count])
    return results


def faults(rank: int, world: int, kind: str) -> dict[str, Any]:
    """Worker: one step fails on rank 1 only; report what every rank saw and holds."""
    from sharp_bilevel.optim.distributed import DistributedStepError
    from sharp_bilevel.optim.errors import NonFiniteError

    shard = Shard.current(N_IMAGES)
    nonfinite = "skip" if kind == "nan-skip" else "raise"
    images, labels, syn_lr, opt, closure = build("sam", shard, nonfinite=nonfinite)
    opt.step(closure(0))
    before = [t.detach().clone() for t in (images, labels, syn_lr)]
    inner = closure(1)

    def failing(ctx):  # type: ignore[no-untyped-def]
        if rank == 1 and kind == "raise-before" and ctx.is_ascent:
            raise ValueError("rank 1 fails before its unroll")
        loss = inner(ctx)
        if rank == 1 and kind == "raise-after" and ctx.is_descent:
            raise ValueError("rank 1 fails after its unroll")
        if rank == 1 and kind.startswith("nan") and ctx.is_ascent:
            images.grad[0, 0, 0, 0] = float("nan")
        return loss

    outcome = "stepped"
    try:
        opt.step(failing)
    except DistributedStepError:
        outcome = "DistributedStepError"
    except NonFiniteError:
        outcome = "NonFiniteError"
    restored = all(
        torch.equal(t.detach(), b) for t, b in zip((images, labels, syn_lr), before, strict=True)
    )
    alive = False
    if dist.is_initialized():
        try:
            dist.barrier()
            alive = True
        except RuntimeError:
            alive = False
    extra: dict[str, Any] = {}
    if alive and kind == "nan-skip":  # the group still works: the next step runs normally
        opt.step(closure(2))
        extra["after_skip"] = images.detach() - before[0]
    return {
        "outcome": outcome,
        "restored": torch.tensor(restored),
        "alive": torch.tensor(alive),
        "skipped": torch.tensor(opt.skipped_steps["nonfinite"]),
        **extra,
    }


def reference_after_skip() -> Tensor:
    """Single process: step 0, then (the skipped step leaves nothing) step 2."""
    images, _, _, opt, closure = build("sam", None)
    opt.step(closure(0))
    before = images.detach().clone()
    opt.step(closure(2))
    return images.detach() - before


def pipeline(
    rank: int, world: int, checkpoint: str, iterations: int, stop_at: int | None = None, **cfg: Any
) -> dict[str, Any]:
    """Worker: the main job's distillation loop, sharded; optionally interrupted in iteration
    ``stop_at`` (every rank stops there, before its checkpoint: the one of ``stop_at`` exists
    when ``checkpoint_every`` divides it)."""
    from _pipeline_fixtures import CLASSES, config, tiny_data, tiny_experts

    from sharp_bilevel.distill.pipeline import distill

    images, labels = tiny_data()

    def progress(it: int, values: dict[str, float]) -> None:
        if it == stop_at:
            raise KeyboardInterrupt

    try:
        result = distill(
            config(iterations=iterations, **cfg),
            images,
            labels,
            CLASSES,
            tiny_experts(),
            checkpoint=checkpoint,
            progress=progress,
            process_group=dist.group.WORLD,
        )
    except KeyboardInterrupt:
        return {"stopped": torch.tensor(True)}
    return {
        "images": result.images,
        "labels": result.labels,
        "syn_lr": torch.tensor(result.syn_lr),
        "losses": torch.tensor(result.history["loss"]),
        "ema": result.ema_images if result.ema_images is not None else torch.zeros(0),
    }
