"""``python -m sharp_bilevel``: experts, distillation (MTT/FTD/DATM x any rule), evaluation.

With no arguments it runs on scikit-learn's bundled 8x8 digits in under a minute on two idle CPU
cores: it trains expert trajectories, distils one image per class with plain MTT (``none``) and
with SATM, evaluates both (and random real images) on the distillation architecture and on
another one, and writes everything to one folder. Under ``torchrun`` the synthetic set is
sharded over the ranks; rank 0 writes and evaluates.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..distill.checkpoint import (
    CheckpointDisagreementError,
    UnreadableFileError,
    remove_stale_temporaries,
    save_synthetic,
    tensors_sha256,
)
from ..distill.config import METHODS, NONFINITE_POLICIES, DistillConfig
from ..distill.data import DatasetSplit, load_dataset
from ..distill.diagnostics import DistillationWarning
from ..distill.evaluation import EvalResult, evaluate_synthetic, random_real_baseline
from ..distill.expert_store import (
    ExpertFolderError,
    ExpertManifest,
    ExpertSettingsError,
    clear_experts,
    describe_buffers,
    load_or_train_experts,
)
from ..distill.experts import Expert, train_expert
from ..distill.pipeline import DistillResult, ResumeError, check_checkpoint, distill
from ..distill.report import save_accuracy_chart, save_class_grid, save_curves, write_json
from ..distill.sharding import Launch, launch_from_environment
from ..distill.validation import ConfigError
from ..optim.errors import NonFiniteError
from .checks import check_arguments, check_data, check_experts, flag_for

DESCRIPTION = (
    "The main job: train expert trajectories, distil a synthetic set with MTT, FTD or DATM "
    "and any perturbation rule, evaluate it on several architectures and write images, curves "
    "and a JSON report. With no arguments it runs on scikit-learn's bundled 8x8 digits (one "
    "image per class, plain MTT and SATM) in under a minute on two idle CPU cores."
)
EPILOG = (
    "Several GPUs or machines: torchrun --nproc_per_node=K -m sharp_bilevel ... (the synthetic "
    "set is sharded over the K ranks). Docs: the command-line page of the docs site."
)


class _Refused(Exception):
    """A user error that names no single flag (the message says what to do)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a user error in one line (no usage block) and exits with 2; under
    ``torchrun`` only rank 0 prints it."""

    def error(self, message: str) -> NoReturn:
        main_rank = os.environ.get("RANK", "0") == "0"
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if main_rank else None)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _keep(text: str) -> int | float | tuple[int, int] | None:
    """``all`` -> None (exact BPTT), ``0.33`` -> a fraction, ``6`` -> a step count, ``2:6`` ->
    a random window (a count drawn per outer step from 2..6)."""
    if text.lower() in ("all", "none"):
        return None
    try:
        if ":" in text:
            low, high = text.split(":")
            return int(low), int(high)
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "must be 'all', a step count >= 1, a fraction in (0, 1] or a window LOW:HIGH, "
            f"got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of the main job."""
    p = _Parser(
        prog="python -m sharp_bilevel",
        description=DESCRIPTION,
        epilog=EPILOG,
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
        help="use at most this many training images (fashion-mnist, cifar10, cifar100)",
    )
    data.add_argument("--model", default="ConvNet", help="distillation architecture")
    data.add_argument("--width", type=int, default=32, help="network width")
    data.add_argument(
        "--buffers",
        default=None,
        help="folder of replay_buffer_{n}.pt files to use instead of training experts",
    )
    data.add_argument(
        "--num-experts", type=int, default=4, help="expert trajectories to train (or reuse)"
    )
    data.add_argument("--train-epochs", type=int, default=6, help="epochs per expert")
    data.add_argument(
        "--expert-optimizer",
        choices=("sgd", "gsam"),
        default="sgd",
        help="sgd (MTT's buffers) or gsam (FTD's flat experts)",
    )
    run = p.add_argument_group("distillation")
    run.add_argument(
        "--method",
        choices=METHODS,
        default="mtt",
        help="mtt, ftd (image EMA) or datm (soft labels, start-epoch window, loss gate)",
    )
    run.add_argument(
        "--perturbations",
        default="none,satm",
        help="comma-separated rules; 'none' is the MTT baseline, 'satm' the preset",
    )
    run.add_argument("--rho", type=float, default=None, help="radius (rule default if unset)")
    run.add_argument("--smooth", type=float, default=None, help="smoothing gamma")
    run.add_argument(
        "--keep",
        type=_keep,
        default="all",
        help="TUH: inner steps to differentiate through ('all' = exact BPTT; LOW:HIGH draws "
        "the count per outer step, a random truncation window)",
    )
    run.add_argument("--reuse", action="store_true", help="TR: restart the second pass at iota")
    run.add_argument("--first-order-lr", action="store_true", help="SATM's Eq. 10 lr gradient")
    run.add_argument(
        "--hypergradient",
        choices=("bptt", "tesla", "checkpointed"),
        default="bptt",
        help="bptt; tesla (TESLA's constant-memory form; needs --first-order-lr or satm); "
        "checkpointed (exact BPTT in sub-linear memory, segments recomputed)",
    )
    run.add_argument(
        "--pad",
        choices=("depth", "loss_rank"),
        default=None,
        help="PAD's parameter selection in the matching loss (depth: the paper's; loss_rank: "
        "its released code's)",
    )
    run.add_argument(
        "--pad-ratio", type=float, default=0.25, help="PAD: share of parameters dropped"
    )
    run.add_argument(
        "--match-step",
        choices=("final", "closest"),
        default="final",
        help="final (MTT) or closest (ATT: the student step nearest the target)",
    )
    run.add_argument(
        "--fixed-fraction",
        type=float,
        default=0.0,
        help="SelMatch-style partial updates: share of each class's images kept as the real "
        "images they start from",
    )
    run.add_argument(
        "--autocast",
        choices=("off", "bfloat16", "float16"),
        default="off",
        help="mixed precision inside the unroll (float16 adds a GradScaler; weights, images "
        "and gradients stay float32)",
    )
    run.add_argument(
        "--compile-inner",
        action="store_true",
        help="torch.compile the inner steps that need no graph (compiled once per batch shape)",
    )
    run.add_argument("--ipc", type=int, default=1, help="images per class")
    run.add_argument("--syn-steps", type=int, default=10, help="inner steps N")
    run.add_argument(
        "--expert-epochs", type=int, default=2, help="M: expert epochs the student must match"
    )
    run.add_argument(
        "--max-start-epoch",
        type=int,
        default=4,
        help="start epochs t are drawn from [0, max-start-epoch)",
    )
    run.add_argument(
        "--iterations", type=int, default=100, help="outer steps (raise it to extend a run)"
    )
    run.add_argument("--lr-img", type=float, default=10.0, help="outer lr of the images")
    run.add_argument("--lr-lr", type=float, default=1e-6, help="outer lr of syn_lr")
    run.add_argument(
        "--lr-teacher", type=float, default=0.01, help="experts' lr and the initial syn_lr"
    )
    run.add_argument("--threshold", type=float, default=1.0, help="DATM's gate")
    run.add_argument("--ema-decay", type=float, default=0.98, help="FTD's image average")
    run.add_argument("--no-dsa", action="store_true", help="switch augmentation off")
    run.add_argument(
        "--nonfinite",
        choices=NONFINITE_POLICIES,
        default="raise",
        help="a NaN/inf outer loss or hypergradient stops the run (raise) or skips the step",
    )
    ev = p.add_argument_group("evaluation and output")
    ev.add_argument(
        "--eval-models",
        default="ConvNet,MLP",
        help="architectures to evaluate on (the first is the distillation one)",
    )
    ev.add_argument(
        "--eval-seeds", default="0,1,2", help="comma-separated seeds of the evaluation networks"
    )
    ev.add_argument(
        "--eval-epochs", type=int, default=300, help="epochs to train each evaluation network"
    )
    ev.add_argument(
        "--out", default=None, help="output folder (default runs/<dataset>-<method>-ipc<k>)"
    )
    ev.add_argument(
        "--no-resume",
        action="store_true",
        help="start over: retrain the experts in <out>/experts and ignore checkpoints",
    )
    ev.add_argument(
        "--seed", type=int, default=0, help="seeds the experts, the initial images and the run"
    )
    ev.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index>")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _config(args: argparse.Namespace, perturbation: str) -> DistillConfig:
    return DistillConfig(
        method=args.method,
        perturbation=perturbation,
        rho=args.rho,
        smooth=args.smooth,
        keep=args.keep,
        reuse=args.reuse,
        lr_gradient="first_order" if args.first_order_lr else "exact",
        hypergradient=args.hypergradient,
        pad=args.pad,
        pad_ratio=args.pad_ratio,
        match_step=args.match_step,
        fixed_fraction=args.fixed_fraction,
        autocast=None if args.autocast == "off" else args.autocast,
        compile_inner=args.compile_inner,
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
        nonfinite=args.nonfinite,
    )


