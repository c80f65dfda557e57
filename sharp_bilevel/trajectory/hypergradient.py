"""Settings of the hypergradient shortcuts (TUH, TR, lr learning) and the first-order lr formula."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_LR_GRADIENTS = ("exact", "first_order")
_HYPERGRADIENTS = ("bptt", "tesla", "checkpointed")


@dataclass(frozen=True)
class UnrollSettings:
    """How the trajectory-matching objective differentiates its unroll.

    Args:
        keep: TUH: inner steps to back-propagate through, as a count (``int`` in ``[1, N]``) or
            a fraction of ``N`` (``float`` in ``(0, 1]``; ``floor(N * keep)``, at least 1). None
            keeps all (exact BPTT, MTT). ``iota = N - keep_steps``. A pair of ints
            ``(low, high)`` draws the count per outer step, uniformly in ``[low, high]``
            (a random truncation window, RaT-BPTT style): the objective draws it from its step
            plan's generator, once, so both passes of a step and a TR restart use the same.
        reuse: TR: False (off), True (``tau = iota``) or the step ``tau`` (``iota <= tau < N``)
            where the second (perturbed) pass restarts from the first pass's ``w_tau``.
        lr_gradient: ``"exact"`` (BPTT through the kept steps) or ``"first_order"`` (SATM Eq. 10:
            ``<dL/dw_N, sum_i u_i>`` with the inner directions detached).
        hypergradient: ``"bptt"`` (back-propagation through the kept steps) or ``"tesla"``
            (TESLA's constant-memory form, `sharp_bilevel.trajectory.tesla`: each kept step's
            direct term only, one step's graph at a time; needs ``lr_gradient="first_order"``
            and plain SGD inside) or ``"checkpointed"`` (exact BPTT in sub-linear memory,
            `sharp_bilevel.trajectory.checkpointed`: weights kept at segment starts only, each
            segment's graph recomputed in the backward pass; plain SGD inside).
        segment: steps per segment of the checkpointed unroll (None: ``ceil(sqrt(kept))``).

    Examples:
        >>> UnrollSettings.satm().resolve(20)
        (14, 14)
        >>> UnrollSettings().resolve(20)
        (0, None)
    """

    keep: int | float | tuple[int, int] | None = None
    reuse: bool | int = False
    lr_gradient: str = "exact"
    hypergradient: str = "bptt"
    segment: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.keep, tuple | list):
            window = tuple(self.keep)
            ints = all(isinstance(k, int) and not isinstance(k, bool) for k in window)
            if not (len(window) == 2 and ints and 1 <= window[0] <= window[1]):
                raise ValueError(
                    f"keep as a window must be a pair of ints (low, high) with 1 <= low <= high, "
                    f"got {self.keep!r}"
                )
            object.__setattr__(self, "keep", window)
        elif self.keep is not None:
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
        if self.hypergradient not in _HYPERGRADIENTS:
            raise ValueError(
                f"hypergradient must be one of {_HYPERGRADIENTS}, got {self.hypergradient!r}"
            )
        if self.segment is not None and (
            isinstance(self.segment, bool) or not isinstance(self.segment, int) or self.segment < 1
        ):
            raise ValueError(f"segment must be an int >= 1 or None, got {self.segment!r}")
        if self.segment is not None and self.hypergradient != "checkpointed":
            raise ValueError("segment is a setting of hypergradient='checkpointed'")
        if self.hypergradient == "tesla" and self.lr_gradient != "first_order":
            raise ValueError(
                "hypergradient='tesla' gives the lr gradient in first order only: pass "
                "lr_gradient='first_order' (UnrollSettings.tesla() does)"
            )

    @classmethod
    def satm(cls, keep: int | float = 1.0 / 3.0) -> UnrollSettings:
        """SATM's defaults: keep ``N/3`` steps, reuse from ``tau = iota``, first-order lr."""
        return cls(keep=keep, reuse=True, lr_gradient="first_order")

    @property
    def random_window(self) -> bool:
        """Whether ``keep`` is a ``(low, high)`` window drawn per outer step."""
        return isinstance(self.keep, tuple)

    @classmethod
    def tesla(cls, keep: int | float | tuple[int, int] | None = None) -> UnrollSettings:
        """TESLA's hypergradient (all steps by default) with the first-order lr gradient."""
        return cls(keep=keep, lr_gradient="first_order", hypergradient="tesla")

    def keep_steps(self, num_steps: int, draw: float | None = None) -> int:
        """Number of steps the hypergradient flows through (``draw``, uniform in [0, 1), picks
        it from a ``(low, high)`` window: ``low + floor(draw (high - low + 1))``)."""
        if self.keep is None:
            return num_steps
        if isinstance(self.keep, tuple):
            low, high = self.keep
            if high > num_steps:
                raise ValueError(f"keep={self.keep} exceeds the number of inner steps {num_steps}")
            if draw is None:
                raise ValueError("keep is a (low, high) window: pass the step's draw in [0, 1)")
            return min(high, low + math.floor(draw * (high - low + 1)))
        if isinstance(self.keep, float):
            return max(1, math.floor(num_steps * self.keep + 1e-9))
        if self.keep > num_steps:
            raise ValueError(f"keep={self.keep} exceeds the number of inner steps {num_steps}")
        return self.keep

    def resolve(self, num_steps: int, draw: float | None = None) -> tuple[int, int | None]:
        """``(iota, tau)`` for ``N = num_steps``; ``tau`` is None when TR is off (``draw`` as
        in `keep_steps`)."""
        iota = num_steps - self.keep_steps(num_steps, draw)
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
