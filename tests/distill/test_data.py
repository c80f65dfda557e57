"""Data loaders: IDX and CIFAR readers on files in the real formats, digits, sampling."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sharp_bilevel.distill.data import (
    DATASETS,
    DatasetSplit,
    ImageDataset,
    channel_stats,
    from_tensors,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    normalize_split,
    read_idx,
    sample_per_class,
)

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")

# ------------------------------------------------------------------------------ IDX writers
# Written from the format's definition (big-endian: 0, 0, type code, ndim, uint32 dims, data).
_CODES = {np.uint8: (0x08, ">u1"), np.int16: (0x0B, ">i2"), np.float32: (0x0D, ">f4")}


def _idx_bytes(array: np.ndarray) -> bytes:
    code, big_endian = _CODES[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(big_endian).tobytes()


def _write(path: Path, payload: bytes, gz: bool) -> Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_uint8_3d_and_1d(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 0, 9, 255, 1], dtype=np.uint8)
    p_img = _write(tmp_path / "img", _idx_bytes(images), gz)
    p_lab = _write(tmp_path / "lab", _idx_bytes(labels), gz)
    got = read_idx(p_img)
    assert got.dtype == torch.uint8
    assert tuple(got.shape) == (5, 4, 3)
    np.testing.assert_array_equal(got.numpy(), images)
    got_lab = read_idx(p_lab)
    assert tuple(got_lab.shape) == (5,)
    np.testing.assert_array_equal(got_lab.numpy(), labels)


def test_read_idx_big_endian_wider_types(tmp_path: Path) -> None:
    shorts = np.array([[258, -2], [7, 32000]], dtype=np.int16)
    floats = np.array([1.5, -0.25, 3e5], dtype=np.float32)
    raw = _idx_bytes(shorts)
    assert raw[8 + 4 : 8 + 6] == b"\x01\x02"  # 258 stored big-endian after the 12-byte header
    got = read_idx(_write(tmp_path / "s", raw, False))
    assert got.dtype == torch.int16
    np.testing.assert_array_equal(got.numpy(), shorts)
    got_f = read_idx(_write(tmp_path / "f", _idx_bytes(floats), True))
    assert got_f.dtype == torch.float32
    np.testing.assert_array_equal(got_f.numpy(), floats)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00", "type code"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\x00\x00", "holds 2 data bytes"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x00", "holds 2 data bytes"),
        (b"\x00\x00", "not an IDX file"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
    ],
)
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_malformed(tmp_path: Path, payload: bytes, match: str, gz: bool) -> None:
    path = _write(tmp_path / "bad", payload, gz)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_corrupt_gzip_and_missing(tmp_path: Path) -> None:
    full = gzip.compress(_idx_bytes(np.zeros((10, 10), dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


def _fake_fashion(root: Path, n_train: int, n_test: int, gz: bool = True) -> None:
    rng = np.random.default_rng(1)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 3, 5] = 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write(root / f"{prefix}-images-idx3-ubyte{suffix}", _idx_bytes(images), gz)
        _write(root / f"{prefix}-labels-idx1-ubyte{suffix}", _idx_bytes(labels), gz)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_fake_root(tmp_path: Path, gz: bool) -> None:
    _fake_fashion(tmp_path, 30, 20, gz)
    split = load_fashion_mnist(tmp_path, normalize=False)
    assert (len(split.train), len(split.test)) == (30, 20)
    assert split.channels == 1
    assert split.image_size == (28, 28)
    assert split.num_classes == 10
    assert split.train.images.dtype == torch.float32
    assert split.train.labels.dtype == torch.int64
    assert split.train.images[0, 0, 3, 5].item() == 1.0
    assert float(split.train.images.min()) >= 0.0
    assert float(split.train.images.max()) <= 1.0
    assert split.train.labels.tolist() == [i % 10 for i in range(30)]
    assert split.mean is None

    limited = load_fashion_mnist(tmp_path, limit_train=12, limit_test=5)
    assert (len(limited.train), len(limited.test)) == (12, 5)
    assert limited.mean is not None
    assert limited.std is not None
    mean, std = channel_stats(limited.train.images)
    assert abs(float(mean[0])) < 1e-5
    assert abs(float(std[0]) - 1.0) < 1e-5
    torch.testing.assert_close(
        limited.denormalize(limited.train.images), split.train.images[:12], atol=1e-6, rtol=0
    )


def test_fashion_mnist_missing_file_hint(tmp_path: Path) -> None:
    _fake_fashion(tmp_path, 10, 10)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_fashion_mnist_label_count_mismatch(tmp_path: Path) -> None:
    _fake_fashion(tmp_path, 10, 10)
    _write(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(9, np.uint8)), True)
    with pytest.raises(ValueError, match="expected 10 labels"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist() -> None:
    split = load_fashion_mnist(REAL_FASHION, normalize=False)
    assert (len(split.train), len(split.test)) == (60000, 10000)
    assert split.image_size == (28, 28)
    assert split.channels == 1
    assert split.train.class_counts() == [6000] * 10
    assert split.test.class_counts() == [1000] * 10
    assert 0.27 < float(split.train.images[:2000].mean()) < 0.30  # about 0.286 overall


# ------------------------------------------------------------------------------ CIFAR
def _cifar_pickle(path: Path, data: np.ndarray, labels: list[int], key: bytes) -> None:
    batch = {b"batch_label": b"test", key: labels, b"data": data}
    if key == b"fine_labels":
        batch[b"coarse_labels"] = [lab // 5 for lab in labels]
    with path.open("wb") as fh:
        pickle.dump(batch, fh, protocol=2)


def _planes(n: int, seed: int) -> np.ndarray:
    """uint8 [n, 3, 32, 32] images with a distinct value in each plane."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def test_cifar10_layout_and_pixels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = {}
    for i in range(1, 6):
        images[i] = _planes(2, i)
        rows = images[i].reshape(2, 3072)
        _cifar_pickle(folder / f"data_batch_{i}", rows, [i, 9 - i], b"labels")
    # Raw row: 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    row = np.zeros((1, 3072), dtype=np.uint8)
    row[0, 1024 * 2 + 32 * 5 + 7] = 255  # blue, h=5, w=7
    row[0, 32 * 1 + 30] = 51  # red, h=1, w=30
    _cifar_pickle(folder / "test_batch", row, [4], b"labels")

    for root in (tmp_path, folder):  # the extracted folder or its parent
        split = load_cifar10(root, normalize=False)
        assert (len(split.train), len(split.test)) == (10, 1)
        assert split.channels == 3
        assert split.image_size == (32, 32)
        assert split.num_classes == 10
        assert split.train.labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
        test = split.test.images[0]
        assert test[2, 5, 7].item() == 1.0
        assert test[0, 1, 30].item() == pytest.approx(0.2)
        assert int((test != 0).sum()) == 2
        np.testing.assert_array_equal(
            (split.train.images[2:4] * 255).round().to(torch.uint8).numpy(), images[2]
        )
    normed = load_cifar10(tmp_path, limit_train=6)
    assert len(normed.train) == 6
    assert normed.mean is not None
    assert normed.mean.shape == (3,)


