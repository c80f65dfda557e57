"""The objective's passes that run the inner loop without a graph: TESLA's and the
checkpointed exact BPTT (`sharp_bilevel.trajectory.tesla`,
`sharp_bilevel.trajectory.checkpointed`). Both keep TR's contract
(`sharp_bilevel.trajectory.reuse`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..optim.context import StepContext
from .checkpointed import checkpointed_backward, segment_starts
from .hypergradient import UnrollSettings, first_order_lr_grad
from .inner import PlainSGD
from .matching_state import MatchingState
from .reuse import accumulate, assign_lr_grad, record_restart, restart_point, with_before
from .tesla import tesla_backward, tesla_forward
from .unroll import _InnerProblem, matching_loss


def _refuse(tm: MatchingState, mode: str, closest_to: Tensor | None, att: bool) -> None:
    """The settings these passes cannot run, each named."""
    if tm.inner is not None and not isinstance(tm.inner, PlainSGD):
        raise ValueError(
            f"hypergradient={mode!r} assumes plain SGD inside (w <- w - alpha g), got inner="
            f"{tm.inner!r}; use hypergradient='bptt' with another inner optimizer"
        )
    if tm.shard is not None:
        raise ValueError(f"hypergradient={mode!r} does not support a sharded set yet")
    if closest_to is not None and not att:
        raise ValueError(f"hypergradient={mode!r} does not support match_step='closest' yet")


def _problem(tm: MatchingState, images: Tensor, labels: Tensor) -> _InnerProblem:
    """The inner problem of one pass (compiled steps when ``compile_inner``)."""
    return _InnerProblem(
        tm.student,
        tm.student.fresh_buffers(),
        images,
        labels,
        tm.augmentation,
        tm.soft_labels,
        None,
        tm.autocast,
        tm._compiled(),
    )


def _cotangent(tm: MatchingState, ctx: StepContext | None, point: Tensor) -> tuple[Tensor, Tensor]:
    """``(L, dL/dw)`` at the matched weights ``point`` (the gradient of the scaled loss)."""
    with torch.enable_grad():
        leaf = point.detach().requires_grad_(True)
        loss = matching_loss(leaf, tm.expert_target, tm.expert_start, tm.selection)
        (v,) = torch.autograd.grad(loss if ctx is None else ctx.scale(loss), [leaf])
    return loss, v


def tesla_pass(
    tm: MatchingState,
    ctx: StepContext | None,
    iota: int,
    tau: int | None,
    images: Tensor,
    labels: Tensor,
    closest_to: Tensor | None,
) -> Tensor:
    """The objective with TESLA's hypergradient (`sharp_bilevel.trajectory.tesla`)."""
    _refuse(tm, "tesla", closest_to, att=True)
    problem = _problem(tm, images, labels)
    restart = restart_point(ctx, tau, tm.expert_start)
    trajectory = tesla_forward(
        problem,
        restart.start,
        tm.syn_lr,
        tm.plan,
        first_term=max(iota, restart.step),
        start_step=restart.step,
        start_state=restart.state,
        record_at=tau if restart.record else None,
        closest_to=closest_to,
    )
    result = trajectory.result
    record_restart(ctx, restart, result)
    matched = result.final if closest_to is None else result.closest
    stop = tm.plan.num_steps if closest_to is None else result.closest_step
    assert matched is not None
    assert stop is not None
    loss, v = _cotangent(tm, ctx, matched)
    leaves = [t for t in (tm.images, tm.labels) if t.requires_grad]
    accumulate(leaves, tesla_backward(problem, trajectory, tm.plan, tm.syn_lr, v, leaves, stop))
    if tm.syn_lr.requires_grad:
        directions = with_before(restart, tm._directions(result))
        assign_lr_grad(tm.syn_lr, first_order_lr_grad(v, directions))
    tm.last_unroll = result
    return loss.detach()


def checkpointed_pass(
    tm: MatchingState,
    ctx: StepContext | None,
    settings: UnrollSettings,
    iota: int,
    tau: int | None,
    images: Tensor,
    labels: Tensor,
    closest_to: Tensor | None,
) -> Tensor:
    """Exact BPTT with segment checkpoints (`sharp_bilevel.trajectory.checkpointed`)."""
    _refuse(tm, "checkpointed", closest_to, att=False)
    problem = _problem(tm, images, labels)
    restart = restart_point(ctx, tau, tm.expert_start)
    first = max(iota, restart.step)
    starts = segment_starts(first, tm.plan.num_steps, settings.segment)
    trajectory = tesla_forward(
        problem,
        restart.start,
        tm.syn_lr,
        tm.plan,
        first_term=first,
        start_step=restart.step,
        start_state=restart.state,
        record_at=tau if restart.record else None,
        store=set(starts),
    )
    result = trajectory.result
    record_restart(ctx, restart, result)
    first_order = settings.lr_gradient == "first_order"
    loss, v = _cotangent(tm, ctx, result.final)
    leaves = [t for t in (tm.images, tm.labels) if t.requires_grad]
    if not first_order and tm.syn_lr.requires_grad:
        leaves.append(tm.syn_lr)  # the exact lr gradient flows through the segments
    parts = checkpointed_backward(
        tm.student,
        trajectory,
        images,
        labels,
        tm.syn_lr,
        tm.plan,
        v,
        leaves,
        starts,
        soft_targets=tm.soft_labels,
        augmentation=tm.augmentation,
        lr_in_graph=not first_order,
        inner=tm.inner,
        autocast=tm.autocast,
    )
    accumulate(leaves, parts)
    if first_order and tm.syn_lr.requires_grad:
        directions = with_before(restart, result.direction_sum)
        assign_lr_grad(tm.syn_lr, first_order_lr_grad(v, directions))
    tm.last_unroll = result
    return loss.detach()
