r"""The inner unroll with truncation (TUH) and a restart point (TR).

Inner step ``i`` (MTT, all four repositories): with the plan's minibatch ``B_i`` and augmentation
``A_i``,

$$
g_i = \nabla_w \mathrm{CE}(f(A_i(x_{B_i}); w_i), y_{B_i}), \qquad
w_{i+1} = w_i + \alpha\, u_i \quad (u_i = -g_i \text{ for SGD}).
$$

* **TUH** (SATM Eq. 8): steps ``i < graph_from`` (``iota``) run without graph (their ``w_i``
  detached), so the hypergradient flows through steps ``iota..N-1`` only and the saved activations
  are ``O(P (N - iota))``. ``graph_from = 0`` is exact BPTT (MTT).
* **TR** (SATM Eq. 9): ``record_at = tau`` saves ``w_tau`` (detached) and the inner optimizer's
  state; a second call with ``start=w_tau, start_step=tau`` runs steps ``tau..N-1`` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .compiled import compiled_inner_gradient
from .inner import InnerOptimizer, PlainSGD, detach_state
from .selection import ParameterSelection
from .sharded import Shard, check_shardable, copy_to_ranks, reduce_from_ranks
from .step_plan import Augmentation, StepPlan
from .student import Student


@dataclass
class UnrollResult:
    """What one unroll produced.

    Attributes:
        final: ``w_N``, with graph through the steps run with graph.
        direction_sum: ``sum u_i`` over the steps this call ran (detached).
        recorded: ``w_tau`` (detached) when ``record_at`` was given, else None.
        recorded_state: the inner optimizer's state at ``tau`` (detached).
        direction_sum_before: ``sum_{i < tau} u_i`` (detached) when recording.
        graph_start: the leaf ``w`` where the graph begins (``w_iota``, or ``start`` when this
            call began inside the graph); a sharded backward asks for its gradient so every rank
            runs every collective.
        closest: with ``closest_to``, the ``w_i`` (with graph) of the kept steps nearest to it in
            L1 distance (ATT's choice; ties go to the later step), else None.
        closest_step: its index ``i`` (``w_i`` is the point after ``i`` inner steps).
        closest_direction_sum: ``sum u_j`` over this call's steps before ``closest_step``.
    """

    final: Tensor
    direction_sum: Tensor
    recorded: Tensor | None = None
    recorded_state: Any = None
    direction_sum_before: Tensor | None = None
    graph_start: Tensor | None = None
    closest: Tensor | None = None
    closest_step: int | None = None
    closest_direction_sum: Tensor | None = None


def inner_loss(logits: Tensor, targets: Tensor, soft: bool) -> Tensor:
    """Cross-entropy; with ``soft`` the targets are logits and the loss is
    ``-mean_b sum_c softmax(targets)_bc log softmax(logits)_bc`` (DATM's soft labels)."""
    if soft:
        return F.cross_entropy(logits, torch.softmax(targets, dim=1))
    return F.cross_entropy(logits, targets)


def unroll(
    student: Student,
    start: Tensor,
    images: Tensor,
    targets: Tensor,
    syn_lr: Tensor,
    plan: StepPlan,
    *,
    soft_targets: bool = False,
    augmentation: Augmentation | None = None,
    graph_from: int = 0,
    start_step: int = 0,
    start_state: Any = None,
    record_at: int | None = None,
    lr_in_graph: bool = True,
    inner: InnerOptimizer | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    shard: Shard | None = None,
    closest_to: Tensor | None = None,
    autocast: torch.dtype | None = None,
    stop_step: int | None = None,
    compile_inner: bool = False,
) -> UnrollResult:
    r"""Run inner steps ``start_step..N-1`` of ``plan`` from ``start``:

    $$
    w_{i+1} = w_i + \alpha \, u_i, \qquad
    u_i = -\nabla_w \mathrm{CE}\big(f(A_i(x_{B_i}); w_i), y_{B_i}\big) \text{ for SGD},
    $$

    with the graph kept from step $\iota$ (``graph_from``) on.

    Args:
        student: the network driven by a flat vector.
        start: ``w`` at ``start_step`` (``[P]``; detached here).
        images: synthetic images ``[n, C, H, W]`` (read now: perturbed values are seen).
        targets: hard labels ``[n]`` or, with ``soft_targets``, label logits ``[n, classes]``.
        syn_lr: the learnable rate ``alpha`` (0-d).
        plan: minibatch indices and augmentation draws per step.
        augmentation: applies the plan's draws (None: no augmentation).
        graph_from: ``iota``; steps before it run without graph.
        start_step: first step to run (``tau`` for a TR restart).
        start_state: the inner optimizer's state at ``start_step`` (None: fresh).
        record_at: ``tau``; record ``w_tau`` before running step ``tau``.
        lr_in_graph: False keeps ``alpha`` out of the graph (first-order lr learning).
        inner: the inner optimizer (MTT's plain SGD by default).
        loss_fn: ``loss_fn(outputs, targets)`` replaces the (soft) cross-entropy, e.g. a squared
            error for regression (a mean over the batch).
        shard: this rank's part of a set sharded over ranks (`sharded`): ``images`` and
            ``targets`` hold its rows only, the plan indexes the whole set, and each step's
            gradient is summed over ranks so every rank follows the same trajectory.
        closest_to: ATT's target ``w*``: also return the point of the kept steps (those run with
            graph) nearest to it in L1 distance, ``UnrollResult.closest``.
        stop_step: run up to (not including) this step instead of ``N`` (a segment of a
            checkpointed unroll); ``final`` is then ``w_stop``.
        compile_inner: the steps without graph use the compiled inner gradient
            (`sharp_bilevel.trajectory.compiled`); the steps with graph stay eager.
        autocast: ``torch.bfloat16`` or ``torch.float16``: each step's forward and inner loss
            run under ``torch.autocast`` (mixed precision); ``w``, the images, ``syn_lr`` and
            every gradient keep their own (float32) dtype. None: off.
    """
    inner = PlainSGD() if inner is None else inner
    n_steps = plan.num_steps
    if not 0 <= start_step < n_steps:
        raise ValueError(f"start_step must be in [0, {n_steps}), got {start_step}")
    if record_at is not None and not start_step <= record_at < n_steps:
        raise ValueError(f"record_at must be in [{start_step}, {n_steps}), got {record_at}")
    buffers = student.fresh_buffers()
    if shard is not None:
        check_shardable(buffers)
    compiled = None
    if compile_inner and loss_fn is None:
        compiled = compiled_inner_gradient(student, buffers, soft_targets, autocast)
    problem = _InnerProblem(
        student, buffers, images, targets, augmentation, soft_targets, loss_fn, autocast, compiled
    )
    w = start.detach().requires_grad_(True)
    state = inner.init(w) if start_state is None else start_state
    direction_sum = torch.zeros_like(w, requires_grad=False)
    result = UnrollResult(final=w, direction_sum=direction_sum)
    best: float | None = None
    stop = n_steps if stop_step is None else stop_step
    if not start_step < stop <= n_steps:
        raise ValueError(f"stop_step must be in ({start_step}, {n_steps}], got {stop_step}")
    for i in range(start_step, stop):
        if i == record_at:
            result.recorded = w.detach().clone()
            result.recorded_state = detach_state(state)
            result.direction_sum_before = direction_sum.clone()
        graph = i >= graph_from
        if not graph or i == graph_from:
            # A fresh leaf: steps before iota leave no graph behind.
            w = w.detach().requires_grad_(True)
            state = detach_state(state)
        if graph and result.graph_start is None:
            result.graph_start = w
        if shard is None:
            grad = problem.gradient(w, plan.indices[i], plan.draws[i], graph)
        else:
            grad = problem.sharded_gradient(w, plan.indices[i], plan.draws[i], graph, shard)
        u, state = inner.direction(grad, state, w)
        direction_sum += u.detach()
        lr = syn_lr if (graph and lr_in_graph) else syn_lr.detach()
        w = w + lr * u
        if not graph:
            w = w.detach()
        elif closest_to is not None:
            with torch.no_grad():
                distance = float((w - closest_to).abs().sum())
            if best is None or distance <= best:  # ATT: ties go to the later step
                best = distance
                result.closest, result.closest_step = w, i + 1
                result.closest_direction_sum = direction_sum.clone()
    result.final = w
    result.direction_sum = direction_sum
    return result


@dataclass(frozen=True)
class _InnerProblem:
    """What every inner step of one unroll reads: the student, the (local) synthetic set and
    its targets, the augmentation and the loss."""

    student: Student
    buffers: dict[str, Tensor]
    images: Tensor
    targets: Tensor
    augmentation: Augmentation | None
    soft: bool
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None
    autocast: torch.dtype | None = None
    compiled: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    def gradient(self, w: Tensor, indices: Tensor, draw: Any, graph: bool) -> Tensor:
        """``g_i``: the gradient of the mean inner loss over the minibatch ``indices`` at ``w``
        (the forward and the loss under ``torch.autocast`` when ``autocast`` is a dtype; ``w``,
        the images and ``g_i`` stay in their own dtype)."""
        idx = indices.to(self.images.device)
        x = self.images[idx] if graph else self.images.detach()[idx]
        if self.augmentation is not None and draw is not None:
            x = self.augmentation.apply(x, draw)
        y = self.targets[idx.to(self.targets.device)]
        if not graph:
            y = y.detach()
            if self.compiled is not None and not saved_tensor_hooks_active():
                return self.compiled(w.detach(), x.detach(), y)  # a step without graph
        with torch.autocast(
            self.images.device.type,
            dtype=self.autocast or torch.bfloat16,
            enabled=self.autocast is not None,
        ):
            outputs = self.student(x, w, self.buffers)
            if self.loss_fn is None:
                loss = inner_loss(outputs, y, self.soft)
            else:
                loss = self.loss_fn(outputs, y)
        (grad,) = torch.autograd.grad(loss, w, create_graph=graph)
        return grad

    def sharded_gradient(
        self, w: Tensor, indices: Tensor, draw: Any, graph: bool, shard: Shard
    ) -> Tensor:
        """``g_i = sum_r g_i^(r)``: this rank's members of the global minibatch, weighted by
        ``|members| / |B_i|``, summed over ranks (the ``f``/``g`` collectives with graph)."""
        positions, rows = shard.members(indices)
        w_in = copy_to_ranks(w, shard.group) if graph else w
        if rows.numel() == 0:
            # No member here: a zero part that still depends on w, so this rank joins every
            # collective of the forward and of the backward.
            part = w_in * 0.0
        else:
            local_draw = None if draw is None else _select(draw, positions)
            part = self.gradient(w_in, rows, local_draw, graph)
            part = part * (rows.numel() / indices.numel())
        if graph:
            return reduce_from_ranks(part, shard.group)
        total = part.detach().clone()
        dist.all_reduce(total, group=shard.group)
        return total


def saved_tensor_hooks_active() -> bool:
    """Whether a ``saved_tensors_hooks`` context is open (``torch.func`` refuses to run inside
    one, so the compiled inner step then falls back to the eager one)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _select(draw: Any, positions: Tensor) -> Any:
    select = getattr(draw, "select", None)
    if select is None:
        raise TypeError(
            f"a sharded unroll needs augmentation draws with select(positions) (DSADraw has it), "
            f"got {type(draw).__name__}"
        )
    return select(positions)


def matching_loss(
    final: Tensor, target: Tensor, start: Tensor, selection: ParameterSelection | None = None
) -> Tensor:
    r"""MTT's normalised parameter distance (paper Eq. 1):
    ``||w_N - w*_{t+M}||^2 / ||w*_t - w*_{t+M}||^2`` (the denominator a constant).

    With a PAD ``selection`` both sums run over its kept entries only
    (`sharp_bilevel.trajectory.selection`)."""
    if selection is not None:
        kept = selection.kept(final, target)
        final, target, start = final[kept], target[kept], start[kept]
    denominator = (start.detach() - target.detach()).square().sum()
    if not bool(denominator > 0):
        raise ValueError(
            "the expert start and target parameters are identical: the matching loss is "
            "undefined. Likely cause: buffers written by MTT's buffer.py on the CPU, where "
            "p.detach().cpu() is the live tensor, so every stored epoch equals the final weights "
            "(store p.detach().clone(), or train experts with "
            "sharp_bilevel.distill.experts.train_expert); otherwise choose expert_epochs >= 1 "
            "on a trajectory that moves"
        )
    return (final - target.detach()).square().sum() / denominator
