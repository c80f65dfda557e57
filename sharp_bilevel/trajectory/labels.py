"""Up-front checks of the objective's labels, so a wrong dtype or class index fails before the
unroll with the argument named, not as a raw torch error deep inside it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .student import Student

_INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def output_width(student: Student) -> int | None:
    """Classes the network predicts: the ``out_features`` of its last ``nn.Linear`` (MTT's
    ConvNet, ResNet and MLP heads), or None when it has none (then pass ``num_classes``)."""
    module = getattr(student, "module", None)
    if not isinstance(module, nn.Module):
        return None
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else None


def check_labels(name: str, labels: Tensor, soft: bool, num_classes: int | None) -> None:
    """Hard labels: an integer dtype and ``0 <= y < num_classes``; soft labels: float logits
    ``[n, num_classes]``. Raises ``ValueError`` naming ``name`` and the allowed values."""
    if soft:
        if not labels.is_floating_point():
            raise ValueError(
                f"{name} must be float label logits [n, classes] with soft_labels=True, got "
                f"{labels.dtype}"
            )
        if num_classes is not None and labels.shape[-1] != num_classes:
            raise ValueError(
                f"{name} has {labels.shape[-1]} logits per sample but the network predicts "
                f"num_classes={num_classes} classes"
            )
        return
    if labels.dtype not in _INTEGER:
        raise ValueError(
            f"{name} must be integer class indices (torch.long) [n], got {labels.dtype}; "
            "float label logits need soft_labels=True"
        )
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bound = "num_classes" if num_classes is None else f"num_classes={num_classes}"
        raise ValueError(
            f"{name} must be class indices in [0, {bound}), found values in [{lo}, {hi}]"
        )
