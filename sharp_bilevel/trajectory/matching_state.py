"""What the graph-free passes read from a trajectory-matching objective, as a protocol.

`sharp_bilevel.trajectory.graphless` runs TESLA's and the checkpointed passes on behalf of
`sharp_bilevel.trajectory.matching.TrajectoryMatching`; it names the objective through this
protocol instead of importing the class, so the two modules do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from .inner import InnerOptimizer
from .selection import ParameterSelection
from .sharded import Shard
from .step_plan import Augmentation, StepPlan
from .student import Student
from .unroll import UnrollResult

__all__ = ["MatchingState"]


class MatchingState(Protocol):
    """The objective's state for one outer iteration (`TrajectoryMatching` satisfies it)."""

    student: Student
    autocast: torch.dtype | None
    images: Tensor
    syn_lr: Tensor
    labels: Tensor
    soft_labels: bool
    expert_start: Tensor
    expert_target: Tensor
    augmentation: Augmentation | None
    inner: InnerOptimizer | None
    shard: Shard | None
    plan: StepPlan
    selection: ParameterSelection | None
    last_unroll: UnrollResult | None

    def _compiled(self) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None: ...

    def _directions(self, result: UnrollResult) -> Tensor: ...
