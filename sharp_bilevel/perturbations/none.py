"""``"none"``: no perturbation, the base optimizer alone (the MTT baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import PerturbationRule, RuleState


@dataclass(frozen=True)
class NoPerturbation(PerturbationRule):
    """Plain optimisation: one closure call, ``d = g``, then the base optimizer steps.

    Running the baseline through the same class keeps logging, the non-finite policy, gates and
    checkpoints identical between the MTT baseline and the sharpness-aware runs.
    """

    two_pass: ClassVar[bool] = False

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        return [torch.zeros_like(p) for p in params], state
