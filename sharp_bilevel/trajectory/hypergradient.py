"""Settings of the hypergradient shortcuts (TUH, TR, lr learning) and the first-order lr formula."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_LR_GRADIENTS = ("exact", "first_order")


@dataclass(frozen=True)
class UnrollSettings:
    """How the trajectory-matching objective differentiates its unroll.

    Args:
        keep: TUH: inner steps to back-propagate through, as a count (``int`` in ``[1, N]``) or
            a fraction of ``N`` (``float`` in ``(0, 1]``; ``floor(N * keep)``, at least 1). None
            keeps all (exact BPTT, MTT). ``iota = N - keep_steps``.
        reuse: TR: False (off), True (``tau = iota``) or the step ``tau`` (``iota <= tau < N``)
            where the second (perturbed) pass restarts from the first pass's ``w_tau``.
        lr_gradient: ``"exact"`` (BPTT through the kept steps) or ``"first_order"`` (SATM Eq. 10:
            ``<dL/dw_N, sum_i u_i>`` with the inner directions detached).

    Examples:
        >>> UnrollSettings.satm().resolve(20)
        (14, 14)
        >>> UnrollSettings().resolve(20)
        (0, None)
    """

    keep: int | float | None = None
    reuse: bool | int = False
    lr_gradient: str = "exact"

    def __post_init__(self) -> None:
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int | float):
                raise ValueError(
                    f"keep must be an int, a float in (0, 1] or None, got {self.keep!r}"
                )
            if isinstance(self.keep, int) and self.keep < 1:
                raise ValueError(f"keep as a step count must be >= 1, got {self.keep}")
            if isinstance(self.keep, float) and not 0.0 < self.keep <= 1.0:
                raise ValueError(f"keep as a fraction must be in (0, 1], got {self.keep}")
        if not isinstance(self.reuse, bool | int):
            raise ValueError(f"reuse must be True, False or a step index, got {self.reuse!r}")
        if self.lr_gradient not in _LR_GRADIENTS:
            raise ValueError(
                f"lr_gradient must be one of {_LR_GRADIENTS}, got {self.lr_gradient!r}"
            )

    @classmethod
    def satm(cls, keep: int | float = 1.0 / 3.0) -> UnrollSettings:
        """SATM's defaults: keep ``N/3`` steps, reuse from ``tau = iota``, first-order lr."""
        return cls(keep=keep, reuse=True, lr_gradient="first_order")

    def keep_steps(self, num_steps: int) -> int:
        """Number of steps the hypergradient flows through."""
        if self.keep is None:
            return num_steps
        if isinstance(self.keep, float):
            return max(1, math.floor(num_steps * self.keep + 1e-9))
        if self.keep > num_steps:
            raise ValueError(f"keep={self.keep} exceeds the number of inner steps {num_steps}")
        return self.keep

    def resolve(self, num_steps: int) -> tuple[int, int | None]:
        """``(iota, tau)`` for ``N = num_steps``; ``tau`` is None when TR is off."""
        iota = num_steps - self.keep_steps(num_steps)
        if self.reuse is False:
            return iota, None
        tau = iota if self.reuse is True else int(self.reuse)
        if not iota <= tau < num_steps:
            raise ValueError(
                f"reuse step tau must be in [iota={iota}, N={num_steps}), got {tau} "
                "(the restart must lie in the part that keeps its graph)"
            )
        return iota, tau


def first_order_lr_grad(grad_final: Tensor, direction_sum: Tensor) -> Tensor:
    r"""SATM Eq. 10, the first-order lr gradient (``u_i = -g_i`` for SGD):

    $$
    \frac{\partial L}{\partial \alpha} \approx
    \Big\langle \frac{\partial L}{\partial w_N}, \sum_{i<N} u_i \Big\rangle .
    $$

    It is the exact derivative of ``L(w_0 + alpha sum_i u_i)`` with the directions ``u_i`` held
    constant: the terms through which ``alpha`` changes later gradients are dropped.
    """
    return torch.dot(grad_final.reshape(-1), direction_sum.reshape(-1).to(grad_final.dtype))
