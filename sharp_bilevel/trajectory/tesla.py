r"""TESLA's hypergradient (Cui et al., ICML 2023): memory constant in the number of inner steps.

With plain SGD, $w_N = w_0 - \alpha \sum_i g_i(x, w_i)$. TESLA differentiates the matching loss
as if every $w_i$ were a constant, keeping only each step's direct dependence on the images:

$$
\frac{\partial L}{\partial x} \approx -\alpha \sum_{i \ge \iota}
\frac{\partial}{\partial x} \big\langle g_i(x, w_i), v \big\rangle, \qquad
v = \frac{\partial L}{\partial w_N},
$$

and likewise for soft labels; the lr gradient is the first-order one,
$\langle v, -\sum_i g_i \rangle$ (SATM Eq. 10 is the same formula). The forward pass runs
without a graph and stores the weights $w_i$ (``P`` numbers per step, as TESLA's code does);
each step's term is then one double-backward with only that step's graph alive, so the saved
activations do not grow with $N$. The dropped terms are the Hessian chains
$\partial g_i / \partial w_i \cdot \partial w_i / \partial x$: exact BPTT keeps them, TUH keeps
them within its window.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .inner import PlainSGD, detach_state
from .step_plan import StepPlan
from .unroll import UnrollResult, _InnerProblem


@dataclass
class TeslaTrajectory:
    """The forward pass: ``result`` (``final`` and ``closest`` detached) and the weights
    ``w_i`` of the steps whose terms enter the hypergradient, by step index."""

    result: UnrollResult
    weights: dict[int, Tensor] = field(default_factory=dict)


def tesla_forward(
    problem: _InnerProblem,
    start: Tensor,
    syn_lr: Tensor,
    plan: StepPlan,
    *,
    first_term: int,
    start_step: int = 0,
    start_state: Any = None,
    record_at: int | None = None,
    closest_to: Tensor | None = None,
    store: Container[int] | None = None,
) -> TeslaTrajectory:
    """Steps ``start_step..N-1`` without graph; ``w_i`` kept for ``i >= first_term`` (and, when
    ``store`` is given, only for the steps in it: a checkpointed unroll's segment starts)."""
    inner = PlainSGD()
    lr = float(syn_lr.detach())
    w = start.detach()
    state = inner.init(w) if start_state is None else start_state
    direction_sum = torch.zeros_like(w)
    out = TeslaTrajectory(UnrollResult(final=w, direction_sum=direction_sum))
    best: float | None = None
    for i in range(start_step, plan.num_steps):
        if i == record_at:
            out.result.recorded = w.clone()
            out.result.recorded_state = detach_state(state)
            out.result.direction_sum_before = direction_sum.clone()
        if i >= first_term and (store is None or i in store):
            out.weights[i] = w
        with torch.enable_grad():
            leaf = w.requires_grad_(True)
            grad = problem.gradient(leaf, plan.indices[i], plan.draws[i], graph=False)
        u, state = inner.direction(grad.detach(), state, w)
        direction_sum += u
        w = (w.detach() + lr * u).detach()
        if closest_to is not None and i >= first_term:
            distance = float((w - closest_to).abs().sum())
            if best is None or distance <= best:  # ATT: ties go to the later step
                best = distance
                out.result.closest, out.result.closest_step = w, i + 1
                out.result.closest_direction_sum = direction_sum.clone()
    out.result.final = w
    out.result.direction_sum = direction_sum
    return out


def tesla_backward(
    problem: _InnerProblem,
    trajectory: TeslaTrajectory,
    plan: StepPlan,
    syn_lr: Tensor,
    v: Tensor,
    leaves: list[Tensor],
    stop: int,
) -> list[Tensor | None]:
    r"""$\sum_i \partial \langle -\alpha g_i(x, w_i), v \rangle / \partial$ ``leaves`` over the
    stored steps ``i < stop``, one step's graph at a time."""
    scale = -float(syn_lr.detach())
    totals: list[Tensor | None] = [None] * len(leaves)
    for i, w_i in sorted(trajectory.weights.items()):
        if i >= stop:
            break
        with torch.enable_grad():
            leaf = w_i.detach().requires_grad_(True)
            grad = problem.gradient(leaf, plan.indices[i], plan.draws[i], graph=True)
            term = scale * torch.dot(grad.reshape(-1), v.reshape(-1))
            parts = torch.autograd.grad(term, leaves, allow_unused=True)
        for k, part in enumerate(parts):
            current = totals[k]
            if part is not None:
                totals[k] = part if current is None else current + part
    return totals
