"""``"asam"``: Adaptive SAM (Kwon et al., ICML 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..reductions import XI, norm
from .base import PerturbationRule, RuleState, check_bool, check_nonnegative, check_positive


@dataclass(frozen=True)
class ASAM(PerturbationRule):
    r"""Scale-invariant SAM: the ball is taken in the coordinates ``T^{-1} \phi``.

    $$
    T = |\phi| + \eta, \qquad
    \epsilon = \rho \, \frac{T^2 g}{\lVert T g \rVert_2 + \xi}, \qquad d = g'
    $$

    ``eta = 0`` gives the widely copied davda54/sam variant. Unlike the official ASAM, which
    applies ``T`` only to tensors named "weight", ``T`` applies to every perturbed tensor: the
    synthetic images are the "weights" here. Keep ``eta > 0`` for images near zero, or ``T`` (and
    with it ``eps``) vanishes there.

    Args:
        rho: radius in the rescaled coordinates, > 0 (default 0.5).
        eta: offset of ``T``, >= 0 (default 0.01).
        per_sample: one norm per sample instead of one for the whole set.
        xi: the denominator's guard, >= 0 (default 1e-12; SamsungLabs' ASAM uses 1e-16).
        scaled: which perturbed tensors (their positions) get ``T``; the others get ``T = 1``,
            as the official ASAM gives tensors not named "weight". None (default): all.
    """

    rho: float = 0.5
    eta: float = 0.01
    per_sample: bool = False
    xi: float = XI
    scaled: tuple[int, ...] | None = None

    def validate(self) -> None:
        check_positive("rho", self.rho)
        check_nonnegative("eta", self.eta)
        check_bool("per_sample", self.per_sample)
        check_nonnegative("xi", self.xi)
        if self.scaled is not None and not (
            isinstance(self.scaled, tuple)
            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in self.scaled)
        ):
            raise ValueError(
                "scaled must be None or a tuple of tensor positions (ints >= 0), got "
                f"{self.scaled!r}"
            )

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        eps = adaptive_ascent(
            params, grads, self.rho, self.eta, self.per_sample, self.xi, self.scaled
        )
        return eps, state


def adaptive_ascent(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float,
    eta: float,
    per_sample: bool,
    xi: float = XI,
    scaled: tuple[int, ...] | None = None,
) -> list[Tensor]:
    """``rho T^2 g / (||T g||_2 + xi)`` with ``T = |phi| + eta`` (ASAM's ascent); tensors not in
    ``scaled`` (when given) get ``T = 1``."""
    scales = [
        p.abs() + eta if scaled is None or k in scaled else torch.ones_like(p)
        for k, p in enumerate(params)
    ]
    weighted = [t * g for t, g in zip(scales, grads, strict=True)]
    norms = norm(weighted, per_sample)
    return [rho * t * tg / (n + xi) for t, tg, n in zip(scales, weighted, norms, strict=True)]
