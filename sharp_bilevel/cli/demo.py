"""A small bilevel demo on real data (scikit-learn's 8x8 digits): distil one image per class.

Inner problem: a linear softmax classifier trained by ``N`` differentiable gradient steps on the
synthetic set ``phi`` with a learnable step size. Outer objective: cross-entropy of the trained
classifier on real training images. ``SharpBilevelOptimizer`` updates ``phi`` with each rule; the
learnable step size is a ``perturb=False`` group. The report is the real test accuracy of a
classifier trained on each distilled set, beside the same classifier trained on random real
images (one per class).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distill.data import class_balanced_indices
from ..optim.optimizer import SharpBilevelOptimizer


@dataclass(frozen=True)
class Digits:
    """Digits split into train/test, features scaled to [0, 1], as float64 tensors."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split(seed: int = 0, test_fraction: float = 0.3) -> Digits:
    """Load scikit-learn's bundled digits (1797 images, 8x8, 10 classes) and split them."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def train_linear(x: Tensor, y: Tensor, lr: Tensor, steps: int, num_classes: int) -> Tensor:
    """``steps`` of differentiable full-batch gradient descent on CE, from zero weights."""
    weight = torch.zeros(x.shape[1] + 1, num_classes, dtype=x.dtype, requires_grad=True)
    features = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    w = weight
    for _ in range(steps):
        loss = F.cross_entropy(features @ w, y)
        (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        w = w - lr * grad
    return w


def accuracy(w: Tensor, x: Tensor, y: Tensor) -> float:
    """Accuracy of the linear classifier ``w`` on ``(x, y)``."""
    features = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return float(((features @ w).argmax(dim=1) == y).double().mean())


def random_real(data: Digits, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """``per_class`` random real training images of each class (the baseline and the init)."""
    order = class_balanced_indices(data.y_train, per_class, 10, torch.Generator().manual_seed(seed))
    return data.x_train[order], data.y_train[order]


def distil(
    data: Digits,
    perturbation: str,
    rho: float | None,
    iterations: int,
    inner_steps: int,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Distil one image per class with the named rule; returns (images, labels, step size)."""
    x0, labels = random_real(data, 1, seed)
    images = x0.clone().requires_grad_(True)
    log_lr = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    opt = SharpBilevelOptimizer(
        [{"params": [images]}, {"params": [log_lr], "perturb": False, "lr": 0.01}],
        base_optimizer=torch.optim.SGD,
        perturbation=perturbation,
        rho=rho,
        lr=0.3,
        momentum=0.5,
        seed=seed,
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        batch = torch.randperm(len(data.y_train), generator=gen)[:256]

        def closure(*, batch: Tensor = batch) -> Tensor:
            w = train_linear(images, labels, log_lr.exp(), inner_steps, 10)
            features = torch.cat([data.x_train[batch], torch.ones(len(batch), 1).double()], 1)
            loss = F.cross_entropy(features @ w, data.y_train[batch])
            torch.autograd.backward(loss)
            return loss

        opt.step(closure)
    return images.detach(), labels, log_lr.detach().exp()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and print a comparison table."""
    parser = argparse.ArgumentParser(prog="python -m sharp_bilevel", description=__doc__)
    parser.add_argument("--iterations", type=int, default=150, help="outer steps (default 150)")
    parser.add_argument("--inner-steps", type=int, default=10, help="inner GD steps (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--perturbations",
        default="none,sam,asam,gsam,vasso,ssam",
        help="comma-separated rule names (default: all built-in rules)",
    )
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.inner_steps < 1:
        parser.error("--iterations and --inner-steps must be >= 1")
    data = load_digits_split(args.seed)
    radii = {"asam": 0.5}
    print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test images, 8x8, 10 classes")
    print("distilling 1 image per class into a linear classifier's training set\n")
    print(f"{'method':<18}{'test acc':>10}{'step size':>12}{'seconds':>10}")
    x_real, y_real = random_real(data, 1, args.seed)
    baseline_lr = torch.tensor(1.0, dtype=torch.float64)
    w = train_linear(x_real, y_real, baseline_lr, args.inner_steps, 10).detach()
    print(
        f"{'random real':<18}{accuracy(w, data.x_test, data.y_test):>10.3f}{1.0:>12.3f}{0:>10.1f}"
    )
    for name in [n.strip() for n in args.perturbations.split(",") if n.strip()]:
        start = time.perf_counter()
        rho = radii.get(name.lower(), 0.05) if name.lower() != "none" else None
        images, labels, lr = distil(data, name, rho, args.iterations, args.inner_steps, args.seed)
        w = train_linear(images, labels, lr, args.inner_steps, 10).detach()
        acc = accuracy(w, data.x_test, data.y_test)
        elapsed = time.perf_counter() - start
        print(f"{name:<18}{acc:>10.3f}{float(lr):>12.3f}{elapsed:>10.1f}")
    return 0
