"""The gradient-scaler protocol of a step (float16 mixed precision): a ``torch.amp.GradScaler``
sees one ``step``/``update`` per optimizer step, with the scale backed off after an overflow in
either pass; the optimizer itself works on unscaled gradients."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _check_scaler(scaler: Any) -> None:
    """``scaler`` must look like a ``torch.amp.GradScaler`` (or be None)."""
    needed = ("scale", "step", "update", "get_scale", "is_enabled", "state_dict")
    if scaler is not None and not all(callable(getattr(scaler, n, None)) for n in needed):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
        )


def _reset_scaler_stage(scaler: Any) -> None:
    """Forget a half-done ``unscale_``/``step`` of this update (so the next step may unscale)."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        states.clear()


def _loss_scale(scaler: Any, params: list[Tensor]) -> float:
    """The scaler's current scale (1.0 without an enabled scaler)."""
    if scaler is None or not scaler.is_enabled():
        return 1.0
    if getattr(scaler, "_scale", 0) is None:  # created lazily by its first scale() call
        scaler.scale(torch.zeros((), device=params[0].device if params else "cpu"))
    return float(scaler.get_scale())


def _back_off(scaler: Any, base_optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    """One scaler update that records an overflow (the scale is backed off); no step.

    ``params``: every parameter, the perturbed ones first (one of them carries the marker inf).
    """
    for p in params:
        p.grad = None
    marker = params[0]
    marker.grad = torch.full_like(marker, math.inf)
    try:
        scaler.step(base_optimizer)  # finds the inf and skips the base step
        scaler.update()
    except BaseException:
        _reset_scaler_stage(scaler)
        raise
    finally:
        marker.grad = None
