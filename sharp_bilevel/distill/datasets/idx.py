"""IDX files (MNIST, Fashion-MNIST): `read_idx` parses the format, `load_fashion_mnist` reads
the four files of Fashion-MNIST (gzipped or not).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .containers import DatasetSplit, ImageDataset, _finish, _limit

__all__ = ["DEFAULT_FASHION_MNIST_ROOT", "load_fashion_mnist", "read_idx"]


#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

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
