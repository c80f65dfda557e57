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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..trajectory.augment import DSAParams, apply_dsa, sample_dsa
from .data import class_balanced_indices
from .networks import available_networks, get_network

__all__ = [
    "EvalResult",
    "accuracy",
    "evaluate_synthetic",
    "random_real_baseline",
    "sample_class_balanced",
    "soft_cross_entropy",
    "train_on_synthetic",
]

_DEFAULT_DSA = DSAParams()
_MASK64 = (1 << 64) - 1

# --------------------------------------------------------------------------------------------
# argument checks


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_lr(lr: object) -> float:
    """``lr`` as a float; a learned ``syn_lr`` (one-element tensor) is accepted."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a number or a one-element tensor, got shape {lr.shape}")
        value = float(lr.detach().reshape(()).item())
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise ValueError(f"lr must be a real number, got {type(lr).__name__}")
    else:
        value = float(lr)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(
            f"lr must be finite and > 0, got {value!r} (a learned syn_lr that went negative or "
            "non-finite cannot train a network)"
        )
    return value


def _non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def _check_images(name: str, images: object) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"{name} must be [n, C, H, W] with n >= 1, got {list(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} contains non-finite values")
    return images


def _check_hard_labels(name: str, labels: object, n: int, num_classes: int | None) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        hint = " (for [n, classes] logits pass soft_labels=True)" if labels.dim() == 2 else ""
        raise ValueError(
            f"{name} must be [{n}] class indices (one per image), got {list(labels.shape)}{hint}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"{name} must hold integer class indices, got {labels.dtype} (soft labels are "
            "[n, classes] logits with soft_labels=True)"
        )
    if num_classes is not None and n > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes}) (num_classes={num_classes}), "
                f"got values in [{lo}, {hi}]"
            )
    return labels


def _check_soft_labels(name: str, labels: object, n: int, num_classes: int | None) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(labels).__name__}")
    k = labels.shape[1] if labels.dim() == 2 else -1
    if labels.dim() != 2 or labels.shape[0] != n or (num_classes is not None and k != num_classes):
        want = f"[{n}, {num_classes if num_classes is not None else 'classes'}]"
        raise ValueError(
            f"{name} (soft labels) must be logits of shape {want}, got {list(labels.shape)}"
        )
    if not labels.is_floating_point():
        raise ValueError(f"{name} (soft labels) must be floating point logits, got {labels.dtype}")
    if not bool(torch.isfinite(labels).all()):
        raise ValueError(f"{name} (soft labels) contains non-finite values")
    return labels


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def _check_dsa(dsa: object) -> DSAParams | None:
    if dsa is not None and not isinstance(dsa, DSAParams):
        raise TypeError(f"dsa must be a DSAParams or None, got {type(dsa).__name__}")
    return dsa


def _network_device_dtype(network: nn.Module, fallback: Tensor) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of ``network``'s first parameter (else ``fallback``'s)."""
    for p in network.parameters():
        dtype = p.dtype if p.is_floating_point() else fallback.dtype
        return p.device, dtype
    return fallback.device, fallback.dtype


def _splitmix64(x: int) -> int:
    """One step of SplitMix64: a well-mixed 64-bit function of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _derived_seed(seed: int, stream: int) -> int:
    """A seed for random stream ``stream`` of run ``seed``, unrelated to ``seed`` itself.

    ``get_network`` seeds the initialisation with ``seed``; the shuffling/DSA generator (stream
    0) and the real-subset generator (stream 1) must not replay those draws.
    """
    return _splitmix64((_splitmix64(seed & _MASK64) + stream) & _MASK64)


# --------------------------------------------------------------------------------------------
# training and testing


def _last_full_lr_epoch(epochs: int) -> int:
    """0-based index of the last pass at the full lr: ``(epochs - 1) // 2 + 1``."""
    return (epochs - 1) // 2 + 1


