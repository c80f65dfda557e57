"""``"sam"``: Sharpness-Aware Minimization (Foret et al., ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..reductions import XI, norm
from .base import PerturbationRule, RuleState, check_bool, check_nonnegative, check_positive


@dataclass(frozen=True)
class SAM(PerturbationRule):
    r"""SAM's first-order worst-case perturbation inside an L2 ball of radius ``rho``.

    $$
    \epsilon = \rho \frac{g}{\lVert g \rVert_2 + \xi}, \qquad d = g' = \nabla F(\phi + \epsilon)
    $$

    with the norm over all perturbed tensors (or per sample when ``per_sample=True``: the leading
    dimension of each tensor indexes samples).

    Args:
        rho: ball radius, > 0 (default 0.05).
        per_sample: one norm per sample instead of one for the whole set.
        xi: the denominator's guard $\xi$, >= 0 (default 1e-12; match a reference with its
            own: davda54/sam and SamsungLabs' ASAM 1e-12 and 1e-16, VaSSO's code 1e-7).
    """

    rho: float = 0.05
    per_sample: bool = False
    xi: float = XI

    def validate(self) -> None:
        check_positive("rho", self.rho)
        check_bool("per_sample", self.per_sample)
        check_nonnegative("xi", self.xi)

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        return scaled_direction(grads, self.rho, self.per_sample, self.xi), state


def scaled_direction(
    direction: Sequence[Tensor], rho: float, per_sample: bool, xi: float = XI
) -> list[Tensor]:
    """``rho * v / (||v||_2 + xi)``: a step of length ``rho`` along ``v`` (zero if ``v = 0``)."""
    norms = norm(direction, per_sample)
    return [rho * v / (n + xi) for v, n in zip(direction, norms, strict=True)]
