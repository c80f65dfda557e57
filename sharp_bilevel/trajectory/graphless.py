"""The objective's passes that run the inner loop without a graph: TESLA's and the
checkpointed exact BPTT (`sharp_bilevel.trajectory.tesla`,
`sharp_bilevel.trajectory.checkpointed`). Both keep TR's contract: the ascent pass records
``w_tau`` in ``ctx.scratch``, the descent pass restarts from it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..optim.context import StepContext
from .checkpointed import checkpointed_backward, segment_starts
from .hypergradient import UnrollSettings, first_order_lr_grad
from .inner import PlainSGD
from .tesla import tesla_backward, tesla_forward
from .unroll import _InnerProblem, matching_loss

if TYPE_CHECKING:
    from .matching import TrajectoryMatching

#: Where the ascent pass leaves ``(w_tau, inner state, sum of directions before tau)``.
TR_KEY = "trajectory_reuse"


def tesla_pass(
    tm: TrajectoryMatching,
    ctx: StepContext | None,
    iota: int,
    tau: int | None,
    images: Tensor,
    labels: Tensor,
    closest_to: Tensor | None,
) -> Tensor:
    """The objective with TESLA's hypergradient (`sharp_bilevel.trajectory.tesla`)."""
    if tm.inner is not None and not isinstance(tm.inner, PlainSGD):
        raise ValueError(
            f"hypergradient='tesla' assumes plain SGD inside (w <- w - alpha g), got inner="
            f"{tm.inner!r}; use hypergradient='bptt' with another inner optimizer"
        )
    if tm.shard is not None:
        raise ValueError("hypergradient='tesla' does not support a sharded set yet")
    problem = _InnerProblem(
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
    saved = ctx.scratch.get(TR_KEY) if (ctx is not None and ctx.is_descent) else None
    record = False
    if tau is not None and saved is not None:
        start, start_state, before = saved
        start_step = tau
    else:
        start, start_state, before, start_step = tm.expert_start, None, None, 0
        record = ctx is not None and ctx.is_ascent and ctx.two_pass and tau is not None
    trajectory = tesla_forward(
        problem,
        start,
        tm.syn_lr,
        tm.plan,
        first_term=max(iota, start_step),
        start_step=start_step,
        start_state=start_state,
        record_at=tau if record else None,
        closest_to=closest_to,
    )
    result = trajectory.result
    if record and ctx is not None:
        ctx.scratch[TR_KEY] = (
            result.recorded,
            result.recorded_state,
            result.direction_sum_before,
        )
    matched = result.final if closest_to is None else result.closest
    stop = tm.plan.num_steps if closest_to is None else result.closest_step
    assert matched is not None
    assert stop is not None
    directions = tm._directions(result)
    if before is not None:
        directions = before + directions
    with torch.enable_grad():
        point = matched.detach().requires_grad_(True)
        loss = matching_loss(point, tm.expert_target, tm.expert_start, tm.selection)
        (v,) = torch.autograd.grad(loss if ctx is None else ctx.scale(loss), [point])
    leaves = [t for t in (tm.images, tm.labels) if t.requires_grad]
    parts = tesla_backward(problem, trajectory, tm.plan, tm.syn_lr, v, leaves, stop)
    for leaf, grad in zip(leaves, parts, strict=True):
        if grad is not None:
            leaf.grad = grad if leaf.grad is None else leaf.grad + grad
    if tm.syn_lr.requires_grad:
        value = first_order_lr_grad(v, directions)
        tm.syn_lr.grad = value.reshape(tm.syn_lr.shape).to(tm.syn_lr.dtype)
    tm.last_unroll = result
    return loss.detach()


def checkpointed_pass(
    tm: TrajectoryMatching,
    ctx: StepContext | None,
    settings: UnrollSettings,
    iota: int,
    tau: int | None,
    images: Tensor,
    labels: Tensor,
    closest_to: Tensor | None,
) -> Tensor:
    """Exact BPTT with segment checkpoints (`sharp_bilevel.trajectory.checkpointed`)."""
    mode = "hypergradient='checkpointed'"
    if tm.inner is not None and not isinstance(tm.inner, PlainSGD):
        raise ValueError(f"{mode} needs plain SGD inside, got inner={tm.inner!r}")
    if tm.shard is not None:
        raise ValueError(f"{mode} does not support a sharded set yet")
    if closest_to is not None:
        raise ValueError(f"{mode} does not support match_step='closest' yet")
    problem = _InnerProblem(
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
    saved = ctx.scratch.get(TR_KEY) if (ctx is not None and ctx.is_descent) else None
    record = False
    if tau is not None and saved is not None:
        start, start_state, before = saved
        start_step = tau
    else:
        start, start_state, before, start_step = tm.expert_start, None, None, 0
        record = ctx is not None and ctx.is_ascent and ctx.two_pass and tau is not None
    first = max(iota, start_step)
    starts = segment_starts(first, tm.plan.num_steps, settings.segment)
    trajectory = tesla_forward(
        problem,
        start,
        tm.syn_lr,
        tm.plan,
        first_term=first,
        start_step=start_step,
        start_state=start_state,
        record_at=tau if record else None,
        store=set(starts),
    )
    result = trajectory.result
    if record and ctx is not None:
        ctx.scratch[TR_KEY] = (
            result.recorded,
            result.recorded_state,
            result.direction_sum_before,
        )
    first_order = settings.lr_gradient == "first_order"
    with torch.enable_grad():
        point = result.final.detach().requires_grad_(True)
        loss = matching_loss(point, tm.expert_target, tm.expert_start, tm.selection)
        (v,) = torch.autograd.grad(loss if ctx is None else ctx.scale(loss), [point])
    leaves = [t for t in (tm.images, tm.labels) if t.requires_grad]
    exact_lr = not first_order and tm.syn_lr.requires_grad
    parts = checkpointed_backward(
        tm.student,
        trajectory,
        images,
        labels,
        tm.syn_lr,
        tm.plan,
        v,
        [*leaves, tm.syn_lr] if exact_lr else leaves,
        starts,
        soft_targets=tm.soft_labels,
        augmentation=tm.augmentation,
        lr_in_graph=not first_order,
        inner=tm.inner,
        autocast=tm.autocast,
    )
    targets = [*leaves, tm.syn_lr] if exact_lr else leaves
    for leaf, grad in zip(targets, parts, strict=True):
        if grad is not None:
            leaf.grad = grad if leaf.grad is None else leaf.grad + grad
    if first_order and tm.syn_lr.requires_grad:
        directions = result.direction_sum if before is None else before + result.direction_sum
        value = first_order_lr_grad(v, directions)
        tm.syn_lr.grad = value.reshape(tm.syn_lr.shape).to(tm.syn_lr.dtype)
    tm.last_unroll = result
    return loss.detach()
