"""The evidence benchmark's jobs, each run in a worker process with plain dicts in and out:
train an expert, distil one set, evaluate it, measure its flatness and its accuracy under
perturbations, the init and random-real references, the truncated/exact hypergradient norm ratio.
The data and experts are loaded once per worker (``context``)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.evidence.plan import Plan, keep_steps, row_overrides
from benchmarks.evidence.report import BASE, run_key
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
        expert_file(cache, k).is_file() for k in range(plan.num_experts)
    ):
        _CONTEXT["experts"] = [
            torch.load(expert_file(cache, k), weights_only=True) for k in range(plan.num_experts)
        ]
    return _CONTEXT


def expert_file(cache: Path, k: int) -> Path:
    return cache / "experts" / f"expert_{k}.pt"


def set_file(cache: Path, key: str) -> Path:
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
    path = expert_file(cache, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(expert, path)
    return {"seconds": time.perf_counter() - began}


def job_distill(plan: Plan, cache: Path, ipc: int, row: str, lr: float, seed: int) -> dict:
    ctx = context(plan, cache)
    config = config_for(plan, ipc, row, lr, seed)
    train: ImageDataset = ctx["train"]
    result = distill(config, train.images, train.labels, 10, ctx["experts"])
    images = result.ema_images if result.ema_images is not None else result.images
    path = set_file(cache, run_key(ipc, row, lr, seed))
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
    data: dict[str, Any] = torch.load(set_file(cache, key), weights_only=True)
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
