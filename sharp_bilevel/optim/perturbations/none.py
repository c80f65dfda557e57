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
    checkpoints identical between the MTT baseline and the sharpness-aware runs. A ``rho`` given
    by name (``perturbation="none", rho=0.05``, as a sweep over rules does) is ignored with a
    ``UserWarning``; ``rho=None`` is ignored silently.
    """

    two_pass: ClassVar[bool] = False
    ignored_hyperparameters: ClassVar[frozenset[str]] = frozenset({"rho"})

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        return [torch.zeros_like(p) for p in params], state
