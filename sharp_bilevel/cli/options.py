"""The main job's command line: the common options once, then one group per family.

``--help`` shows the groups in this order: data, distillation (every family), one group per
family of `sharp_bilevel.cli.families.FAMILIES` (titled by the family), evaluation and output,
and the run's machine (seed, device, threads).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import NoReturn

from ..distill.config import NONFINITE_POLICIES
from ..trajectory.matching import autocast_dtype
from .families import FAMILIES, all_methods

DESCRIPTION = (
    "The main job: train expert trajectories, distil a synthetic set with MTT, FTD or DATM "
    "and any perturbation rule, evaluate it on several architectures and write images, curves "
    "and a JSON report. With no arguments it runs on scikit-learn's bundled 8x8 digits (one "
    "image per class, plain MTT and SATM) in under a minute on two idle CPU cores."
)
EPILOG = (
    "Several GPUs or machines: torchrun --nproc_per_node=K -m sharp_bilevel ... (the synthetic "
    "set is sharded over the K ranks). Slow on a busy machine: see --threads. Docs: the "
    "command-line page of the docs site."
)


#: Seconds a rank other than 0 waits before exiting on a user error, so that rank 0 prints
#: its line before ``torchrun``, seeing a rank exit, stops the others.
RANK_EXIT_DELAY = 1.0


class Parser(argparse.ArgumentParser):
    """argparse that reports a user error in one line (no usage block, no traceback) and
    exits with ``SystemExit(2)``; under ``torchrun`` only rank 0 prints it."""

    def error(self, message: str) -> NoReturn:
        if os.environ.get("RANK", "0") == "0":
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
        time.sleep(RANK_EXIT_DELAY)
        self.exit(2)


def parse_autocast(text: str) -> str | None:
    """``--autocast``: any spelling `autocast_dtype` accepts -> ``"bfloat16"``, ``"float16"``
    or None (off)."""
    try:
        dtype = autocast_dtype(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("autocast ")) from None
    return None if dtype is None else str(dtype).removeprefix("torch.")


def parse_threads(text: str) -> int:
    """``--threads``: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _data(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
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


def _distillation(p: argparse.ArgumentParser) -> None:
    methods = all_methods()
    run = p.add_argument_group("distillation (every family)")
    run.add_argument(
        "--method",
        choices=tuple(methods),
        default="mtt",
        help="; ".join(f"{name}: {text}" for name, text in methods.items()),
    )
    run.add_argument(
        "--perturbations",
        default="none,satm",
        help="comma-separated rules; 'none' is the MTT baseline, 'satm' the preset",
    )
    run.add_argument("--rho", type=float, default=None, help="radius (rule default if unset)")
    run.add_argument("--smooth", type=float, default=None, help="smoothing gamma")
    run.add_argument("--ipc", type=int, default=1, help="images per class")
    run.add_argument(
        "--iterations", type=int, default=100, help="outer steps (raise it to extend a run)"
    )
    run.add_argument("--lr-img", type=float, default=10.0, help="outer lr of the images")
    run.add_argument(
        "--autocast",
        type=parse_autocast,
        default="off",
        help="mixed precision inside the unroll: bf16/bfloat16, fp16/float16 (adds a "
        "GradScaler) or off; weights, images and gradients stay float32",
    )
    run.add_argument("--no-dsa", action="store_true", help="switch augmentation off")
    run.add_argument(
        "--nonfinite",
        choices=NONFINITE_POLICIES,
        default="raise",
        help="a NaN/inf outer loss or hypergradient stops the run (raise) or skips the step",
    )


def _evaluation(p: argparse.ArgumentParser) -> None:
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
    ev.add_argument("--quiet", action="store_true", help="no progress bars")


def _machine(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("seed, device and threads")
    run.add_argument(
        "--seed", type=int, default=0, help="seeds the experts, the initial images and the run"
    )
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index>")
    run.add_argument(
        "--threads",
        type=parse_threads,
        default=None,
        help="torch's intra-op CPU threads (default: OMP_NUM_THREADS if set, else the idle "
        "cores: usable cores minus the load average, at least 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of the main job: common groups, then one group per family."""
    p = Parser(
        prog="python -m sharp_bilevel",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data(p)
    _distillation(p)
    for family in FAMILIES:
        family.add_options(p.add_argument_group(family.title))
    _evaluation(p)
    _machine(p)
    return p
