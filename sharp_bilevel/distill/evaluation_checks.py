"""Argument checks and seed derivation shared by `sharp_bilevel.distill.evaluation` and
`sharp_bilevel.distill.synthetic_training`, each error naming the argument.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..trajectory.augment import DSAParams

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
