"""``python -m sharp_bilevel``: experts, distillation (MTT/FTD/DATM x any rule), evaluation.

With no arguments it runs on scikit-learn's bundled 8x8 digits in a few minutes on two CPU
cores: it trains expert trajectories, distils one image per class with plain MTT (``none``) and
with SATM, evaluates both (and random real images) on the distillation architecture and on
another one, and writes everything to one folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .data import DatasetSplit, load_dataset
from .evaluation import EvalResult, evaluate_synthetic, random_real_baseline
from .experts import load_buffers, save_buffers, train_expert, validate_expert
from .networks import get_network
from .pipeline import METHODS, DistillConfig, DistillResult, distill
from .report import save_curves, save_image_grid, write_json


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _keep(text: str) -> int | float | None:
    """``all`` -> None (exact BPTT), ``0.33`` -> a fraction, ``6`` -> a step count."""
    if text.lower() in ("all", "none"):
        return None
    return float(text) if "." in text else int(text)


def build_parser() -> argparse.ArgumentParser:
    """The command line of the main job."""
    p = argparse.ArgumentParser(
        prog="python -m sharp_bilevel",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("data and experts")
    data.add_argument(
        "--dataset", default="digits", help="digits | fashion-mnist | cifar10 | cifar100"
    )
    data.add_argument("--data-root", default=None, help="folder of the data files")
    data.add_argument(
        "--limit-train",
        type=int,
        default=None,
        help="use at most this many training images (Fashion-MNIST)",
    )
    data.add_argument("--model", default="ConvNet", help="distillation architecture")
    data.add_argument("--width", type=int, default=32, help="network width")
    data.add_argument(
        "--buffers",
        default=None,
        help="folder of replay_buffer_{n}.pt files to use instead of training experts",
    )
    data.add_argument("--num-experts", type=int, default=4)
    data.add_argument("--train-epochs", type=int, default=6, help="epochs per expert")
    data.add_argument(
        "--expert-optimizer",
        choices=("sgd", "gsam"),
        default="sgd",
        help="sgd (MTT's buffers) or gsam (FTD's flat experts)",
    )
    run = p.add_argument_group("distillation")
    run.add_argument("--method", choices=METHODS, default="mtt")
    run.add_argument(
        "--perturbations",
        default="none,satm",
        help="comma-separated rules; 'none' is the MTT baseline, 'satm' the preset",
    )
    run.add_argument("--rho", type=float, default=None, help="radius (rule default if unset)")
    run.add_argument("--smooth", type=float, default=None, help="smoothing gamma")
    run.add_argument(
        "--keep",
        default="all",
        help="TUH: inner steps to differentiate through ('all' = exact BPTT)",
    )
    run.add_argument("--reuse", action="store_true", help="TR: restart the second pass at iota")
    run.add_argument("--first-order-lr", action="store_true", help="SATM's Eq. 10 lr gradient")
    run.add_argument("--ipc", type=int, default=1, help="images per class")
    run.add_argument("--syn-steps", type=int, default=10, help="inner steps N")
    run.add_argument("--expert-epochs", type=int, default=2, help="M")
    run.add_argument("--max-start-epoch", type=int, default=4)
    run.add_argument("--iterations", type=int, default=100)
    run.add_argument("--lr-img", type=float, default=10.0, help="outer lr of the images")
    run.add_argument("--lr-lr", type=float, default=1e-6, help="outer lr of syn_lr")
    run.add_argument("--lr-teacher", type=float, default=0.01)
    run.add_argument("--threshold", type=float, default=1.0, help="DATM's gate")
    run.add_argument("--ema-decay", type=float, default=0.98, help="FTD's image average")
    run.add_argument("--no-dsa", action="store_true", help="switch augmentation off")
    ev = p.add_argument_group("evaluation and output")
    ev.add_argument(
        "--eval-models",
        default="ConvNet,MLP",
        help="architectures to evaluate on (the first is the distillation one)",
    )
    ev.add_argument("--eval-seeds", default="0,1,2")
    ev.add_argument("--eval-epochs", type=int, default=300)
    ev.add_argument(
        "--out", default=None, help="output folder (default runs/<dataset>-<method>-ipc<k>)"
    )
    ev.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _load_data(args: argparse.Namespace) -> DatasetSplit:
    kw: dict[str, Any] = {}
    if args.limit_train is not None:
        kw["limit_train"] = args.limit_train
    return load_dataset(args.dataset, args.data_root, **kw)


def _experts(args: argparse.Namespace, split: DatasetSplit, out: Path) -> list[Any]:
    train = split.train
    channels, h, w = train.images.shape[1:]
    network = get_network(args.model, channels, train.num_classes, (h, w), width=args.width)
    folder = Path(args.buffers) if args.buffers else out / "experts"
    if folder.exists() and any(folder.glob("replay_buffer_*.pt")):
        experts = load_buffers(folder)
        for expert in experts:
            validate_expert(expert, network)
        return experts
    if args.buffers:
        raise FileNotFoundError(f"no replay_buffer_*.pt files in {folder}")
    experts = []
    bar = tqdm(range(args.num_experts), desc="experts", disable=args.quiet)
    for k in bar:
        experts.append(
            train_expert(
                args.model,
                train,
                epochs=args.train_epochs,
                seed=args.seed * 1000 + k,
                lr=args.lr_teacher,
                optimizer=args.expert_optimizer,
                device=args.device,
                network_kwargs={"width": args.width},
            )
        )
    save_buffers(experts, folder)
    return experts


def _config(args: argparse.Namespace, perturbation: str) -> DistillConfig:
    keep = _keep(args.keep)
    return DistillConfig(
        method=args.method,
        perturbation=perturbation,
        rho=args.rho,
        smooth=args.smooth,
        keep=keep,
        reuse=args.reuse,
        lr_gradient="first_order" if args.first_order_lr else "exact",
        model=args.model,
        width=args.width,
        ipc=args.ipc,
        syn_steps=args.syn_steps,
        expert_epochs=args.expert_epochs,
        max_start_epoch=args.max_start_epoch,
        iterations=args.iterations,
        lr_img=args.lr_img,
        lr_lr=args.lr_lr,
        lr_teacher=args.lr_teacher,
        threshold=args.threshold,
        ema_decay=args.ema_decay,
        dsa=not args.no_dsa,
        seed=args.seed,
    )


def _evaluate(
    args: argparse.Namespace,
    split: DatasetSplit,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    soft: bool,
) -> dict[str, EvalResult]:
    channels, h, w = split.train.images.shape[1:]
    return evaluate_synthetic(
        images,
        labels,
        lr,
        split.test.images,
        split.test.labels,
        num_classes=split.train.num_classes,
        channels=channels,
        image_size=(h, w),
        architectures=_csv(args.eval_models),
        seeds=[int(s) for s in _csv(args.eval_seeds)],
        epochs=args.eval_epochs,
        width=args.width,
        soft_labels=soft,
        device=args.device,
    )


def _save_run(result: DistillResult, folder: Path, columns: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "images": result.images,
            "labels": result.labels,
            "syn_lr": result.syn_lr,
            "ema_images": result.ema_images,
        },
        folder / "synthetic.pt",
    )
    save_image_grid(result.images, folder / "images.png", columns)
    if result.ema_images is not None:
        save_image_grid(result.ema_images, folder / "ema_images.png", columns)


def _row(name: str, results: dict[str, EvalResult]) -> str:
    cells = "".join(f"{100 * r.mean:>10.1f} ± {100 * r.std:<5.1f}" for r in results.values())
    return f"{name:<22}{cells}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whole job; returns the process exit code."""
    args = build_parser().parse_args(argv)
    began = time.perf_counter()
    out = Path(args.out or f"runs/{args.dataset}-{args.method}-ipc{args.ipc}")
    out.mkdir(parents=True, exist_ok=True)
    split = _load_data(args)
    train = split.train
    channels, h, w = train.images.shape[1:]
    rules = _csv(args.perturbations)
    configs = [_config(args, rule) for rule in rules]  # validates every setting up front
    print(
        f"{args.dataset}: {len(train.labels)} train / {len(split.test.labels)} test images, "
        f"{channels}x{h}x{w}, {train.num_classes} classes -> {out}"
    )
    experts = _experts(args, split, out)
    print(f"{len(experts)} expert trajectories of {len(experts[0]) - 1} epochs")

    evaluations: dict[str, dict[str, EvalResult]] = {}
    runs: dict[str, dict[str, Any]] = {}
    histories: dict[str, dict[str, list[float]]] = {}
    evaluations["random real"] = random_real_baseline(
        train.images,
        train.labels,
        args.ipc,
        split.test.images,
        split.test.labels,
        num_classes=train.num_classes,
        channels=channels,
        image_size=(h, w),
        lr=args.lr_teacher,
        architectures=_csv(args.eval_models),
        seeds=[int(s) for s in _csv(args.eval_seeds)],
        epochs=args.eval_epochs,
        width=args.width,
        device=args.device,
        subset_seed=args.seed,
    )
    for config in configs:
        folder = out / config.label
        checkpoint = folder / "checkpoint.pt"
        if args.no_resume:
            checkpoint.unlink(missing_ok=True)
        bar = tqdm(total=config.iterations, desc=config.label, disable=args.quiet)

        def progress(it: int, values: dict[str, float], bar: Any = bar) -> None:
            bar.n = it + 1
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['syn_lr']:.4g}")

        result = distill(
            config,
            train.images,
            train.labels,
            train.num_classes,
            experts,
            checkpoint=checkpoint,
            device=args.device,
            progress=progress,
        )
        bar.close()
        _save_run(result, folder, columns=max(args.ipc, train.num_classes))
        evaluations[config.label] = _evaluate(
            args, split, result.images, result.labels, result.syn_lr, result.soft_labels
        )
        if result.ema_images is not None:
            evaluations[f"{config.label} (EMA)"] = _evaluate(
                args, split, result.ema_images, result.labels, result.syn_lr, result.soft_labels
            )
        histories[config.label] = result.history
        runs[config.label] = {
            "config": dataclasses.asdict(config),
            "syn_lr": result.syn_lr,
            "distill_seconds": result.seconds,
            "history": result.history,
        }
    save_curves(histories, out / "curves.png")
    header = "".join(f"{arch:>18}" for arch in _csv(args.eval_models))
    print(f"\ntest accuracy % (mean ± std over seeds {args.eval_seeds})\n{'':<22}{header}")
    for name, results in evaluations.items():
        print(_row(name, results))
    write_json(
        {
            "dataset": args.dataset,
            "settings": vars(args),
            "accuracy": {
                name: {arch: dataclasses.asdict(r) for arch, r in res.items()}
                for name, res in evaluations.items()
            },
            "runs": runs,
            "seconds": time.perf_counter() - began,
            "torch": torch.__version__,
        },
        out / "report.json",
    )
    print(
        f"\nwrote {out}/report.json, curves.png and one folder per run "
        f"({time.perf_counter() - began:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
