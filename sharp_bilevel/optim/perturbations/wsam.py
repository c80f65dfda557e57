"""``"wsam"``: Weighted SAM (Yue et al., KDD 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..reductions import XI
from .asam import adaptive_ascent
from .base import (
    PerturbationRule,
    RuleState,
    check_bool,
    check_nonnegative,
    check_positive,
    is_number,
)
from .sam import scaled_direction


@dataclass(frozen=True)
class WSAM(PerturbationRule):
    r"""SAM's ascent, and a descent on the loss plus a weighted sharpness term.

    WSAM minimises $F(\phi) + \frac{\gamma}{1 - \gamma} \big(F(\phi + \epsilon) - F(\phi)\big)$,
    whose gradient at SAM's $\epsilon$ is

    $$
    \epsilon = \rho \frac{g}{\lVert g \rVert_2 + \xi}, \qquad
    d = g + \frac{\gamma}{1 - \gamma} (g' - g) .
    $$

    $\gamma = 0$ is plain descent on $g$; $\gamma = 1/2$ is SAM ($d = g'$). ``adaptive=True``
    takes ASAM's ascent with $T = \lvert \phi \rvert + \eta$. This is the coupled form
    (pytorch_optimizer's ``WSAM(decouple=False)``); the decoupled form, which applies the
    sharpness term after the base step, differs once the base optimizer has momentum.

    Args:
        rho: radius, > 0 (default 0.05).
        gamma: sharpness weight, in [0, 1) (default 0.9: $d = 9 g' - 8 g$).
        adaptive: ASAM's scale-invariant ascent instead of SAM's.
        eta: offset of ``T`` when ``adaptive``, >= 0 (default 0).
        per_sample: one norm per sample instead of one for the whole set.
        xi: the denominator's guard, >= 0 (default 1e-12).
    """

    rho: float = 0.05
    gamma: float = 0.9
    adaptive: bool = False
    eta: float = 0.0
    per_sample: bool = False
    xi: float = XI

    def validate(self) -> None:
        check_positive("rho", self.rho)
        if not (is_number(self.gamma) and math.isfinite(self.gamma) and 0 <= self.gamma < 1):
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma!r}")
        check_bool("adaptive", self.adaptive)
        check_nonnegative("eta", self.eta)
        check_bool("per_sample", self.per_sample)
        check_nonnegative("xi", self.xi)

    @property
    def weight(self) -> float:
        """$\\alpha = \\gamma / (1 - \\gamma)$, the sharpness term's weight."""
        return self.gamma / (1.0 - self.gamma)

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        if self.adaptive:
            eps = adaptive_ascent(params, grads, self.rho, self.eta, self.per_sample, self.xi)
        else:
            eps = scaled_direction(grads, self.rho, self.per_sample, self.xi)
        return eps, state

    def descent(
        self, grads: Sequence[Tensor], grads_adv: Sequence[Tensor], state: RuleState
    ) -> list[Tensor]:
        alpha = self.weight
        return [g + alpha * (ga - g) for g, ga in zip(grads, grads_adv, strict=True)]
