r"""Exact BPTT in sub-linear memory: a checkpointed unroll.

The forward pass runs the inner steps without a graph and keeps the student's weights only at
segment starts $b_0 < b_1 < \dots$ (every ``segment`` steps). The backward pass walks the
segments from the last to the first: it recomputes segment $[b_j, b_{j+1})$ with its graph from
the stored $w_{b_j}$ (the same minibatches and augmentation draws: they come from the step
plan) and back-propagates the cotangent $v_{j+1} = \partial L / \partial w_{b_{j+1}}$ through
it:

$$
v_j = \Big(\frac{\partial w_{b_{j+1}}}{\partial w_{b_j}}\Big)^{\!\top} v_{j+1}, \qquad
\frac{\partial L}{\partial x} = \sum_j
\Big(\frac{\partial w_{b_{j+1}}}{\partial x}\Big)^{\!\top} v_{j+1},
$$

which is the chain rule of exact BPTT split at the segment starts: the gradient is the same,
only summed in another order. Memory: the segment starts ($N/s$ weight vectors) and one
segment's graph ($s$ steps) instead of $N$ steps' graphs, so $s \approx \sqrt{N}$ gives
$O(\sqrt{N})$; time: one extra forward of every kept step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .step_plan import StepPlan
from .student import Student
from .tesla import TeslaTrajectory
from .unroll import unroll


def segment_starts(first: int, num_steps: int, segment: int | None) -> list[int]:
    """Segment starts ``first, first + s, ...`` below ``num_steps`` (``s = ceil(sqrt(n))`` for
    the ``n = num_steps - first`` kept steps when ``segment`` is None)."""
    kept = num_steps - first
    size = max(1, math.ceil(math.sqrt(kept))) if segment is None else segment
    return list(range(first, num_steps, size))


def checkpointed_backward(
    student: Student,
    trajectory: TeslaTrajectory,
    images: Tensor,
    targets: Tensor,
    syn_lr: Tensor,
    plan: StepPlan,
    v: Tensor,
    leaves: list[Tensor],
    starts: list[int],
    **unroll_options: object,
) -> list[Tensor | None]:
    """Gradients of ``<w_N, v>`` for ``leaves`` (images, labels, and ``syn_lr`` for the exact
    lr gradient), recomputing one segment at a time from ``trajectory.weights``."""
    totals: list[Tensor | None] = [None] * len(leaves)
    ends = [*starts[1:], plan.num_steps]
    for begin, end in zip(reversed(starts), reversed(ends), strict=True):
        with torch.enable_grad():
            result = unroll(
                student,
                trajectory.weights[begin],
                images,
                targets,
                syn_lr,
                plan,
                start_step=begin,
                stop_step=end,
                graph_from=begin,
                **unroll_options,  # type: ignore[arg-type]
            )
            assert result.graph_start is not None
            inputs = [result.graph_start, *leaves]
            parts = torch.autograd.grad(result.final, inputs, grad_outputs=v, allow_unused=True)
        v_next = parts[0]
        v = torch.zeros_like(v) if v_next is None else v_next
        for k, part in enumerate(parts[1:]):
            current = totals[k]
            if part is not None:
                totals[k] = part if current is None else current + part
    return totals
