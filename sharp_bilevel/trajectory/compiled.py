r"""A compiled inner step for the steps that need no graph.

The steps before $\iota$ (TUH), TESLA's and the checkpointed unroll's forward passes only need
$g_i = \nabla_w \mathrm{CE}(f(A_i(x_{B_i}); w_i), y_{B_i})$ as a number. This module builds
that function once per network and loss, as ``torch.compile(torch.func.grad(loss))``; the
augmentation is applied before it (eagerly, from the step plan's draws), so the compiled
function sees plain tensors. Compiled functions are cached per network (weakly) and loss
settings, so a run compiles once per batch shape, not once per outer step.

On the CPU of this project (2 cores, torch 2.13) it makes such a step 0.22 to 0.27 of a kept
step instead of 0.28 to 0.31 (``benchmarks/step_cost/results/inner_step.md``). Its gradients
agree with
the eager ones to float32 rounding reordered by the compiler (about 1e-6 relative for small
batches, up to 3e-4 for IPC 10) and to 1e-12 in float64.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

InnerGradient = Callable[[Tensor, Tensor, Tensor], Tensor]

_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], InnerGradient]] = (
    weakref.WeakKeyDictionary()
)


def compiled_inner_gradient(
    student: Any,
    buffers: dict[str, Tensor],
    soft: bool,
    autocast: torch.dtype | None = None,
) -> InnerGradient:
    """``(w, x, y) -> g``: the mean inner loss's gradient at ``w``, compiled (cached)."""
    if buffers:
        raise ValueError(
            "compile_inner supports networks without buffers (batch norm keeps running "
            f"statistics: {sorted(buffers)[:3]}); use compile_inner=False"
        )
    owner = getattr(student, "module", student)
    key = (soft, autocast, tuple(sorted(buffers)))
    per_owner = _CACHE.setdefault(owner, {})
    if key in per_owner:
        return per_owner[key]

    def loss(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        device = x.device.type
        with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = student(x, w, buffers)
            if soft:
                return F.cross_entropy(out, torch.softmax(y, dim=1))
            return F.cross_entropy(out, y)

    compiled: InnerGradient = torch.compile(torch.func.grad(loss), dynamic=False)
    per_owner[key] = compiled
    return compiled
