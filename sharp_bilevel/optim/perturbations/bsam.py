"""``"bsam"``: Bayesian SAM (Möllenhoff & Khan, ICLR 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import (
    PerturbationRule,
    RuleState,
    check_interval,
    check_nonnegative,
    check_positive,
)


@dataclass(frozen=True)
class BayesianSAM(PerturbationRule):
    r"""SAM as a relaxation of Bayes: a noisy ascent gradient, a precision-scaled ascent and an
    Adam-like preconditioned descent (the paper's Algorithm 1).

    With $s$ the per-element precision (state, $s_0 =$ ``s_init``) and $m$ the momentum
    (state, $m_0 = 0$), the first pass is evaluated at a sample of the posterior:

    $$
    g = \nabla F(\phi + \Delta), \quad \Delta \sim N\!\left(0, \tfrac{1}{N s}\right), \qquad
    \epsilon = \rho \frac{g}{s}, \qquad g' = \nabla F(\phi + \epsilon),
    $$

    $$
    m \leftarrow \beta_1 m + (1 - \beta_1)(g' + \delta \phi), \quad
    s \leftarrow \beta_2 s + (1 - \beta_2)\left(\sqrt{s}\, \lvert g \rvert + \delta
    + \gamma\right), \quad d = \frac{m}{s}
    $$

    (elementwise). The base optimizer then takes $\phi \leftarrow \phi - \alpha d$: pair the rule
    with ``torch.optim.SGD`` without momentum or weight decay to run the paper's method (the
    momentum and the prior are the rule's). Unlike SAM, $\epsilon$ is not normalised: its size
    is $\rho \lvert g \rvert / s$. The noise is drawn from the optimizer's seeded generator, so a
    seed replays it and a sharded set gets the same draws as one process.

    Args:
        rho: ascent scale, > 0 (default 0.05).
        num_data: the effective sample size $N$ of the noise, > 0 (default 1e4: a noise standard
            deviation $1/\sqrt{N s_0} = 0.01$ per element at the start, the size of SATM's
            smoothing on unit-scale images).
        beta1: the momentum's decay, in [0, 1) (default 0.9).
        beta2: the precision's decay, in [0, 1) (default 0.999).
        delta: the prior precision $\delta$ (the paper's weight decay), >= 0 (default 0).
        damping: $\gamma$, > 0 (default 0.1); keeps $s$ away from 0.
        s_init: the initial precision $s_0$, > 0 (default 1).
    """

    draws_noise: ClassVar[bool] = True

    rho: float = 0.05
    num_data: float = 1e4
    beta1: float = 0.9
    beta2: float = 0.999
    delta: float = 0.0
    damping: float = 0.1
    s_init: float = 1.0

    def validate(self) -> None:
        check_positive("rho", self.rho)
        check_positive("num_data", self.num_data)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check_interval(name, value, 0.0, 1.0)
            if value == 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        check_nonnegative("delta", self.delta)
        check_positive("damping", self.damping)
        check_positive("s_init", self.s_init)

    def init(self, params: Sequence[Tensor]) -> RuleState:
        return {
            "s": [torch.full_like(p, self.s_init) for p in params],
            "m": [torch.zeros_like(p) for p in params],
        }

    def first_pass_noise(
        self, params: Sequence[Tensor], z: Sequence[Tensor], state: RuleState
    ) -> list[Tensor]:
        """$\\Delta = z / \\sqrt{N s}$ from standard normal draws ``z``."""
        scale = 1.0 / math.sqrt(self.num_data)
        return [scale * zi * s.rsqrt() for zi, s in zip(z, state["s"], strict=True)]

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        eps = [self.rho * g / s for g, s in zip(grads, state["s"], strict=True)]
        pending = {**state}
        if self.delta:
            pending["prior"] = [self.delta * p for p in params]
        return eps, pending

    def _moments(
        self, grads: Sequence[Tensor], grads_adv: Sequence[Tensor], state: RuleState
    ) -> tuple[list[Tensor], list[Tensor]]:
        b1, b2 = self.beta1, self.beta2
        prior = state.get("prior")
        pulls = (
            list(grads_adv)
            if prior is None
            else [a + p for a, p in zip(grads_adv, prior, strict=True)]
        )
        m = [b1 * mi + (1 - b1) * u for mi, u in zip(state["m"], pulls, strict=True)]
        shift = self.delta + self.damping
        s = [
            b2 * si + (1 - b2) * (si.sqrt() * g.abs() + shift)
            for si, g in zip(state["s"], grads, strict=True)
        ]
        return m, s

    def descent(
        self, grads: Sequence[Tensor], grads_adv: Sequence[Tensor], state: RuleState
    ) -> list[Tensor]:
        m, s = self._moments(grads, grads_adv, state)
        return [mi / si for mi, si in zip(m, s, strict=True)]

    def after_descent(
        self, grads: Sequence[Tensor], grads_adv: Sequence[Tensor], state: RuleState
    ) -> RuleState:
        m, s = self._moments(grads, grads_adv, state)
        return {**{k: v for k, v in state.items() if k != "prior"}, "m": m, "s": s}