def _load_data(args: argparse.Namespace) -> DatasetSplit:
    kw: dict[str, Any] = {}
    if args.limit_train is not None:
        kw["limit_train"] = args.limit_train
    try:
        return load_dataset(args.dataset, args.data_root, **kw)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError("data_root", f"cannot read {args.dataset}: {err}") from err


def _expert_settings(args: argparse.Namespace, split: DatasetSplit) -> dict[str, Any]:
    """What determines the trained experts (recorded in the expert folder's manifest)."""
    return {
        "dataset": args.dataset,
        "limit_train": args.limit_train,
        "train_images_sha256": tensors_sha256([split.train.images, split.train.labels]),
        "model": args.model,
        "width": args.width,
        "train_epochs": args.train_epochs,
        "expert_optimizer": args.expert_optimizer,
        "lr_teacher": args.lr_teacher,
        "seed": args.seed,
    }


def _experts(
    args: argparse.Namespace, split: DatasetSplit, out: Path, *, train: bool = True
) -> tuple[list[Expert], ExpertManifest, str]:
    """The experts, their manifest and where they came from; ``train=False`` (ranks other
    than 0) only loads what rank 0 left in the folder."""
    if args.buffers:
        try:
            experts, manifest = describe_buffers(args.buffers)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError("buffers", str(err)) from err
        return experts, manifest, "given"
    folder = out / "experts"
    if args.no_resume:
        clear_experts(folder)
    bar = tqdm(total=args.num_experts, desc="experts", disable=args.quiet)
    trained: list[int] = []

    def train_one(k: int) -> Expert:
        if not train:
            raise RuntimeError(f"expert {k} is missing from {folder} after rank 0 trained them")
        expert = train_expert(
            args.model,
            split.train,
            epochs=args.train_epochs,
            seed=args.seed * 1000 + k,
            lr=args.lr_teacher,
            optimizer=args.expert_optimizer,
            device=args.device,
            network_kwargs={"width": args.width},
        )
        bar.update(1)
        trained.append(k)
        return expert

    settings = _expert_settings(args, split)
    try:
        experts, manifest = load_or_train_experts(folder, settings, args.num_experts, train_one)
    except ExpertSettingsError as err:
        said = ", ".join(
            f"{flag_for(k)} {old!r} (now {new!r})" for k, (old, new) in err.changes.items()
        )
        raise ConfigError(
            next(iter(err.changes)),
            f"differs from the experts in {folder}, trained with {said}; pass --no-resume to "
            "retrain them, or another --out",
        ) from err
    finally:
        bar.close()
    source = f"trained {len(trained)}, loaded {len(experts) - len(trained)}"
    return experts, manifest, source


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


