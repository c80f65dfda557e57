"""``"gcsam"``: gradient-centralised SAM (Hassan et al., 2025)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..reductions import centralized
from .base import RuleState
from .sam import SAM, scaled_direction


@dataclass(frozen=True)
class GCSAM(SAM):
    r"""SAM on centralised gradients, in the ascent and in the descent.

    $$
    \epsilon = \rho \frac{\operatorname{gc}(g)}{\lVert \operatorname{gc}(g) \rVert_2 + \xi},
    \qquad d = \operatorname{gc}(g')
    $$

    with $\operatorname{gc}$ removing each sample's mean
    (`sharp_bilevel.optim.reductions.centralized`; for synthetic images: the gradient's mean
    over each image's pixels and channels). Any other rule gets the same ascent input from
    ``SharpBilevelOptimizer(..., centralize=True)``.

    Args:
        rho: ball radius, > 0 (default 0.05).
        per_sample: one norm per sample instead of one for the whole set.
        xi: the denominator's guard, >= 0 (default 1e-12).
    """

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        return scaled_direction(centralized(grads), self.rho, self.per_sample, self.xi), state

    def descent(
        self, grads: Sequence[Tensor], grads_adv: Sequence[Tensor], state: RuleState
    ) -> list[Tensor]:
        return centralized(grads_adv)
