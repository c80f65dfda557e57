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
import datetime
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import __version__
from ..distill.checkpoint import (
    CheckpointDisagreementError,
    UnreadableFileError,
    remove_stale_temporaries,
    save_synthetic,
    tensors_sha256,
)
from ..distill.config import DistillConfig
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
from .families import family_of
from .options import DESCRIPTION, EPILOG, Parser, build_parser
from .threads import apply_threads

__all__ = ["DESCRIPTION", "EPILOG", "build_parser", "main"]

#: Kept for code that imported the parser class under its old name.
_Parser = Parser


class _Refused(Exception):
    """A user error that names no single flag (the message says what to do)."""


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _config(args: argparse.Namespace, perturbation: str) -> DistillConfig:
    """The ``DistillConfig`` of one run, built by the family of ``--method``."""
    return family_of(args.method).config(args, perturbation)


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
        except ResumeError:
            raise  # main() names each differing flag
        except ConfigError as err:  # a checkpoint further along than --iterations
            raise ConfigError(err.argument, f"{err.detail}; {_NEW_RUN}") from err


#: How to get a run that does not resume the folder's checkpoint.
_NEW_RUN = "for a new run pass another --out (or --no-resume to start this folder over)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whole job; returns the process exit code.

    A user error (a bad flag, a checkpoint these settings cannot resume, a folder that is a
    file) ends in ``SystemExit(2)`` with one line on stderr (rank 0's alone under
    ``torchrun``) and no traceback; real bugs keep theirs.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ResumeError as err:
        said = ", ".join(
            f"{flag_for(k)} {old!r} (now {new!r})" for k, (old, new) in err.changes.items()
        )
        parser.error(f"cannot resume {err.path}: it was written with {said}; {_NEW_RUN}")
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
    family_of(args.method).check(args)
    configs = [_config(args, rule) for rule in rules]  # validates every setting up front
    out = Path(args.out or f"runs/{args.dataset}-{args.method}-ipc{args.ipc}")
    threads = apply_threads(args.threads)  # before any torch work
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
    say(f"{threads.threads} CPU thread{'s' * (threads.threads > 1)}: {threads.reason}")
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
        ran, preset = result.config.ran()
        runs[label] = {
            "config": ran,
            "preset": _preset_note(result.config.perturbation, preset),
            "resolved": result.config.resolved(),
            "syn_lr": result.syn_lr,
            "distill_seconds": result.seconds,
            "diagnostics": result.diagnostics.as_dict(),
            "warnings": result.diagnostics.problems(),
            "history": result.history,
        }
    bar.close()
    save_curves(
        {label: r.history for label, r in results.items()},
        out / "curves.png",
        title=f"{args.dataset}, IPC {args.ipc}",
    )
    save_accuracy_chart(
        {k: {a: (r.mean, r.std) for a, r in v.items()} for k, v in evaluations.items()},
        out / "accuracy.png",
        title=f"{args.dataset}, IPC {args.ipc}",
    )
    header = "".join(f"{arch:>18}" for arch in _csv(args.eval_models))
    print(f"\ntest accuracy % (mean ± std over seeds {args.eval_seeds})\n{'':<22}{header}")
    for name, scores in evaluations.items():
        print(_row(name, scores))
    write_json(
        {
            "sharp_bilevel": __version__,
            "written_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "dataset": args.dataset,
            "settings": vars(args),
            "settings_note": "the command line as given; runs.<run>.config holds what ran",
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
            "thread_choice": threads.as_dict(),
            "device": args.device,
        },
        out / "report.json",
    )
    print(
        f"\nwrote {out}/report.json, curves.png, accuracy.png and one folder per run "
        f"({time.perf_counter() - began:.0f} s)"
    )
    return 0


def _preset_note(perturbation: str, fields: list[str]) -> dict[str, Any] | None:
    """Which of a run's ``config`` values a preset set (None: every value is as given)."""
    if not fields:
        return None
    return {
        "name": perturbation.lower(),
        "fields": fields,
        "note": "SATM's preset (smoothed SAM + TUH + TR + first-order lr) set these, whatever "
        "the flags said",
    }


def _silent(*args: object, **kwargs: object) -> None:
    """``print`` for ranks other than 0."""


def _barrier(launch: Launch) -> None:
    if launch.world_size > 1:
        dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
