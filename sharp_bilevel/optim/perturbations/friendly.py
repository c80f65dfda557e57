"""``"fsam"``: Friendly SAM (Li et al., CVPR 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..reductions import XI
from .asam import adaptive_ascent
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
class FriendlySAM(PerturbationRule):
    r"""SAM whose ascent drops the full-gradient component, estimated by a moving average.

    $$
    u_t = g_t - \sigma m_{t-1}, \qquad m_t = \lambda m_{t-1} + (1 - \lambda) g_t, \qquad
    \epsilon = \rho \frac{u_t}{\lVert u_t \rVert_2 + \xi}, \qquad d = g'
    $$

    with $m_1 = g_1$ and $u_1 = g_1$ (the first step is SAM's). The average $m$ is the rule's
    state (one tensor per perturbed parameter), saved in ``state_dict``. ``adaptive=True`` takes
    ASAM's scaling of $u$ with $T = \lvert \phi \rvert + \eta$.

    Args:
        rho: radius, > 0 (default 0.05).
        sigma: weight of the subtracted average, >= 0 (default 1; 0 is SAM).
        lmbda: the average's decay, in [0, 1] (default 0.9).
        adaptive: ASAM's scale-invariant ascent.
        eta: offset of ``T`` when ``adaptive``, >= 0 (default 0).
        per_sample: one norm per sample instead of one for the whole set.
        xi: the denominator's guard, >= 0 (default 1e-12).
    """

    rho: float = 0.05
    sigma: float = 1.0
    lmbda: float = 0.9
    adaptive: bool = False
    eta: float = 0.0
    per_sample: bool = False
    xi: float = XI

    def validate(self) -> None:
        check_positive("rho", self.rho)
        check_nonnegative("sigma", self.sigma)
        check_interval("lmbda", self.lmbda, 0.0, 1.0)
        check_bool("adaptive", self.adaptive)
        check_nonnegative("eta", self.eta)
        check_bool("per_sample", self.per_sample)
        check_nonnegative("xi", self.xi)

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        previous = state.get("m")
        if previous is None:
            direction = [g.detach() for g in grads]
            average = [g.detach().clone() for g in grads]
        else:
            direction = [g - self.sigma * m for g, m in zip(grads, previous, strict=True)]
            average = [
                self.lmbda * m + (1 - self.lmbda) * g for g, m in zip(grads, previous, strict=True)
            ]
        if self.adaptive:
            eps = adaptive_ascent(params, direction, self.rho, self.eta, self.per_sample, self.xi)
        else:
            eps = scaled_direction(direction, self.rho, self.per_sample, self.xi)
        return eps, {**state, "m": average}
