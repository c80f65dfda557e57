"""``"looksam"``: LookSAM (Liu et al., CVPR 2022): SAM's second pass every ``k`` steps only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..reductions import XI, dot, norm
from .base import (
    PerturbationRule,
    RuleState,
    check_bool,
    check_int_at_least,
    check_nonnegative,
    check_positive,
)
from .sam import scaled_direction


@dataclass(frozen=True)
class LookSAM(PerturbationRule):
    r"""SAM every ``k`` steps; in between, one pass and the last SAM step's sharpness direction.

    On steps $t \equiv 0 \pmod k$ (the first included) it is SAM, and it keeps the part of
    $g'$ orthogonal to $g$:

    $$
    \epsilon = \rho \frac{g}{\lVert g \rVert_2 + \xi}, \qquad d = g', \qquad
    g_v = g' - \frac{\langle g, g' \rangle}{\lVert g \rVert_2^2 + \xi} g .
    $$

    On the other steps the objective is evaluated once, at $\phi$, and

    $$
    d = g + \alpha \frac{\lVert g \rVert_2}{\lVert g_v \rVert_2 + \xi} g_v ,
    $$

    so ``k - 1`` of every ``k`` steps cost one pass (one unroll in trajectory matching). The
    state holds the step count and $g_v$, saved in ``state_dict``.

    Args:
        rho: radius of the SAM steps, > 0 (default 0.05).
        k: a SAM step every ``k`` steps, an int >= 1 (default 5; 1 is SAM).
        alpha: weight of the reused direction, >= 0 (default 0.7).
        per_sample: norms and inner products per sample instead of over the whole set.
        xi: the denominators' guard, >= 0 (default 1e-12).
    """

    rho: float = 0.05
    k: int = 5
    alpha: float = 0.7
    per_sample: bool = False
    xi: float = XI

    def validate(self) -> None:
        check_positive("rho", self.rho)
        check_int_at_least("k", self.k, 1)
        check_nonnegative("alpha", self.alpha)
        check_bool("per_sample", self.per_sample)
        check_nonnegative("xi", self.xi)

    def init(self, params: Sequence[Tensor]) -> RuleState:
        return {"step": 0}

    def wants_second_pass(self, state: RuleState) -> bool:
        return int(state.get("step", 0)) % self.k == 0 or "gv" not in state

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        eps = scaled_direction(grads, self.rho, self.per_sample, self.xi)
        return eps, {**state, "step": int(state.get("step", 0)) + 1}

    def after_descent(
        self, grads: Sequence[Tensor], grads_adv: Sequence[Tensor], state: RuleState
    ) -> RuleState:
        inner = dot(grads, grads_adv, self.per_sample)
        sq = dot(grads, grads, self.per_sample)
        gv = [
            ga - (ip / (s + self.xi)) * g
            for g, ga, ip, s in zip(grads, grads_adv, inner, sq, strict=True)
        ]
        return {**state, "gv": gv}

    def reuse(self, grads: Sequence[Tensor], state: RuleState) -> tuple[list[Tensor], RuleState]:
        gv = state["gv"]
        g_norm = norm(grads, self.per_sample)
        v_norm = norm(gv, self.per_sample)
        direction = [
            g + self.alpha * (gn / (vn + self.xi)) * v
            for g, v, gn, vn in zip(grads, gv, g_norm, v_norm, strict=True)
        ]
        return direction, {**state, "step": int(state.get("step", 0)) + 1}
