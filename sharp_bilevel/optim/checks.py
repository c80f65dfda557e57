"""What each pass of a step is checked for, agreed by every rank: a finite loss, finite
gradients, the gate's verdict and ``||g||``, in one device sync (and, with a process group, one
all-reduce), so that every rank takes the same skip/raise decision."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .distributed import RankLayout
from .signals import _SigintShield

_BAD_LOSS = "non-finite loss"
_BAD_GRAD = "non-finite gradient"


def _inspect(
    loss: Any,
    grads: Sequence[Tensor],
    everything: Sequence[Tensor],
    weights: Sequence[float] | None = None,
) -> tuple[float, float, str]:
    """Loss value, ``||g||_2^2`` (each tensor's share times ``weights[k]``) and a description of
    any non-finite value ("" if none), in one sync."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar loss, got shape {tuple(loss.shape)}"
            )
        loss_t = loss.detach().reshape(()).to(torch.float64)
    elif loss is None:  # step() without a closure: only the gradients are there to check
        loss_t = torch.tensor(0.0, dtype=torch.float64)
    else:
        loss_t = torch.tensor(float(loss), dtype=torch.float64)
    device = loss_t.device
    all_grads = [p.grad for p in everything if p.grad is not None]
    grads_ok = [torch.isfinite(g).all().to(device) for g in all_grads]
    shares = weights if weights is not None else [1.0] * len(grads)
    sq = [
        g.to(torch.float64).square().sum().to(device) * share
        for g, share in zip(grads, shares, strict=True)
    ]
    summary = torch.stack(
        [
            loss_t,
            torch.stack(grads_ok).all().to(torch.float64) if grads_ok else loss_t.new_ones(()),
            torch.stack(sq).sum() if sq else loss_t.new_zeros(()),
        ]
    ).tolist()
    loss_value, grads_finite, sq_norm = summary
    if loss is None:
        loss_value = math.nan
    elif not math.isfinite(loss_value):
        return loss_value, sq_norm, _BAD_LOSS
    if grads_finite != 1.0:
        return loss_value, math.nan, _BAD_GRAD
    return loss_value, sq_norm, ""


def _check_pass(
    layout: RankLayout | None,
    loss: Any,
    grads: list[Tensor],
    everything: list[Tensor],
    skip_if: Callable[[Any], bool] | None,
    shield: _SigintShield,
) -> tuple[float, float, str, bool]:
    """Loss value, ``||g||``, a non-finite problem ("" if none) and the gate's verdict; with
    a process group, agreed by every rank (one all-reduce)."""
    weights = None if layout is None else [layout.weight(k) for k in range(len(grads))]
    loss_value, sq_norm, problem = _inspect(loss, grads, everything, weights)
    gate = False
    if skip_if is not None and not problem:
        with shield.open():
            gate = bool(skip_if(loss))
    if layout is not None:
        device = grads[0].device if grads else torch.device("cpu")
        bad_loss, bad_grad, sq_norm, gates = layout.agree(
            [problem == _BAD_LOSS, problem == _BAD_GRAD, sq_norm, gate], device
        )
        problem = _BAD_LOSS if bad_loss else _BAD_GRAD if bad_grad else ""
        problem += " (on at least one rank)" if problem else ""
        gate = gates > 0
    grad_norm = math.sqrt(sq_norm) if math.isfinite(sq_norm) and sq_norm >= 0 else math.nan
    return loss_value, grad_norm, problem, gate