def _save_run(result: DistillResult, folder: Path) -> None:
    save_synthetic(
        folder / "synthetic.pt", result.images, result.labels, result.syn_lr, result.ema_images
    )
    panels = {"initial": result.initial_images, "distilled": result.images}
    if result.ema_images is not None:
        panels["EMA of the images"] = result.ema_images
    save_class_grid(
        {k: v for k, v in panels.items() if v is not None},
        result.config.ipc,
        folder / "images.png",
    )


def _row(name: str, results: dict[str, EvalResult]) -> str:
    cells = "".join(f"{100 * r.mean:>10.1f} ± {100 * r.std:<5.1f}" for r in results.values())
    return f"{name:<22}{cells}"


def _distill_one(
    args: argparse.Namespace,
    config: DistillConfig,
    split: DatasetSplit,
    experts: list[Expert],
    experts_id: str,
    folder: Path,
    group: Any = None,
) -> DistillResult:
    checkpoint = folder / "checkpoint.pt"
    bar = tqdm(total=config.iterations, desc=config.label, disable=args.quiet)

    def progress(it: int, values: dict[str, float]) -> None:
        bar.n = it + 1
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['syn_lr']:.4g}")

    train = split.train
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DistillationWarning)
            result = distill(
                config,
                train.images,
                train.labels,
                train.num_classes,
                experts,
                checkpoint=checkpoint,
                device=args.device,
                progress=progress,
                experts_id=experts_id,
                process_group=group,
            )
    finally:
        bar.close()
    for warning in caught:
        if issubclass(warning.category, DistillationWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return result


def _check_checkpoints(
    args: argparse.Namespace, out: Path, configs: list[DistillConfig], experts_id: str | None = None
) -> None:
    """Refuse early a checkpoint that these settings (and experts) cannot resume."""
    if args.no_resume:
        return
    for config in configs:
        try:
            check_checkpoint(out / config.label / "checkpoint.pt", config, experts_id)
        except UnreadableFileError as err:
            raise _Refused(f"{err}; pass --no-resume to start over") from err


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whole job; returns the process exit code (2 for a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ResumeError as err:
        said = ", ".join(
            f"{flag_for(k)} {old!r} (now {new!r})" for k, (old, new) in err.changes.items()
        )
        parser.error(
            f"cannot resume {err.path}: it was written with {said}; pass --no-resume to start "
            "over, or another --out"
        )
    except ConfigError as err:
        parser.error(f"argument {flag_for(err.argument)}: {err.detail}")
    except (ExpertFolderError, _Refused, CheckpointDisagreementError, UnreadableFileError) as err:
        parser.error(str(err))
    except NonFiniteError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    rules = check_arguments(args)
    configs = [_config(args, rule) for rule in rules]  # validates every setting up front
    out = Path(args.out or f"runs/{args.dataset}-{args.method}-ipc{args.ipc}")
    split = _load_data(args)
    check_data(args, split)
    launch = launch_from_environment(args.device)
    if launch.backend == "nccl":
        args.device = f"cuda:{launch.local_rank}"
    args.quiet = args.quiet or not launch.is_main
    say = print if launch.is_main else _silent
    if launch.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        if args.no_resume:
            for config in configs:
                (out / config.label / "checkpoint.pt").unlink(missing_ok=True)
    _barrier(launch)  # nobody reads a checkpoint rank 0 is about to remove
    train = split.train
    channels, h, w = train.images.shape[1:]
    say(
        f"{args.dataset}: {len(train.labels)} train / {len(split.test.labels)} test images, "
        f"{channels}x{h}x{w}, {train.num_classes} classes -> {out}"
        + (f" ({launch.world_size} ranks, {launch.backend})" if launch.world_size > 1 else "")
    )
    _check_checkpoints(args, out, configs)  # before training experts
    if launch.is_main:
        experts, manifest, source = _experts(args, split, out)
    _barrier(launch)  # the other ranks load what rank 0 trained
    if not launch.is_main:
        args.no_resume = False
        experts, manifest, source = _experts(args, split, out, train=False)
    check_experts(args, split, experts)
    experts_id = manifest.identity(len(experts))
    say(f"{len(experts)} expert trajectories of {len(experts[0]) - 1} epochs ({source})")
    _check_checkpoints(args, out, configs, experts_id)  # before any evaluation

    group = dist.group.WORLD if launch.world_size > 1 else None
    results = {}
    for config in configs:
        folder = out / config.label
        result = _distill_one(args, config, split, experts, experts_id, folder, group)
        if launch.is_main:
            _save_run(result, folder)
        results[config.label] = result
    if launch.world_size > 1:
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()  # evaluation is rank 0's alone
    if not launch.is_main:
        return 0

    evaluations: dict[str, dict[str, EvalResult]] = {}
    first = next(iter(results.values()))
    rows = 2 + sum(1 + (r.ema_images is not None) for r in results.values())
    bar = tqdm(total=rows, desc="evaluate", disable=args.quiet)
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
    bar.update(1)
    if first.initial_images is not None and first.initial_labels is not None:
        evaluations["initial images"] = _evaluate(
            args, split, first.initial_images, first.initial_labels, args.lr_teacher,
            first.soft_labels,
        )  # fmt: skip
    bar.update(1)
    runs: dict[str, dict[str, Any]] = {}
    for label, result in results.items():
        evaluations[label] = _evaluate(
            args, split, result.images, result.labels, result.syn_lr, result.soft_labels
        )
        bar.update(1)
        if result.ema_images is not None:
            evaluations[f"{label} (EMA)"] = _evaluate(
                args, split, result.ema_images, result.labels, result.syn_lr, result.soft_labels
            )
            bar.update(1)
        runs[label] = {
            "config": dataclasses.asdict(result.config),
            "resolved": result.config.resolved(),
            "syn_lr": result.syn_lr,
            "distill_seconds": result.seconds,
            "diagnostics": result.diagnostics.as_dict(),
            "warnings": result.diagnostics.problems(),
            "history": result.history,
        }
    bar.close()
    save_curves({label: r.history for label, r in results.items()}, out / "curves.png")
    save_accuracy_chart(
        {k: {a: (r.mean, r.std) for a, r in v.items()} for k, v in evaluations.items()},
        out / "accuracy.png",
    )
    header = "".join(f"{arch:>18}" for arch in _csv(args.eval_models))
    print(f"\ntest accuracy % (mean ± std over seeds {args.eval_seeds})\n{'':<22}{header}")
    for name, scores in evaluations.items():
        print(_row(name, scores))
    write_json(
        {
            "dataset": args.dataset,
            "settings": vars(args),
            "experts": {
                "source": source,
                "folder": str(args.buffers or out / "experts"),
                "count": len(experts),
                "epochs": len(experts[0]) - 1,
                "identity": experts_id,
                "manifest": manifest.to_dict(),
            },
            "distributed": {
                "world_size": launch.world_size,
                "backend": launch.backend,
                "mode": launch.mode,
            },
            "accuracy": {
                name: {arch: dataclasses.asdict(r) for arch, r in res.items()}
                for name, res in evaluations.items()
            },
            "runs": runs,
            "seconds": time.perf_counter() - began,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
        },
        out / "report.json",
    )
    print(
        f"\nwrote {out}/report.json, curves.png, accuracy.png and one folder per run "
        f"({time.perf_counter() - began:.0f} s)"
    )
    return 0


def _silent(*args: object, **kwargs: object) -> None:
    """``print`` for ranks other than 0."""


def _barrier(launch: Launch) -> None:
    if launch.world_size > 1:
        dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
