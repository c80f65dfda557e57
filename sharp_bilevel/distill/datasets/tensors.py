"""The user's own tensors as a `DatasetSplit` (checked, optionally normalised)."""

from __future__ import annotations

import torch
from torch import Tensor

from .containers import DatasetSplit, ImageDataset, _finish

__all__ = ["from_tensors"]


def _user_images(x: object, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{what} must be a Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or min(x.shape[1:]) < 1:
        raise ValueError(f"{what} must be [n, C, H, W] (or [n, H, W]), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.detach().to(device="cpu", dtype=torch.float32) / 255.0
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point or uint8, got {x.dtype}")
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _user_labels(y: object, n: int, what: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise ValueError(f"{what} must be a Tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer [n] tensor, got {y.dtype} {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"{what} has {y.shape[0]} labels for {n} images")
    return y.detach().to(device="cpu", dtype=torch.int64)


def from_tensors(
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    name: str = "tensors",
    *,
    num_classes: int | None = None,
    normalize: bool = False,
) -> DatasetSplit:
    """A `DatasetSplit` from your own tensors.

    Args:
        train_images: ``[n, C, H, W]`` (or ``[n, H, W]`` for one channel), floating point (cast
            to float32 as is) or uint8 (scaled by ``1/255``).
        train_labels: integer ``[n]``, in ``[0, num_classes)``.
        test_images: ``[m, C, H, W]``, same ``C, H, W``.
        test_labels: integer ``[m]``.
        name: prefix of the data sets' names.
        num_classes: default ``1 + max label`` over both splits.
        normalize: normalise with the train set's per-channel mean and std (off by default:
            your tensors are taken as already preprocessed).

    Raises:
        ValueError: a shape, dtype or label problem, named in the message.
    """
    tr_x = _user_images(train_images, "train_images")
    te_x = _user_images(test_images, "test_images")
    tr_y = _user_labels(train_labels, tr_x.shape[0], "train_labels")
    te_y = _user_labels(test_labels, te_x.shape[0], "test_labels")
    if tr_x.shape[0] == 0:
        raise ValueError("train_images is empty")
    if tr_x.shape[1:] != te_x.shape[1:]:
        raise ValueError(
            f"train images are {list(tr_x.shape[1:])} but test images are {list(te_x.shape[1:])}"
        )
    if num_classes is None:
        num_classes = 1 + int(torch.cat([tr_y, te_y]).max())
    split = DatasetSplit(
        ImageDataset(tr_x, tr_y, num_classes, f"{name}/train"),
        ImageDataset(te_x, te_y, num_classes, f"{name}/test"),
    )
    return _finish(split, normalize)
