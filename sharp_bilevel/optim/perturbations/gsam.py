"""``"gsam"``: Surrogate Gap Guided SAM (Zhuang et al., ICLR 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..reductions import XI, dot
from .asam import adaptive_ascent
from .base import (
    PerturbationRule,
    RuleState,
    check_bool,
    check_interval,
    check_nonnegative,
    check_positive,
    is_number,
)
from .sam import scaled_direction


@dataclass(frozen=True)
class GSAM(PerturbationRule):
    r"""SAM's ascent, and a descent that also lowers the surrogate gap ``F(phi + eps) - F(phi)``.

    $$
    \epsilon = \rho_t \frac{g}{\lVert g \rVert_2 + \xi}, \qquad
    g_\perp = g - \frac{\langle g, g' \rangle}{\lVert g' \rVert_2^2 + \xi} g', \qquad
    d = g' - \alpha \, g_\perp
    $$

    With ``adaptive=True`` the ascent is ASAM's, ``eps = rho_t T^2 g / (||T g|| + xi)`` with
    ``T = |phi| + eta`` (FTD's expert script uses this form with ``eta = 0``).
    ``g_perp`` is the part of ``g`` orthogonal to ``g'``; moving against it lowers the gap without
    changing the perturbed loss to first order. With ``rho_min``, ``lr_min`` and ``lr_max`` set,
    ``rho`` follows the learning rate ``lr_t`` of the first perturbed group:
    ``rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)`` (``lr_t`` clipped
    to ``[lr_min, lr_max]``); otherwise ``rho_t = rho``.

    Args:
        rho: radius (``rho_max`` of the schedule), > 0 (default 0.05).
        alpha: weight of the orthogonal correction, in [0, 1] (default 0.4).
        rho_min: radius at ``lr_min``, in [0, rho] (schedule off when None).
        lr_min: learning rate mapped to ``rho_min``.
        lr_max: learning rate mapped to ``rho``, > ``lr_min``.
        per_sample: one norm/inner product per sample instead of one for the whole set.
        adaptive: ASAM's scale-invariant ascent instead of SAM's.
        eta: offset of ``T`` when ``adaptive``, >= 0 (default 0, as FTD).
        xi: the denominators' guard, >= 0 (default 1e-12).
    """

    rho: float = 0.05
    alpha: float = 0.4
    rho_min: float | None = None
    lr_min: float | None = None
    lr_max: float | None = None
    per_sample: bool = False
    adaptive: bool = False
    eta: float = 0.0
    xi: float = XI

    def validate(self) -> None:
        check_positive("rho", self.rho)
        check_interval("alpha", self.alpha, 0.0, 1.0)
        check_bool("per_sample", self.per_sample)
        check_bool("adaptive", self.adaptive)
        check_nonnegative("eta", self.eta)
        check_nonnegative("xi", self.xi)
        if self.rho_min is not None or self.lr_min is not None or self.lr_max is not None:
            if self.rho_min is None or self.lr_min is None or self.lr_max is None:
                raise ValueError(
                    "rho_min, lr_min and lr_max must be given together for GSAM's rho schedule, "
                    f"got rho_min={self.rho_min!r}, lr_min={self.lr_min!r}, lr_max={self.lr_max!r}"
                )
            check_interval("rho_min", self.rho_min, 0.0, self.rho)
            check_nonnegative("lr_min", self.lr_min)
            lr_max = self.lr_max
            if not (is_number(lr_max) and math.isfinite(lr_max) and lr_max > self.lr_min):
                raise ValueError(
                    f"lr_max must be > lr_min={self.lr_min!r} and finite, got {lr_max!r}"
                )

    def rho_at(self, lr: float) -> float:
        """The radius ``rho_t`` for the learning rate ``lr``."""
        if self.rho_min is None or self.lr_min is None or self.lr_max is None:
            return self.rho
        lr = min(max(lr, self.lr_min), self.lr_max)
        frac = (lr - self.lr_min) / (self.lr_max - self.lr_min)
        return self.rho_min + (self.rho - self.rho_min) * frac

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        rho = self.rho_at(lr)
        if self.adaptive:
            return adaptive_ascent(params, grads, rho, self.eta, self.per_sample, self.xi), state
        return scaled_direction(grads, rho, self.per_sample, self.xi), state

    def descent(
        self, grads: Sequence[Tensor], grads_adv: Sequence[Tensor], state: RuleState
    ) -> list[Tensor]:
        inner = dot(grads, grads_adv, self.per_sample)
        sq_norm = dot(grads_adv, grads_adv, self.per_sample)
        out = []
        for g, ga, ip, sq in zip(grads, grads_adv, inner, sq_norm, strict=True):
            g_perp = g - (ip / (sq + self.xi)) * ga
            out.append(ga - self.alpha * g_perp)
        return out
