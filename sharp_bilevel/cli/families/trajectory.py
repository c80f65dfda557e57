"""Trajectory matching on the command line: ``--method mtt|ftd|datm`` and its flags.

The student takes ``N = --syn-steps`` inner steps on the synthetic set from an expert's epoch
``t`` and is matched to epoch ``t + M`` (``M = --expert-epochs``):
``L = ||w_N - w*_{t+M}||^2 / ||w*_t - w*_{t+M}||^2``. The experts come from ``--buffers`` or
are trained here (``--num-experts``, ``--train-epochs``, ``--expert-optimizer``).
"""

from __future__ import annotations

import argparse
import os

from ...distill.config import DistillConfig
from ...distill.validation import ConfigError, check_int
from .base import Family

#: Default share of parameters PAD drops (``--pad-ratio``; None on the namespace = not given).
PAD_RATIO = 0.25

METHODS = {
    "mtt": "matching training trajectories (the baseline)",
    "ftd": "MTT with an exponential moving average of the images",
    "datm": "soft labels, a start-epoch window and a loss gate",
}


def parse_keep(text: str) -> int | float | tuple[int, int] | None:
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


def add_options(group: argparse._ArgumentGroup) -> None:
    """The experts and the unroll: what only trajectory matching uses."""
    group.add_argument(
        "--buffers",
        default=None,
        help="folder of replay_buffer_{n}.pt files to use instead of training experts",
    )
    group.add_argument(
        "--num-experts", type=int, default=4, help="expert trajectories to train (or reuse)"
    )
    group.add_argument("--train-epochs", type=int, default=6, help="epochs per expert")
    group.add_argument(
        "--expert-optimizer",
        choices=("sgd", "gsam"),
        default="sgd",
        help="sgd (MTT's buffers) or gsam (FTD's flat experts)",
    )
    group.add_argument("--syn-steps", type=int, default=10, help="inner steps N")
    group.add_argument(
        "--expert-epochs", type=int, default=2, help="M: expert epochs the student must match"
    )
    group.add_argument(
        "--max-start-epoch",
        type=int,
        default=4,
        help="start epochs t are drawn from [0, max-start-epoch)",
    )
    group.add_argument(
        "--keep",
        type=parse_keep,
        default="all",
        help="TUH: inner steps to differentiate through ('all' = exact BPTT; LOW:HIGH draws "
        "the count per outer step, a random truncation window)",
    )
    group.add_argument("--reuse", action="store_true", help="TR: restart the second pass at iota")
    group.add_argument("--first-order-lr", action="store_true", help="SATM's Eq. 10 lr gradient")
    group.add_argument(
        "--hypergradient",
        choices=("bptt", "tesla", "checkpointed"),
        default="bptt",
        help="bptt; tesla (TESLA's constant-memory form; needs --first-order-lr or satm); "
        "checkpointed (exact BPTT in sub-linear memory, segments recomputed)",
    )
    group.add_argument(
        "--pad",
        choices=("depth", "loss_rank"),
        default=None,
        help="PAD's parameter selection in the matching loss (depth: the paper's; loss_rank: "
        "its released code's)",
    )
    group.add_argument(
        "--pad-ratio",
        type=float,
        default=None,
        help=f"PAD: share of parameters dropped (with --pad only; {PAD_RATIO} if unset)",
    )
    group.add_argument(
        "--match-step",
        choices=("final", "closest"),
        default="final",
        help="final (MTT) or closest (ATT: the student step nearest the target)",
    )
    group.add_argument(
        "--fixed-fraction",
        type=float,
        default=0.0,
        help="SelMatch-style partial updates: share of each class's images kept as the real "
        "images they start from (one process only)",
    )
    group.add_argument(
        "--compile-inner",
        action="store_true",
        help="torch.compile the inner steps that need no graph (compiled once per batch shape)",
    )
    group.add_argument("--lr-lr", type=float, default=1e-6, help="outer lr of syn_lr")
    group.add_argument(
        "--lr-teacher", type=float, default=0.01, help="experts' lr and the initial syn_lr"
    )
    group.add_argument("--threshold", type=float, default=1.0, help="DATM's gate")
    group.add_argument("--ema-decay", type=float, default=0.98, help="FTD's image average")


def check(args: argparse.Namespace) -> None:
    """The flags' checks that need no data (``DistillConfig`` checks the rest)."""
    for name in ("num_experts", "train_epochs"):
        check_int(name, getattr(args, name), 1)
    if args.pad_ratio is not None and args.pad is None:
        raise ConfigError(
            "pad_ratio",
            "is used only with --pad (depth or loss_rank): add --pad, or drop --pad-ratio",
        )
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if args.fixed_fraction and world > 1:
        raise ConfigError(
            "fixed_fraction",
            f"cannot be sharded over {world} torchrun ranks (SelMatch-style partial updates "
            "run in one process): drop --fixed-fraction, or run without torchrun",
        )
    needed = args.max_start_epoch - 1 + args.expert_epochs
    if args.buffers is None and needed > args.train_epochs:
        raise ConfigError(
            "expert_epochs",
            f"with --max-start-epoch {args.max_start_epoch} reaches expert epoch {needed} "
            f"(max_start_epoch - 1 + expert_epochs), beyond --train-epochs {args.train_epochs}",
        )


def config(args: argparse.Namespace, perturbation: str) -> DistillConfig:
    """The ``DistillConfig`` of one run of the sweep (``perturbation``: one rule name)."""
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
        pad_ratio=PAD_RATIO if args.pad_ratio is None else args.pad_ratio,
        match_step=args.match_step,
        fixed_fraction=args.fixed_fraction,
        autocast=args.autocast,
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


FAMILY = Family(
    title="trajectory matching (--method mtt|ftd|datm)",
    methods=METHODS,
    add_options=add_options,
    check=check,
    config=config,
)
