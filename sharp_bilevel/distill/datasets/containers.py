"""In-memory image data sets: `ImageDataset`, the `DatasetSplit` of train and test, and the
per-channel normalisation with the train set's statistics that every reader applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = ["DatasetSplit", "ImageDataset", "channel_stats", "normalize_split"]


@dataclass(eq=False)
class ImageDataset:
    """Labelled images in memory.

    Attributes:
        images: float32 ``[n, C, H, W]``.
        labels: int64 ``[n]``, each in ``[0, num_classes)``.
        num_classes: number of classes (a class may have no image).
        name: a label for messages and logs, e.g. ``"digits/train"``.

    Raises:
        ValueError: on a wrong dtype, rank or size, or a label out of range.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str = "dataset"

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dim() != 4:
            shape = tuple(self.images.shape) if isinstance(self.images, Tensor) else None
            raise ValueError(f"{self.name}: images must be a [n, C, H, W] tensor, got {shape}")
        if self.images.dtype != torch.float32:
            raise ValueError(f"{self.name}: images must be float32, got {self.images.dtype}")
        if (
            not isinstance(self.labels, Tensor)
            or self.labels.dim() != 1
            or self.labels.dtype != torch.int64
        ):
            what = (
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
                if isinstance(self.labels, Tensor)
                else type(self.labels).__name__
            )
            raise ValueError(f"{self.name}: labels must be an int64 [n] tensor, got {what}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        if (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 1
        ):
            raise ValueError(
                f"{self.name}: num_classes must be a positive int, got {self.num_classes!r}"
            )
        if self.labels.numel():
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"{self.name}: labels must lie in [0, {self.num_classes}), found [{lo}, {hi}]"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """C."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return (int(self.images.shape[2]), int(self.images.shape[3]))

    def class_indices(self) -> list[Tensor]:
        """Per class ``c`` (``0..num_classes-1``), the int64 indices of its images, ascending."""
        return [
            torch.nonzero(self.labels == c, as_tuple=False).flatten()
            for c in range(self.num_classes)
        ]

    def class_counts(self) -> list[int]:
        """Number of images per class."""
        return [int(n) for n in torch.bincount(self.labels, minlength=self.num_classes)]


@dataclass(eq=False)
class DatasetSplit:
    """A train and a test `ImageDataset` with the same image shape and classes.

    Attributes:
        train: the training images (experts and distillation draw from these).
        test: the held-out images (evaluation).
        mean: float32 ``[C]``, the per-channel mean subtracted from both splits, or None when
            the split is not normalised.
        std: float32 ``[C]``, the per-channel scale both splits were divided by, or None.
    """

    train: ImageDataset
    test: ImageDataset
    mean: Tensor | None = field(default=None)
    std: Tensor | None = field(default=None)

    def __post_init__(self) -> None:
        a, b = self.train, self.test
        if (a.channels, a.image_size) != (b.channels, b.image_size):
            raise ValueError(
                f"train images are {[a.channels, *a.image_size]} but test images are "
                f"{[b.channels, *b.image_size]}"
            )
        if a.num_classes != b.num_classes:
            raise ValueError(f"train has {a.num_classes} classes but test has {b.num_classes}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be given together")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and tuple(value.shape) != (a.channels,):
                raise ValueError(f"{key} must have shape [{a.channels}], got {tuple(value.shape)}")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.train.num_classes

    @property
    def channels(self) -> int:
        """C."""
        return self.train.channels

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.train.image_size

    def denormalize(self, images: Tensor) -> Tensor:
        """Undo the normalisation of ``[..., C, H, W]`` images (identity when not normalised)."""
        if self.mean is None or self.std is None:
            return images
        mean = self.mean.to(images.device, images.dtype).view(-1, 1, 1)
        std = self.std.to(images.device, images.dtype).view(-1, 1, 1)
        return images * std + mean


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std of ``[n, C, H, W]`` images, float32 ``[C]`` each.

    Sums are accumulated in float64, in chunks (no float64 copy of the whole set). A constant
    channel gets std 1 (so normalising only centres it).
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"need a non-empty [n, C, H, W] tensor, got {tuple(images.shape)}")
    x = images.detach()
    count = x.shape[0] * x.shape[2] * x.shape[3]
    chunks = torch.split(x, 4096)
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in chunks:
        total += chunk.sum(dim=(0, 2, 3), dtype=torch.float64)
    mean = total / count
    centre = mean.to(x.dtype).view(1, -1, 1, 1)
    squares = torch.zeros_like(total)
    for chunk in chunks:
        d = chunk - centre
        squares += (d * d).sum(dim=(0, 2, 3), dtype=torch.float64)
    # Correct for the rounding of the centre (exact algebra: sum (x - m)^2 = S - n (c - m)^2).
    shift = centre.view(-1).to(torch.float64) - mean
    std = (squares / count - shift * shift).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.to(torch.float32).cpu(), std.to(torch.float32).cpu()


def normalize_split(split: DatasetSplit) -> DatasetSplit:
    """Normalise both splits per channel with the train set's mean and std.

    Returns a new split with ``mean``/``std`` set; the input is not modified.

    Raises:
        ValueError: the split is already normalised.
    """
    if split.mean is not None:
        raise ValueError("this split is already normalised (split.mean is set)")
    mean, std = channel_stats(split.train.images)

    def apply(ds: ImageDataset) -> ImageDataset:
        images = ds.images.sub(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        return replace(ds, images=images.contiguous())

    return DatasetSplit(apply(split.train), apply(split.test), mean, std)


def _finish(split: DatasetSplit, normalize: bool) -> DatasetSplit:
    return normalize_split(split) if normalize else split


def _limit(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value
