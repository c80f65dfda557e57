"""scikit-learn's bundled 8x8x1 digits (1797 images), split by seed."""

from __future__ import annotations

import numpy as np
import torch

from .containers import DatasetSplit, ImageDataset, _finish

__all__ = ["load_digits"]


def load_digits(
    seed: int = 0, test_fraction: float = 0.3, *, normalize: bool = True
) -> DatasetSplit:
    """scikit-learn's 8x8 digits: 1797 images ``[1, 8, 8]``, 10 classes, pixels ``/16``.

    The split is stratified: in each class a seeded permutation sends
    ``round(test_fraction * n_c)`` images to the test set; both splits keep the original order.
    The same ``seed`` gives the same split on every machine.

    Args:
        seed: seed of the split.
        test_fraction: share of each class held out, in ``(0, 1)``.
        normalize: normalise with the train set's per-channel mean and std.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not 0.0 < float(test_fraction) < 1.0
    ):
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.as_tensor(np.asarray(bunch.images), dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(np.asarray(bunch.target), dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(labels.shape[0], dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(labels == c, as_tuple=False).flatten()
        n_test = round(float(test_fraction) * idx.numel())
        n_test = min(max(n_test, 1), idx.numel() - 1)
        is_test[idx[torch.randperm(idx.numel(), generator=generator)[:n_test]]] = True
    split = DatasetSplit(
        ImageDataset(images[~is_test].contiguous(), labels[~is_test], 10, "digits/train"),
        ImageDataset(images[is_test].contiguous(), labels[is_test], 10, "digits/test"),
    )
    return _finish(split, normalize)
