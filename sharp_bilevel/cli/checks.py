"""The command line's checks of its own flags, all run before any expert is trained.

Each raises `ConfigError` with the setting's name; the
command line prints it as ``argument --flag: ...`` (`flag_for` turns names into flags) and
exits with status 2. The settings of each distillation run are checked by ``DistillConfig`` itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from ..distill.data import DATASETS, DatasetSplit
from ..distill.experts import Expert, validate_expert
from ..distill.networks import available_networks, get_network
from ..distill.validation import ConfigError, check_int, check_seed
from ..optim.perturbations.registry import available_perturbations, rule_parameters

#: Settings whose flag is not ``--`` + the name with ``-`` for ``_``.
_FLAGS = {
    "perturbation": "--perturbations",
    "lr_gradient": "--first-order-lr",
    "dsa": "--no-dsa",
    "root": "--data-root",
    "epochs": "--train-epochs",
    "architectures": "--eval-models",
}
#: ``DistillConfig`` fields the command line leaves at their defaults.
_NO_FLAG = frozenset(
    {
        "batch_syn",
        "lr_labels",
        "min_start_epoch",
        "current_max_start_epoch",
        "expansion_end_epoch",
        "checkpoint_every",
    }
)


def flag_for(name: str) -> str:
    """The command-line flag of a setting (``lr_img`` -> ``--lr-img``)."""
    if name in _NO_FLAG:
        return f"{name} (DistillConfig field; no flag)"
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _dataset_key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def _int_list(name: str, text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(name, f"must be a comma-separated list of ints, got {text!r}")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(name, f"must be a comma-separated list of ints, got {text!r}") from None
    for v in values:
        check_seed(name, v)
    return values


def _is_rule(name: str) -> bool:
    if name.lower() == "satm":
        return True
    try:
        rule_parameters(name)  # resolves aliases, any case
    except ValueError:
        return False
    return True


def _names(
    name: str, text: str, known: list[str], is_known: Callable[[str], bool] | None = None
) -> list[str]:
    """A comma-separated list of distinct names from ``known`` (any case) or ``is_known``."""
    parts = [p.strip() for p in text.split(",")]
    lowered = {k.lower() for k in known}
    allowed = ", ".join(known)
    if any(not p for p in parts):
        raise ConfigError(name, f"must be a comma-separated list of {allowed}; got {text!r}")
    for p in parts:
        if not (is_known(p) if is_known else p.lower() in lowered):
            raise ConfigError(name, f"has the unknown name {p!r}; known: {allowed}")
    if len({p.lower() for p in parts}) != len(parts):
        raise ConfigError(name, f"names a value twice: {text!r}")
    return parts


def _check_device(text: str) -> None:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError("device", f"must be cpu, cuda or cuda:<index>; got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError("device", f"is {text!r}, but no CUDA device is available here")
        if device.index is not None and device.index >= count:
            raise ConfigError("device", f"is {text!r}, but only cuda:0..cuda:{count - 1} exist")
    elif device.type != "cpu":
        raise ConfigError("device", f"must be cpu, cuda or cuda:<index>; got {text!r}")


def check_arguments(args: argparse.Namespace) -> list[str]:
    """Check the common flags that need no data; return the rule names of ``--perturbations``
    (each family checks its own flags: `sharp_bilevel.cli.families`)."""
    if _dataset_key(args.dataset) not in {_dataset_key(d) for d in DATASETS}:
        raise ConfigError("dataset", f"must be one of {', '.join(DATASETS)}; got {args.dataset!r}")
    if args.data_root is not None and _dataset_key(args.dataset) == "digits":
        raise ConfigError("data_root", "is not used by digits (they ship with scikit-learn)")
    if args.limit_train is not None:
        if _dataset_key(args.dataset) == "digits":
            raise ConfigError(
                "limit_train", "applies to fashion-mnist, mnist, cifar10 and cifar100"
            )
        check_int("limit_train", args.limit_train, 1)
    check_int("eval_epochs", args.eval_epochs, 1)
    _check_out(args.out)
    if args.buffers is not None and not any(
        p.is_file() for p in Path(args.buffers).glob("replay_buffer_*.pt")
    ):
        raise ConfigError("buffers", f"{args.buffers} holds no replay_buffer_{{n}}.pt files")
    _names("eval_models", args.eval_models, available_networks())
    _int_list("eval_seeds", args.eval_seeds)
    _check_device(args.device)
    rules = _names(
        "perturbations", args.perturbations, ["satm", *available_perturbations()], _is_rule
    )
    return rules


def _check_out(out: str | None) -> None:
    """``--out`` must be a folder, or a path whose nearest existing part is one."""
    if out is None:
        return
    path = Path(out)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                what = f"{out} is a file" if part == path else f"{part} (in {out}) is a file"
                raise ConfigError(
                    "out",
                    "must be a folder (a new one, or an earlier run's to resume it), but "
                    f"{what}: choose another --out",
                )
            return


def check_data(args: argparse.Namespace, split: DatasetSplit) -> None:
    """Checks that need the loaded data: every class has ``--ipc`` images."""
    smallest = min(split.train.class_counts())
    if args.ipc > smallest:
        raise ConfigError(
            "ipc",
            f"must be at most {smallest} for {args.dataset} (its smallest class has {smallest} "
            f"training images), got {args.ipc}",
        )


def check_experts(args: argparse.Namespace, split: DatasetSplit, experts: list[Expert]) -> None:
    """Given buffers must fit the network and be long enough for the matching window."""
    train = split.train
    network = get_network(
        args.model, train.channels, train.num_classes, train.image_size, width=args.width
    )
    for k, expert in enumerate(experts):
        try:
            validate_expert(expert, network)
        except ValueError as err:
            raise ConfigError("buffers", f"expert {k}: {err}") from err
    shortest = min(len(e) - 1 for e in experts)
    needed = args.max_start_epoch - 1 + args.expert_epochs
    if needed > shortest:
        raise ConfigError(
            "expert_epochs",
            f"with --max-start-epoch {args.max_start_epoch} reaches expert epoch {needed}, but "
            f"the shortest expert trajectory ends at epoch {shortest}",
        )
