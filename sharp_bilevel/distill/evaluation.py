"""Evaluation of a synthetic set: train fresh networks on it, test them on real data.

The protocol of MTT's ``evaluate_synset`` (FTD and DATM reuse it):

* a fresh network per run (here `get_network` with a seed);
* SGD (momentum 0.9, weight decay 5e-4) at ``lr`` = the learned ``syn_lr``, on minibatches of
  256 shuffled synthetic images, each batch augmented with DSA;
* one drop of the lr to ``0.1 lr`` half-way, with a fresh SGD (momentum buffers reset), as MTT
  re-creates its optimizer (exact point in `train_on_synthetic`);
* hard-label cross-entropy or, for DATM's learnable soft labels (logits ``Y``, ``[n, classes]``),
  the soft cross-entropy ``L = -(1/B) sum_b sum_k softmax(Y_b)_k log softmax(f(x_b))_k``;
* one test at the end; mean and population std over the runs (MTT's ``np.std``).

Unlike MTT, every random draw (shuffling, DSA) comes from a caller-owned ``torch.Generator``: a
run is reproducible and the global RNG is never touched. Everything runs on ``device`` (any).

The training loop and the test live in `sharp_bilevel.distill.synthetic_training`, the
argument checks in `sharp_bilevel.distill.evaluation_checks`; this module re-exports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..trajectory.augment import DSAParams
from .data import class_balanced_indices
from .evaluation_checks import (
    _DEFAULT_DSA,
    _check_dsa,
    _check_generator,
    _check_hard_labels,
    _check_images,
    _check_lr,
    _check_soft_labels,
    _derived_seed,
    _positive_int,
)
from .networks import available_networks, get_network
from .synthetic_training import (
    accuracy,
    soft_cross_entropy,
    train_on_synthetic,
)

__all__ = [
    "EvalResult",
    "accuracy",
    "evaluate_synthetic",
    "random_real_baseline",
    "sample_class_balanced",
    "soft_cross_entropy",
    "train_on_synthetic",
]


# --------------------------------------------------------------------------------------------
# results


@dataclass
class EvalResult:
    """Test accuracies of one architecture over several seeds.

    Attributes:
        architecture: the network name as given.
        accuracies: test accuracy (fraction in ``[0, 1]``) per seed, in ``seeds`` order.
        mean: ``(1/S) sum_s a_s``.
        std: the **population** standard deviation ``sqrt((1/S) sum_s (a_s - mean)^2)``
            (``torch.std(correction=0)``, MTT's ``np.std``); 0 for one seed.
        seeds: the seeds, one per run.
    """

    architecture: str
    accuracies: list[float]
    mean: float
    std: float
    seeds: list[int]

    @classmethod
    def from_accuracies(
        cls, architecture: str, seeds: Sequence[int], accuracies: Sequence[float]
    ) -> EvalResult:
        """Build the result, computing ``mean`` and the population ``std`` in float64."""
        if len(seeds) != len(accuracies) or not accuracies:
            raise ValueError(
                f"need one accuracy per seed (at least one), got {len(accuracies)} accuracies "
                f"for {len(seeds)} seeds"
            )
        acc = torch.tensor([float(a) for a in accuracies], dtype=torch.float64)
        return cls(
            architecture=architecture,
            accuracies=[float(a) for a in accuracies],
            mean=float(acc.mean()),
            std=float(acc.std(correction=0)),
            seeds=[int(s) for s in seeds],
        )

    def as_dict(self) -> dict[str, Any]:
        """``{"accuracies", "mean", "std"}``: the numbers a JSON report records."""
        return {"accuracies": list(self.accuracies), "mean": self.mean, "std": self.std}

    def __str__(self) -> str:
        return (
            f"{self.architecture}: {100 * self.mean:.2f} +- {100 * self.std:.2f} % "
            f"({len(self.seeds)} seeds)"
        )


# --------------------------------------------------------------------------------------------
# evaluation


def _check_architectures(architectures: object) -> list[str]:
    if isinstance(architectures, str) or not isinstance(architectures, Sequence):
        raise ValueError(
            f"architectures must be a sequence of network names, got {architectures!r}"
        )
    names = list(architectures)
    if not names:
        raise ValueError("architectures must name at least one network")
    known = {name.lower() for name in available_networks()}
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or name.strip().lower() not in known:
            raise ValueError(
                f"architectures: unknown network {name!r}; known networks: "
                f"{', '.join(available_networks())}"
            )
        key = name.strip().lower()
        if key in seen:
            raise ValueError(f"architectures names {name!r} twice")
        seen.add(key)
    return names


def _check_seeds(seeds: object) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    out: list[int] = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"seeds must be ints, got {s!r}")
        out.append(s)
    if len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct (a repeated seed repeats its run), got {out}")
    return out


def _check_shape_args(
    channels: object, image_size: object, num_classes: object
) -> tuple[int, tuple[int, int], int]:
    channels = _positive_int("channels", channels)
    if (
        isinstance(image_size, str)
        or not isinstance(image_size, Sequence)
        or len(image_size) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in image_size)
    ):
        raise ValueError(f"image_size must be (H, W) with two positive ints, got {image_size!r}")
    size = (int(image_size[0]), int(image_size[1]))
    num_classes = _positive_int("num_classes", num_classes)
    return channels, size, num_classes


def _check_image_shape(name: str, images: Tensor, channels: int, size: tuple[int, int]) -> None:
    if tuple(images.shape[1:]) != (channels, *size):
        raise ValueError(
            f"{name} must be [n, {channels}, {size[0]}, {size[1]}] (channels={channels}, "
            f"image_size={size}), got {list(images.shape)}"
        )


def evaluate_synthetic(
    images: Tensor,
    labels: Tensor,
    lr: float | Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    channels: int,
    image_size: tuple[int, int],
    architectures: Sequence[str] = ("ConvNet",),
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 300,
    width: int | None = None,
    dsa: DSAParams | None = _DEFAULT_DSA,
    soft_labels: bool = False,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, EvalResult]:
    """Train a fresh network per architecture and seed on the synthetic set; test each.

    For every ``arch`` and ``s``: ``get_network(arch, channels, num_classes, image_size,
    seed=s, width=width, device=device)``, then `train_on_synthetic` with a CPU generator
    seeded from ``s`` (a seed derived from ``s``, not ``s`` itself, so its draws differ from the
    initialisation's), then `accuracy` on ``(test_images, test_labels)``. Same inputs and
    seed give the same accuracy on the same device; the global RNG is never used.

    Args:
        images: synthetic images ``[n, channels, *image_size]``.
        labels: ``[n]`` class indices, or with ``soft_labels`` ``[n, num_classes]`` logits.
        lr: training lr (the learned ``syn_lr``; float or one-element tensor), finite and > 0.
        test_images: ``[m, channels, *image_size]`` real test images.
        test_labels: ``[m]`` class indices.
        num_classes: number of classes (the networks' output size).
        channels: image channels (checked against the data).
        image_size: ``(H, W)`` (checked against the data).
        architectures: names from `available_networks`;
            several names give a cross-architecture evaluation.
        seeds: one run per seed (network init, shuffling, DSA).
        epochs: training epochs, as in `train_on_synthetic`.
        dsa: augmentation during training (None: off).
        soft_labels: ``labels`` are logits (DATM).
        batch_size: training minibatch size.
        width: passed to ``get_network`` (None: each network's default width).
        device: where the networks train and test (default CPU).

    Returns:
        ``{arch: EvalResult}`` in ``architectures`` order, keyed by the names as given.

    Raises:
        ValueError: a bad argument, named in the message (``lr``, a shape that does not match,
            an unknown architecture, ...).
    """
    lr_value = _check_lr(lr)
    channels, size, num_classes = _check_shape_args(channels, image_size, num_classes)
    images = _check_images("images", images)
    _check_image_shape("images", images, channels, size)
    n = int(images.shape[0])
    if soft_labels:
        labels = _check_soft_labels("labels", labels, n, num_classes)
    else:
        labels = _check_hard_labels("labels", labels, n, num_classes)
    test_images = _check_images("test_images", test_images)
    _check_image_shape("test_images", test_images, channels, size)
    test_labels = _check_hard_labels(
        "test_labels", test_labels, int(test_images.shape[0]), num_classes
    )
    names = _check_architectures(architectures)
    seed_list = _check_seeds(seeds)
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    if width is not None:
        width = _positive_int("width", width)
    dsa = _check_dsa(dsa)

    results: dict[str, EvalResult] = {}
    for arch in names:
        accs: list[float] = []
        for seed in seed_list:
            net = get_network(
                arch, channels, num_classes, size, seed=seed, width=width, device=device
            )
            generator = torch.Generator().manual_seed(_derived_seed(seed, 0))
            train_on_synthetic(
                net,
                images,
                labels,
                lr=lr_value,
                epochs=epochs,
                batch_size=batch_size,
                dsa=dsa,
                soft_labels=soft_labels,
                generator=generator,
            )
            accs.append(accuracy(net, test_images, test_labels))
        results[arch] = EvalResult.from_accuracies(arch, seed_list, accs)
    return results


def sample_class_balanced(
    images: Tensor,
    labels: Tensor,
    ipc: int,
    *,
    num_classes: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``ipc`` distinct random images of each class, class-major (MTT's ``image_syn`` layout).

    Returns ``(images[idx], labels[idx])`` with ``idx`` of length ``num_classes * ipc``; rows
    ``c * ipc, ..., (c + 1) * ipc - 1`` are class ``c``, drawn without replacement from
    ``generator`` only (class by class, one ``randperm`` each).

    Raises:
        ValueError: a class with fewer than ``ipc`` images (named), or a bad argument.
    """
    ipc = _positive_int("ipc", ipc)
    num_classes = _positive_int("num_classes", num_classes)
    generator = _check_generator(generator)
    if not isinstance(images, Tensor) or images.dim() < 1:
        raise TypeError("images must be a Tensor [n, ...]")
    labels = _check_hard_labels("labels", labels, int(images.shape[0]), num_classes)
    idx = class_balanced_indices(labels, ipc, num_classes, generator)
    return images[idx], labels[idx]


def random_real_baseline(
    train_images: Tensor,
    train_labels: Tensor,
    ipc: int,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    channels: int,
    image_size: tuple[int, int],
    lr: float | Tensor = 0.01,
    architectures: Sequence[str] = ("ConvNet",),
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 300,
    width: int | None = None,
    dsa: DSAParams | None = _DEFAULT_DSA,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    subset_seed: int | None = None,
) -> dict[str, EvalResult]:
    """The "random real images" baseline: `evaluate_synthetic` on ``ipc`` reals per class.

    Each run draws its subset with `sample_class_balanced` from a generator seeded from
    its seed (so the spread covers both the subset and the initialisation), or, with
    ``subset_seed``, every run uses the one subset drawn from ``subset_seed``. Hard labels;
    ``lr`` defaults to 0.01 (the experts' lr). Other arguments as in `evaluate_synthetic`.

    Raises:
        ValueError: a class of ``train_labels`` with fewer than ``ipc`` images (named), or any
            error `evaluate_synthetic` raises.
    """
    channels, size, num_classes = _check_shape_args(channels, image_size, num_classes)
    train_images = _check_images("train_images", train_images)
    _check_image_shape("train_images", train_images, channels, size)
    train_labels = _check_hard_labels(
        "train_labels", train_labels, int(train_images.shape[0]), num_classes
    )
    seed_list = _check_seeds(seeds)
    if subset_seed is not None and (
        isinstance(subset_seed, bool) or not isinstance(subset_seed, int)
    ):
        raise ValueError(f"subset_seed must be an int or None, got {subset_seed!r}")

    def subset(seed: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(_derived_seed(seed, 1))
        return sample_class_balanced(
            train_images, train_labels, ipc, num_classes=num_classes, generator=gen
        )

    def run(x: Tensor, y: Tensor, run_seeds: Sequence[int]) -> dict[str, EvalResult]:
        return evaluate_synthetic(
            x,
            y,
            lr,
            test_images,
            test_labels,
            num_classes=num_classes,
            channels=channels,
            image_size=size,
            architectures=architectures,
            seeds=run_seeds,
            epochs=epochs,
            width=width,
            dsa=dsa,
            batch_size=batch_size,
            device=device,
        )

    if subset_seed is not None:
        return run(*subset(subset_seed), seed_list)
    per_seed = [run(*subset(seed), (seed,)) for seed in seed_list]
    return {
        arch: EvalResult.from_accuracies(arch, seed_list, [r[arch].accuracies[0] for r in per_seed])
        for arch in per_seed[0]
    }
