"""``"ssam"``: SAM with SATM's landscape smoothing switched on."""

from __future__ import annotations

from dataclasses import dataclass

from .base import check_nonnegative
from .sam import SAM


@dataclass(frozen=True)
class SmoothedSAM(SAM):
    r"""SAM whose ascent gradient is taken on a smoothed landscape (SATM, Eq. 7).

    The first closure call runs at ``phi + Delta``, with per-sample Gaussian noise
    ``Delta_j = gamma ||phi_j||_2 / sqrt(d_j) z`` (so ``E||Delta_j||^2 = gamma^2 ||phi_j||^2``);
    ``Delta`` is removed exactly before ``eps = rho g / (||g|| + xi)`` is applied. Smoothing is a
    modifier of the optimizer (``smooth=gamma`` composes with any rule); this rule only makes it
    the default.

    Args:
        rho: radius, > 0 (default 0.05).
        gamma: relative noise size, >= 0 (default 0.01).
        per_sample: one norm per sample instead of one for the whole set.
    """

    gamma: float = 0.01

    def validate(self) -> None:
        super().validate()
        check_nonnegative("gamma", self.gamma)

    @property
    def default_smooth(self) -> float:
        return self.gamma
