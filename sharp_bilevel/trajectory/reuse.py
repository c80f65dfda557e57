"""TR's contract between the two passes of a step, shared by every way of unrolling.

The ascent pass of a two-pass step records ``(w_tau, inner state at tau, sum of directions
before tau)`` in ``ctx.scratch``; the descent pass restarts from it at step ``tau``. Without a
restart a pass starts at the expert's ``w*_t``, step 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..optim.context import StepContext
from .unroll import UnrollResult

#: Where the ascent pass leaves ``(w_tau, inner state, sum of directions before tau)``.
TR_KEY = "trajectory_reuse"


@dataclass(frozen=True)
class Restart:
    """Where a pass begins: ``start`` at step ``step`` with inner ``state``; ``before`` is the
    sum of the directions before it (None from step 0); ``record``: this pass records ``w_tau``."""

    start: Tensor
    state: Any
    before: Tensor | None
    step: int
    record: bool


def restart_point(ctx: StepContext | None, tau: int | None, expert_start: Tensor) -> Restart:
    """The descent pass's recorded ``w_tau`` when there is one, else the expert's start."""
    saved = ctx.scratch.get(TR_KEY) if (ctx is not None and ctx.is_descent) else None
    if tau is not None and saved is not None:
        w_tau, state, before = saved
        return Restart(w_tau, state, before, tau, False)
    record = ctx is not None and ctx.is_ascent and ctx.two_pass and tau is not None
    return Restart(expert_start, None, None, 0, record)


def record_restart(ctx: StepContext | None, restart: Restart, result: UnrollResult) -> None:
    """Leave ``w_tau`` for the descent pass when this pass was asked to record it."""
    if restart.record and ctx is not None:
        ctx.scratch[TR_KEY] = (result.recorded, result.recorded_state, result.direction_sum_before)


def with_before(restart: Restart, directions: Tensor) -> Tensor:
    """``sum u_i`` over the whole unroll: this pass's plus those before its start."""
    return directions if restart.before is None else restart.before + directions


def accumulate(leaves: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """Add ``grads[k]`` into ``leaves[k].grad`` as ``backward()`` would (extra grads ignored)."""
    for leaf, grad in zip(leaves, grads[: len(leaves)], strict=True):
        if grad is not None:
            leaf.grad = grad if leaf.grad is None else leaf.grad + grad


def assign_lr_grad(syn_lr: Tensor, value: Tensor) -> None:
    """``syn_lr.grad = value`` in ``syn_lr``'s shape and dtype (the first-order lr gradient)."""
    syn_lr.grad = value.reshape(syn_lr.shape).to(syn_lr.dtype)