def test_cifar10_reads_old_numpy_core_pickles(tmp_path: Path) -> None:
    # The real files were pickled by numpy 1.x: globals from numpy.core.multiarray.
    rows = _planes(1, 0).reshape(1, 3072)
    raw = pickle.dumps({b"data": rows, b"labels": [3]}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (tmp_path / name).write_bytes(raw)
    split = load_cifar10(tmp_path, normalize=False)
    assert len(split.train) == 5
    np.testing.assert_array_equal(
        (split.test.images[0] * 255).round().to(torch.uint8).numpy(), rows.reshape(3, 32, 32)
    )


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _cifar_pickle(folder / "train", _planes(4, 0).reshape(4, 3072), [99, 0, 42, 7], b"fine_labels")
    _cifar_pickle(folder / "test", _planes(2, 1).reshape(2, 3072), [5, 64], b"fine_labels")
    split = load_cifar100(tmp_path, normalize=False)
    assert split.num_classes == 100
    assert split.train.labels.tolist() == [99, 0, 42, 7]
    assert split.test.labels.tolist() == [5, 64]
    via_name = load_dataset("CIFAR100", root=tmp_path, normalize=False)
    assert torch.equal(via_name.train.images, split.train.images)


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path)
    _cifar_pickle(tmp_path / "train", np.zeros((2, 3000), np.uint8), [0, 1], b"fine_labels")
    _cifar_pickle(tmp_path / "test", np.zeros((1, 3072), np.uint8), [0], b"fine_labels")
    with pytest.raises(ValueError, match=r"\[N, 3072\]") as info:
        load_cifar100(tmp_path)
    assert str(tmp_path / "train") in str(info.value)
    _cifar_pickle(tmp_path / "train", np.zeros((2, 3072), np.uint8), [0], b"fine_labels")
    with pytest.raises(ValueError, match="must hold 2 labels"):
        load_cifar100(tmp_path)
    _cifar_pickle(tmp_path / "train", np.zeros((2, 3072), np.uint8), [0, 1], b"labels")
    with pytest.raises(ValueError, match="fine_labels"):
        load_cifar100(tmp_path)


class _Sneaky:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (os.getcwd, ())


def test_cifar_refuses_arbitrary_pickle_globals(tmp_path: Path) -> None:
    with (tmp_path / "train").open("wb") as fh:
        pickle.dump({b"data": _Sneaky(), b"fine_labels": [0]}, fh)
    _cifar_pickle(tmp_path / "test", np.zeros((1, 3072), np.uint8), [0], b"fine_labels")
    with pytest.raises(ValueError, match="refusing to load global"):
        load_cifar100(tmp_path)


