"""CIFAR-10/100's "python version" pickle batches, read with an unpickler that admits numpy
arrays and nothing else (files are data, never code).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .containers import DatasetSplit, ImageDataset, _finish, _limit

__all__ = ["load_cifar10", "load_cifar100"]


# The only globals a CIFAR batch (numpy arrays in a dict) needs; anything else is refused.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (a CIFAR batch needs nothing else)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR batch holds only dicts, "
                "lists, bytes and numpy arrays"
            )
        return super().find_class(module, name)


def _load_pickle(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR batch file not found: {path}")
    try:
        with path.open("rb") as fh:
            return _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR python batch ({exc})") from exc


def _entry(batch: Mapping[Any, Any], key: str) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    return None


def _cifar_batch(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    """``(uint8 [N, 3, 32, 32], int64 [N])`` from one batch file."""
    batch = _load_pickle(path)
    if not isinstance(batch, Mapping):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = _entry(batch, "data")
    labels = _entry(batch, label_key)
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
        raise ValueError(f"{path}: needs the keys b'data' and b'{label_key}', found {keys}")
    array = np.asarray(data)
    if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != 3072:
        raise ValueError(
            f"{path}: b'data' must be uint8 [N, 3072] (1024 R, 1024 G, 1024 B per row), "
            f"got {array.dtype} {array.shape}"
        )
    label_array = np.asarray(labels)
    if label_array.ndim != 1 or label_array.shape[0] != array.shape[0]:
        raise ValueError(
            f"{path}: b'{label_key}' must hold {array.shape[0]} labels, got shape "
            f"{label_array.shape}"
        )
    if not np.issubdtype(label_array.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got {label_array.dtype}")
    images = torch.from_numpy(np.ascontiguousarray(array).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(label_array.astype(np.int64))


def _cifar(
    root: Path,
    subdir: str,
    train_files: list[str],
    test_file: str,
    label_key: str,
    num_classes: int,
    name: str,
    limit_train: int | None,
    limit_test: int | None,
    normalize: bool,
) -> DatasetSplit:
    folder = root / subdir if (root / subdir).is_dir() else root
    for f in [*train_files, test_file]:
        if not (folder / f).is_file():
            raise FileNotFoundError(
                f"{name} file not found: {folder / f} (expected the extracted python version, "
                f"i.e. the folder {subdir}/ or its contents, in {root})"
            )
    parts = [_cifar_batch(folder / f, label_key) for f in train_files]
    train_x = torch.cat([p[0] for p in parts])
    train_y = torch.cat([p[1] for p in parts])
    test_x, test_y = _cifar_batch(folder / test_file, label_key)
    limit_train, limit_test = _limit("limit_train", limit_train), _limit("limit_test", limit_test)
    if limit_train is not None:
        train_x, train_y = train_x[:limit_train], train_y[:limit_train]
    if limit_test is not None:
        test_x, test_y = test_x[:limit_test], test_y[:limit_test]
    split = DatasetSplit(
        ImageDataset(train_x.to(torch.float32) / 255.0, train_y, num_classes, f"{name}/train"),
        ImageDataset(test_x.to(torch.float32) / 255.0, test_y, num_classes, f"{name}/test"),
    )
    return _finish(split, normalize)


def load_cifar10(
    root: str | Path,
    limit_train: int | None = None,
    limit_test: int | None = None,
    *,
    normalize: bool = True,
) -> DatasetSplit:
    """CIFAR-10, python version: 50000/10000 images ``[3, 32, 32]``, 10 classes.

    ``root`` holds ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (or the folder
    ``cifar-10-batches-py`` with them). Each file is a pickled dict with ``b"data"`` (uint8
    ``[N, 3072]``: per row 1024 red, then 1024 green, then 1024 blue values, each plane
    row-major 32x32) and ``b"labels"``. The unpickler accepts numpy arrays and plain containers
    only. Pixels are scaled by ``1/255``; ``limit_*`` keep the first images.

    Raises:
        FileNotFoundError: a batch file is missing (the message names it).
        ValueError: a malformed batch (the message names the file).
    """
    return _cifar(
        Path(root),
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "labels",
        10,
        "cifar10",
        limit_train,
        limit_test,
        normalize,
    )


def load_cifar100(
    root: str | Path,
    limit_train: int | None = None,
    limit_test: int | None = None,
    *,
    normalize: bool = True,
) -> DatasetSplit:
    """CIFAR-100, python version: 50000/10000 images ``[3, 32, 32]``, 100 (fine) classes.

    ``root`` holds ``train`` and ``test`` (or the folder ``cifar-100-python`` with them), each
    a pickled dict with ``b"data"`` (as in `load_cifar10`) and ``b"fine_labels"``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a malformed file.
    """
    return _cifar(
        Path(root),
        "cifar-100-python",
        ["train"],
        "test",
        "fine_labels",
        100,
        "cifar100",
        limit_train,
        limit_test,
        normalize,
    )
