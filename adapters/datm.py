"""DATM (Guo et al., ICLR 2024) adapter: soft labels, the difficulty window and the gate.

DATM is MTT plus three things, each a piece here:

* learnable soft labels stored as logits (targets ``softmax(logits)``, soft cross-entropy in the
  unroll), initialised from expert predictions on the synthetic images
  (`soft_label_logits`), stepped by their own base-optimizer group and never perturbed;
* a start-epoch window ``[min_start_epoch, upper)`` whose upper end ramps linearly from
  ``current_max_start_epoch`` to ``max_start_epoch`` over ``expansion_end_epoch`` iterations
  (`StartEpochWindow`);
* a gate: the step is skipped when the unperturbed loss exceeds ``threshold``
  (``optimizer.step(closure, skip_if=gate(threshold))``); nothing perturbed is left behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sharp_bilevel.trajectory.matching import TrajectoryMatching
from sharp_bilevel.trajectory.student import Student, as_student

from .mtt import floor_syn_lr
from .mtt import make_closure as _mtt_closure


def make_closure(
    student_net: nn.Module | Student,
    expert_trajectory: Sequence[Any],
    start_epoch: int,
    image_syn: Tensor,
    syn_lr: Tensor,
    label_syn: Tensor,
    **kwargs: Any,
) -> TrajectoryMatching:
    """MTT's closure with ``soft_labels=True``: ``label_syn`` are DATM's learnable logits
    ``[n, classes]`` (inner targets ``softmax(label_syn)``). Every keyword of
    ``sharp_bilevel.adapters.mtt.make_closure`` (``args``, ``seed``, ``settings``, ``shard``, ...)
    applies."""
    return _mtt_closure(
        student_net,
        expert_trajectory,
        start_epoch,
        image_syn,
        syn_lr,
        label_syn,
        soft_labels=True,
        **kwargs,
    )


__all__ = ["StartEpochWindow", "floor_syn_lr", "gate", "make_closure", "soft_label_logits"]


@dataclass(frozen=True)
class StartEpochWindow:
    """DATM's difficulty-aligned start epochs: ``t ~ U{min_start_epoch, ..., upper(it) - 1}``.

    ``upper(it) = min(max_start_epoch, current_max_start_epoch +
    floor((max_start_epoch - current_max_start_epoch) * it / expansion_end_epoch))`` when
    ``sequential``, else ``max_start_epoch``.
    """

    min_start_epoch: int = 0
    current_max_start_epoch: int = 20
    max_start_epoch: int = 25
    expansion_end_epoch: int = 3000
    sequential: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.min_start_epoch < self.max_start_epoch:
            raise ValueError(
                "need 0 <= min_start_epoch < max_start_epoch, got "
                f"{self.min_start_epoch}, {self.max_start_epoch}"
            )
        # current_max_start_epoch only matters for the ramp (DATM ignores it otherwise).
        if self.sequential and not (
            self.min_start_epoch < self.current_max_start_epoch <= self.max_start_epoch
        ):
            raise ValueError(
                "with sequential=True need min_start_epoch < current_max_start_epoch <= "
                f"max_start_epoch, got {self.min_start_epoch}, {self.current_max_start_epoch}, "
                f"{self.max_start_epoch}"
            )
        if self.expansion_end_epoch < 1:
            raise ValueError(f"expansion_end_epoch must be >= 1, got {self.expansion_end_epoch}")

    def upper(self, iteration: int) -> int:
        """The exclusive upper end of the window at outer iteration ``iteration``."""
        if not self.sequential:
            return self.max_start_epoch
        span = self.max_start_epoch - self.current_max_start_epoch
        ramp = math.floor(span * iteration / self.expansion_end_epoch)
        return min(self.max_start_epoch, self.current_max_start_epoch + ramp)

    def sample(self, iteration: int, generator: torch.Generator) -> int:
        """Draw a start epoch for ``iteration`` from ``generator``."""
        low, high = self.min_start_epoch, self.upper(iteration)
        return int(torch.randint(low, high, (1,), generator=generator).item())


def gate(threshold: float) -> Callable[[Any], bool]:
    """DATM's skip rule on the unperturbed loss: skip when ``loss > threshold``."""
    return lambda loss: float(loss) > threshold


@torch.no_grad()
def soft_label_logits(
    student_net: nn.Module | Student,
    expert_params: Sequence[Any],
    image_syn: Tensor,
    label_syn: Tensor,
) -> Tensor:
    """Initial soft-label logits ``[n, classes]`` from experts' predictions on ``image_syn``.

    For each synthetic image, the logits are averaged over the experts (each a flat vector or a
    per-parameter list, e.g. every expert's last epoch) that classify it correctly, as DATM does;
    an image no expert gets right takes the average over all experts.
    """
    student = as_student(student_net)
    if not expert_params:
        raise ValueError("expert_params must hold at least one expert's parameters")
    outputs = []
    for params in expert_params:
        flat = params if isinstance(params, Tensor) else student.flatten(list(params))
        outputs.append(student(image_syn, flat.to(image_syn.device, student.dtype)))
    logits = torch.stack(outputs)  # [experts, n, classes]
    correct = (logits.argmax(dim=2) == label_syn.to(logits.device)).to(logits.dtype)
    weights = torch.where(correct.sum(0, keepdim=True) > 0, correct, torch.ones_like(correct))
    return (weights.unsqueeze(2) * logits).sum(0) / weights.sum(0).unsqueeze(1)