# ------------------------------------------------------------------------------ digits
def test_digits_sizes_and_split() -> None:
    split = load_digits(seed=0)
    n_train, n_test = len(split.train), len(split.test)
    assert n_train + n_test == 1797
    assert abs(n_test - 0.3 * 1797) < 10
    assert split.channels == 1
    assert split.image_size == (8, 8)
    assert split.num_classes == 10
    assert split.train.images.dtype == torch.float32
    for counts_train, counts_test in zip(
        split.train.class_counts(), split.test.class_counts(), strict=True
    ):
        assert counts_test == round(0.3 * (counts_train + counts_test))  # stratified
    mean, std = channel_stats(split.train.images)
    assert abs(float(mean[0])) < 1e-5
    assert abs(float(std[0]) - 1.0) < 1e-5
    raw = load_digits(seed=0, normalize=False)
    assert float(raw.train.images.min()) == 0.0
    assert float(raw.train.images.max()) == 1.0
    assert split.mean is not None
    assert split.std is not None
    torch.testing.assert_close(
        (raw.train.images - split.mean) / split.std, split.train.images, rtol=0, atol=1e-6
    )


def test_digits_deterministic_by_seed() -> None:
    a, b, c = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.test.images[:50], c.test.images[:50])
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


# ------------------------------------------------------------------------------ containers
def _toy(counts: list[int], num_classes: int | None = None) -> ImageDataset:
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    images = torch.arange(labels.numel() * 4, dtype=torch.float32).reshape(-1, 1, 2, 2)
    return ImageDataset(images, labels, num_classes or len(counts), "toy")


def test_sample_per_class_balance_and_determinism() -> None:
    data = _toy([5, 3, 7])
    images, labels = sample_per_class(data, 3, torch.Generator().manual_seed(0))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert tuple(images.shape) == (9, 1, 2, 2)
    rows = {
        tuple(r.flatten().tolist()): int(lab)
        for r, lab in zip(data.images, data.labels, strict=True)
    }
    picked = [tuple(r.flatten().tolist()) for r in images]
    assert len(set(picked)) == 9  # distinct images
    assert [rows[p] for p in picked] == labels.tolist()  # each from its class
    again, _ = sample_per_class(data, 3, torch.Generator().manual_seed(0))
    assert torch.equal(images, again)
    other, _ = sample_per_class(data, 3, torch.Generator().manual_seed(1))
    assert not torch.equal(images, other)
    images[0] += 100.0  # a copy
    assert not any(torch.equal(images[0], r) for r in data.images)


def test_sample_per_class_errors() -> None:
    data = _toy([5, 2, 7])
    with pytest.raises(ValueError, match="class 1 has 2 images, fewer than ipc=3"):
        sample_per_class(data, 3, torch.Generator())
    with pytest.raises(ValueError, match="class 3 has 0 images"):
        sample_per_class(_toy([2, 2, 2], num_classes=4), 1, torch.Generator())
    with pytest.raises(ValueError, match="per_class"):
        sample_per_class(data, 0, torch.Generator())


def test_image_dataset_validation() -> None:
    data = _toy([2, 2])
    assert data.class_indices()[1].tolist() == [2, 3]
    with pytest.raises(ValueError, match="float32"):
        ImageDataset(data.images.double(), data.labels, 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ImageDataset(data.images, data.labels + 1, 2)
    with pytest.raises(ValueError, match="3 labels"):
        ImageDataset(data.images, data.labels[:3], 2)
    with pytest.raises(ValueError, match=r"\[n, C, H, W\]"):
        ImageDataset(data.images[0], data.labels, 2)
    other = ImageDataset(torch.zeros(1, 1, 3, 3), torch.zeros(1, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="test images"):
        DatasetSplit(data, other)


def test_from_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    tr_x = torch.randint(0, 256, (6, 4, 4), dtype=torch.uint8, generator=g)
    te_x = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64)
    split = from_tensors(tr_x, torch.tensor([0, 1, 2, 0, 1, 2]), te_x, torch.tensor([3, 0, 1]))
    assert split.num_classes == 4
    assert split.channels == 1
    assert split.mean is None
    assert split.train.images.dtype == torch.float32
    torch.testing.assert_close(split.train.images[:, 0], tr_x.float() / 255.0)
    normed = from_tensors(
        tr_x,
        torch.zeros(6, dtype=torch.long),
        te_x,
        torch.zeros(3).long(),
        num_classes=2,
        normalize=True,
    )
    assert normed.num_classes == 2
    assert normed.mean is not None
    with pytest.raises(ValueError, match="already normalised"):
        normalize_split(normed)
    with pytest.raises(ValueError, match="5 labels for 6 images"):
        from_tensors(tr_x, torch.zeros(5).long(), te_x, torch.zeros(3).long())
    with pytest.raises(ValueError, match="integer"):
        from_tensors(tr_x, torch.zeros(6), te_x, torch.zeros(3).long())
    with pytest.raises(ValueError, match="test images"):
        from_tensors(tr_x, torch.zeros(6).long(), te_x[:, :, :3], torch.zeros(3).long())


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known data sets: " + ", ".join(DATASETS)):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10")
    _fake_fashion(tmp_path, 10, 10)
    split = load_dataset("Fashion_MNIST", root=tmp_path, limit_train=4)
    assert len(split.train) == 4
    assert len(load_dataset("digits", seed=1).test) > 0
