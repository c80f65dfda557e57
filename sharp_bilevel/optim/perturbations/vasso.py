"""``"vasso"``: Variational Stochastic Sharpness Optimization (Li & Giannakis, NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..reductions import XI
from .base import (
    PerturbationRule,
    RuleState,
    check_bool,
    check_interval,
    check_nonnegative,
    check_positive,
)
from .sam import scaled_direction


@dataclass(frozen=True)
class VaSSO(PerturbationRule):
    r"""SAM along a moving average of gradients, which stabilises the adversary.

    $$
    d_t = (1 - \theta) d_{t-1} + \theta g_t \;(d_1 = g_1), \qquad
    \epsilon = \rho \frac{d_t}{\lVert d_t \rVert_2 + \xi}, \qquad \text{descent } g'
    $$

    The state holds ``d`` (one tensor per perturbed parameter) and is saved in ``state_dict``.

    Args:
        rho: radius, > 0 (default 0.05).
        theta: averaging weight of the new gradient, in (0, 1] (default 0.9, the upstream
            script's value; ``theta = 1`` is SAM).
        per_sample: one norm per sample instead of one for the whole set.
        xi: the denominator's guard, >= 0 (default 1e-12; VaSSO's code uses 1e-7).
    """

    rho: float = 0.05
    theta: float = 0.9
    per_sample: bool = False
    xi: float = XI

    def validate(self) -> None:
        check_positive("rho", self.rho)
        check_interval("theta", self.theta, 0.0, 1.0, low_open=True)
        check_bool("per_sample", self.per_sample)
        check_nonnegative("xi", self.xi)

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        previous = state.get("d")
        if previous is None:
            avg = [g.detach().clone() for g in grads]
        else:
            avg = [
                (1 - self.theta) * d + self.theta * g for d, g in zip(previous, grads, strict=True)
            ]
        return scaled_direction(avg, self.rho, self.per_sample, self.xi), {**state, "d": avg}
