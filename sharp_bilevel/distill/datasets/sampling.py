"""Class-balanced sampling of real images (MTT's ``pix_init="real"``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .containers import ImageDataset

__all__ = ["class_balanced_indices", "sample_per_class"]


def class_balanced_indices(
    labels: Tensor,
    per_class: int,
    num_classes: int,
    generator: torch.Generator,
    *,
    what: str = "",
) -> Tensor:
    """Indices of ``per_class`` distinct random rows of every class, class-major.

    Rows ``c * per_class, ..., (c + 1) * per_class - 1`` of the result are class ``c``; each
    class takes the first ``per_class`` entries of one ``randperm`` of its members drawn from
    ``generator`` (nothing else is consumed). This is MTT's layout of a synthetic set and the
    "random real" baseline.

    Raises:
        ValueError: a class has fewer than ``per_class`` rows (the message, prefixed by
            ``what``, names the class and both counts).
    """
    picks: list[Tensor] = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if members.numel() < per_class:
            raise ValueError(
                f"{what}class {c} has {members.numel()} images, fewer than ipc={per_class} "
                "(images per class requested)"
            )
        order = torch.randperm(int(members.numel()), generator=generator, device=generator.device)
        picks.append(members[order[:per_class].to(members.device)])
    return torch.cat(picks)


def sample_per_class(
    dataset: ImageDataset, per_class: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``per_class`` distinct random images of every class, class-major.

    Returns:
        ``images`` ``[num_classes * per_class, C, H, W]`` (a copy) and ``labels``
        ``[num_classes * per_class]`` = ``[0]*per_class + [1]*per_class + ...`` (MTT's layout
        of the synthetic set). Only ``generator`` is consumed.

    Raises:
        ValueError: ``per_class`` is not a positive int, or a class has fewer images (the
            message names the class and both counts).
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    order = class_balanced_indices(
        dataset.labels, per_class, dataset.num_classes, generator, what=f"{dataset.name}: "
    )
    return dataset.images[order].clone(), dataset.labels[order].clone()
