"""Pieces shared by the MTT, FTD and DATM adapters: reading an MTT fork's settings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sharp_bilevel.trajectory.augment import DSA, DSAParams
from sharp_bilevel.trajectory.matching import check_window

# MTT's ParamDiffAug attribute -> our DSAParams field (facts from MTT's utils.py).
_MTT_DSA_FIELDS = {
    "prob_flip": "flip",
    "ratio_scale": "scale",
    "ratio_rotate": "rotate",
    "ratio_crop_pad": "crop",
    "ratio_cutout": "cutout",
    "brightness": "brightness",
    "saturation": "saturation",
    "contrast": "contrast",
}


def setting(args: Any, name: str, given: Any, default: Any = None) -> Any:
    """``given`` if not None, else ``args.<name>`` if present, else ``default``."""
    if given is not None:
        return given
    if args is not None and hasattr(args, name):
        return getattr(args, name)
    return default


def dsa_from_fork(dsa: bool | None, strategy: str | None, param: Any) -> DSA | None:
    """Our replayable ``DSA`` from an MTT fork's ``args.dsa``, ``args.dsa_strategy`` and
    ``args.dsa_param`` (a ``ParamDiffAug``; its strengths are copied field by field)."""
    if not dsa:
        return None
    values: dict[str, Any] = {}
    if strategy is not None:
        values["strategy"] = strategy
    for theirs, ours in _MTT_DSA_FIELDS.items():
        if param is not None and hasattr(param, theirs):
            values[ours] = float(getattr(param, theirs))
    return DSA(DSAParams(**values))


def expert_endpoints(
    trajectory: Sequence[Any], start_epoch: int, expert_epochs: int
) -> tuple[Any, Any]:
    """``(w*_t, w*_{t+M})`` from one expert (a list of epochs, each a flat vector or a list of
    per-parameter tensors), with a clear error when ``t + M`` is past the trajectory."""
    check_window(len(trajectory), start_epoch, expert_epochs)
    return _on_cpu(trajectory[start_epoch]), _on_cpu(trajectory[start_epoch + expert_epochs])


def _on_cpu(snapshot: Any) -> Any:
    if isinstance(snapshot, Tensor):
        return snapshot.detach()
    return [torch.as_tensor(t).detach() for t in snapshot]
