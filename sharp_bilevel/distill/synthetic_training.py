"""Training a fresh network on a synthetic set and testing it: MTT's ``evaluate_synset``
loop (`train_on_synthetic`), its test (`accuracy`) and DATM's soft cross-entropy
(`soft_cross_entropy`). `sharp_bilevel.distill.evaluation` runs them per architecture and
seed and re-exports them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..trajectory.augment import DSAParams, apply_dsa, sample_dsa
from .evaluation_checks import (
    _DEFAULT_DSA,
    _check_dsa,
    _check_generator,
    _check_hard_labels,
    _check_images,
    _check_lr,
    _check_soft_labels,
    _network_device_dtype,
    _non_negative,
    _positive_int,
)


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