def soft_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """``-(1/B) sum_b sum_k softmax(t_b)_k log softmax(z_b)_k`` for ``z, t`` both ``[B, K]``."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def train_on_synthetic(
    network: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    lr: float | Tensor,
    epochs: int,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    dsa: DSAParams | None = _DEFAULT_DSA,
    soft_labels: bool = False,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Train ``network`` in place on ``(images, labels)`` as MTT's ``evaluate_synset`` does.

    Pass ``e = 0, ..., epochs - 1``: a permutation of the ``n`` images from ``generator``, cut
    into consecutive minibatches of ``batch_size`` (the last may be smaller); per minibatch
    one DSA draw from ``generator`` (unless ``dsa`` is None), the loss, one SGD step.
    Passes ``e <= (epochs - 1) // 2 + 1`` run at ``lr``, later ones at ``0.1 lr`` with a fresh
    SGD (momentum buffers reset). MTT loops over ``range(E + 1)`` for ``epoch_eval_train = E``
    and decays after its pass ``E // 2 + 1``, so ``epochs = E + 1`` is MTT's schedule exactly.

    Args:
        network: maps ``[B, C, H, W] -> [B, classes]``; moved to ``device`` if given; the
            images are cast to its parameters' dtype.
        images: ``[n, C, H, W]`` (detached; not modified).
        labels: ``[n]`` class indices (cross-entropy), or with ``soft_labels`` DATM's
            ``[n, classes]`` logits (soft cross-entropy against ``softmax(labels)``).
        lr: the initial learning rate (float or one-element tensor, e.g. the learned ``syn_lr``).
        epochs: passes over the data.
        batch_size: minibatch size (MTT's 256).
        momentum: SGD momentum (MTT's 0.9).
        weight_decay: SGD weight decay (MTT's 5e-4).
        dsa: DSA strengths (default: MTT's ``DSAParams()``), or None for no augmentation.
        soft_labels: whether ``labels`` are logits.
        generator: the only source of randomness (shuffling, DSA).
        device: where to train; default: where ``network``'s parameters are.

    Returns:
        ``network``, trained, in train mode. A diverging run is not an error here: its test
        accuracy reports it.

    Raises:
        ValueError: ``lr`` not finite and > 0, or a bad argument (named in the message).
    """
    lr_value = _check_lr(lr)
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    momentum = _non_negative("momentum", momentum)
    weight_decay = _non_negative("weight_decay", weight_decay)
    dsa = _check_dsa(dsa)
    generator = _check_generator(generator)
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
    images = _check_images("images", images)
    n = int(images.shape[0])
    if soft_labels:
        labels = _check_soft_labels("labels", labels, n, None)
    else:
        labels = _check_hard_labels("labels", labels, n, None)

    if device is not None:
        network.to(device)
    dev, dtype = _network_device_dtype(network, images)
    x_all = images.detach().to(device=dev, dtype=dtype)
    y_all = labels.detach().to(dev, dtype=dtype) if soft_labels else labels.detach().to(dev).long()
    size = (int(images.shape[2]), int(images.shape[3]))

    def new_sgd(rate: float) -> torch.optim.SGD:
        return torch.optim.SGD(
            network.parameters(), lr=rate, momentum=momentum, weight_decay=weight_decay
        )

    network.train()
    last_full = _last_full_lr_epoch(epochs)
    rate = lr_value
    optimizer = new_sgd(rate)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator, device=generator.device).to(dev)
        for idx in torch.split(order, batch_size):
            x = x_all[idx]
            if dsa is not None:
                x = apply_dsa(x, sample_dsa(int(idx.numel()), size, dsa, generator), dsa)
            out = network(x)
            y = y_all[idx]
            loss = soft_cross_entropy(out, y) if soft_labels else F.cross_entropy(out, y)
            optimizer.zero_grad()
            torch.autograd.backward(loss)
            optimizer.step()
        if epoch == last_full:
            rate *= 0.1
            optimizer = new_sgd(rate)
    return network


def accuracy(network: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Fraction of ``images`` (``[n, C, H, W]``) whose argmax logit equals ``labels`` (``[n]``).

    Runs in eval mode without grad, ``batch_size`` images at a time on ``network``'s device
    (the data may live elsewhere); the network's train/eval mode is restored afterwards.
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
    images = _check_images("images", images)
    n = int(images.shape[0])
    labels = _check_hard_labels("labels", labels, n, None)
    batch_size = _positive_int("batch_size", batch_size)
    dev, dtype = _network_device_dtype(network, images)
    was_training = network.training
    network.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                x = images[start : start + batch_size].to(device=dev, dtype=dtype)
                y = labels[start : start + batch_size].to(dev)
                correct += int((network(x).argmax(dim=1) == y).sum().item())
    finally:
        network.train(was_training)
    return correct / n


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
