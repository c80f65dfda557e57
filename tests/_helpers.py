"""Shared test helpers: a closed-form objective and hand-written float64 references.

Everything here is written independently of ``sharp_bilevel``'s internals: the objective's
gradient is a closed form, and the rules, the smoothing noise and the base optimizers are plain
loops over lists of tensors written from DESIGN.md sections 3 to 5.

The objective, with ``P`` the perturbed tensors, ``Q`` the unperturbed ones and
``s = sum_j sum(q_j)``, ``S = sum_i ||p_i - c_i||^2``, ``T = sum_i sum(sin p_i)``:

    F(P, Q) = 0.5 (1 + s^2) S + s T
    dF/dp_i = (1 + s^2)(p_i - c_i) + s cos(p_i)
    dF/dq_j = (s S + T) * ones
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

XI = 1e-12
TWO_PASS_RULES = (
    "sam",
    "asam",
    "gsam",
    "vasso",
    "ssam",
    "wsam",
    "fsam",
    "looksam",
    "bsam",
    "gcsam",
)
ALL_RULES = ("none", *TWO_PASS_RULES)


# ---------------------------------------------------------------------- the objective
class Objective:
    """``F(P, Q)`` above, with fixed targets ``c_i`` (one per perturbed tensor)."""

    def __init__(self, targets: Sequence[Tensor]) -> None:
        self.targets = [t.detach().clone() for t in targets]

    def loss(self, P: Sequence[Tensor], Q: Sequence[Tensor]) -> Tensor:
        """Differentiable loss (used by the closures under test)."""
        s = sum((q.sum() for q in Q), torch.zeros((), dtype=P[0].dtype))
        big_s = sum(((p - c.to(p.dtype)) ** 2).sum() for p, c in zip(P, self.targets, strict=True))
        big_t = sum(torch.sin(p).sum() for p in P)
        return 0.5 * (1 + s**2) * big_s + s * big_t

    def grads(self, P: Sequence[Tensor], Q: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Closed-form gradient, in float64 (the reference)."""
        P = [p.detach().to(torch.float64) for p in P]
        Q = [q.detach().to(torch.float64) for q in Q]
        c = [t.to(torch.float64) for t in self.targets]
        s = sum(float(q.sum()) for q in Q)
        big_s = sum(float(((p - ci) ** 2).sum()) for p, ci in zip(P, c, strict=True))
        big_t = sum(float(torch.sin(p).sum()) for p in P)
        gp = [(1 + s**2) * (p - ci) + s * torch.cos(p) for p, ci in zip(P, c, strict=True)]
        gq = [(s * big_s + big_t) * torch.ones_like(q) for q in Q]
        return gp, gq


def backward_closure(
    objective: Objective,
    P: Sequence[Tensor],
    Q: Sequence[Tensor],
    seen: list[dict[str, Any]] | None = None,
) -> Callable[..., Tensor]:
    """A one-argument closure that calls ``backward()`` and records what each call saw."""

    def closure(ctx: Any) -> Tensor:
        loss = objective.loss(P, Q)
        loss.backward()
        if seen is not None:
            seen.append(
                {
                    "phase": ctx.phase,
                    "P": [p.detach().clone() for p in P],
                    "Q": [q.detach().clone() for q in Q],
                    "gP": [p.grad.detach().clone() for p in P],
                    "gQ": [q.grad.detach().clone() for q in Q],
                    "loss": loss.detach().clone(),
                }
            )
        return loss

    return closure


# ---------------------------------------------------------------------- reference maths
def set_norm(ts: Sequence[Tensor]) -> Tensor:
    """``||v||_2`` over a whole list of tensors, float64."""
    return torch.sqrt(sum((t.to(torch.float64) ** 2).sum() for t in ts))


def scaled(ts: Sequence[Tensor], rho: float) -> list[Tensor]:
    n = set_norm(ts)
    return [rho * t / (n + XI) for t in ts]


def ref_centralized(ts: Sequence[Tensor]) -> list[Tensor]:
    """Each row (leading index) of every tensor of more than one dimension minus its mean."""
    out = []
    for t in ts:
        if t.dim() <= 1:
            out.append(t)
            continue
        rows = t.reshape(t.shape[0], -1)
        out.append((rows - rows.sum(dim=1, keepdim=True) / rows.shape[1]).reshape(t.shape))
    return out


def ref_noise(
    params: Sequence[Tensor],
    gamma: float,
    generator: torch.Generator,
    z_dtypes: Sequence[torch.dtype] | None = None,
) -> list[Tensor]:
    """``Delta_j = gamma ||phi_j|| / sqrt(d_j) z`` per sample (leading dim), float64.

    ``z`` is drawn with one ``randn`` per tensor, in order, in ``z_dtypes`` (default: each
    tensor's own dtype), as DESIGN.md section 5 and the library's seeded generator prescribe.
    """
    out = []
    for k, p in enumerate(params):
        z_dtype = p.dtype if z_dtypes is None else z_dtypes[k]
        z = torch.randn(p.shape, generator=generator, dtype=z_dtype).to(torch.float64)
        x = p.detach().to(torch.float64)
        if x.dim() == 0:
            out.append(gamma * x.abs() * z)
            continue
        rows = x.reshape(x.shape[0], -1)
        d_j = rows.shape[1]
        norms = torch.sqrt((rows**2).sum(dim=1)).reshape((x.shape[0],) + (1,) * (x.dim() - 1))
        out.append(gamma * norms / math.sqrt(d_j) * z)
    return out


class RefRule:
    """Hand-written float64 versions of every built-in rule (DESIGN.md section 4)."""

    def __init__(self, name: str, *, centralize: bool = False, **hp: Any) -> None:
        self.name = name
        self.centralize = centralize or name == "gcsam"  # the rule sees gc(g) and gc(g')
        defaults: dict[str, dict[str, Any]] = {
            "none": {},
            "sam": {"rho": 0.05},
            "gcsam": {"rho": 0.05},
            "ssam": {"rho": 0.05, "gamma": 0.01},
            "asam": {"rho": 0.5, "eta": 0.01},
            "gsam": {"rho": 0.05, "alpha": 0.4, "rho_min": None, "lr_min": None, "lr_max": None},
            "vasso": {"rho": 0.05, "theta": 0.9},
            "wsam": {"rho": 0.05, "gamma": 0.9},
            "fsam": {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9},
            "looksam": {"rho": 0.05, "k": 5, "alpha": 0.7},
            "bsam": {
                "rho": 0.05,
                "num_data": 1e4,
                "beta1": 0.9,
                "beta2": 0.999,
                "delta": 0.0,
                "damping": 0.1,
                "s_init": 1.0,
            },
        }
        self.hp = {**defaults[name], **hp}
        self.d: list[Tensor] | None = None  # VaSSO's moving average
        self.t = 0  # LookSAM's step count
        self.gv: list[Tensor] | None = None  # LookSAM's orthogonal direction
        self.prec: list[Tensor] | None = None  # Bayesian SAM's precision s (None: s_init)
        self.mom: list[Tensor] | None = None  # Bayesian SAM's momentum m (None: 0)

    def noise(self, phi: Sequence[Tensor], z: Sequence[Tensor]) -> list[Tensor]:
        """Bayesian SAM's first-pass point offset ``z / sqrt(N s)``."""
        s = self.precision(phi)
        return [zi / torch.sqrt(self.hp["num_data"] * si) for zi, si in zip(z, s, strict=True)]

    def precision(self, phi: Sequence[Tensor]) -> list[Tensor]:
        if self.prec is None:
            return [torch.full_like(p, self.hp["s_init"]) for p in phi]
        return self.prec

    @property
    def two_pass(self) -> bool:
        return self.name != "none"

    def rho_t(self, lr: float) -> float:
        hp = self.hp
        if self.name != "gsam" or hp["rho_min"] is None:
            return hp["rho"]
        lr = min(max(lr, hp["lr_min"]), hp["lr_max"])
        frac = (lr - hp["lr_min"]) / (hp["lr_max"] - hp["lr_min"])
        return hp["rho_min"] + (hp["rho"] - hp["rho_min"]) * frac

    def ascent(self, phi: Sequence[Tensor], g: Sequence[Tensor], lr: float) -> list[Tensor]:
        """Returns eps and (for VaSSO) a pending state kept in ``self.pending_d``."""
        hp = self.hp
        self.pending_d = self.d
        if self.name in ("sam", "ssam", "gsam", "wsam", "looksam", "gcsam"):
            return scaled(g, self.rho_t(lr))
        if self.name == "bsam":  # eps = rho g / s, elementwise (not normalised)
            self.phi = [p.clone() for p in phi]
            return [hp["rho"] * gi / si for gi, si in zip(g, self.precision(phi), strict=True)]
        if self.name == "asam":
            t = [p.abs() + hp["eta"] for p in phi]
            tg = [ti * gi for ti, gi in zip(t, g, strict=True)]
            n = set_norm(tg)
            return [hp["rho"] * ti * ti * gi / (n + XI) for ti, gi in zip(t, g, strict=True)]
        if self.name == "fsam":  # u = g - sigma m (u = g at first), m <- lmbda m + (1-lmbda) g
            if self.d is None:
                u, m = list(g), [gi.clone() for gi in g]
            else:
                sg, lm = hp["sigma"], hp["lmbda"]
                u = [gi - sg * mi for gi, mi in zip(g, self.d, strict=True)]
                m = [lm * mi + (1 - lm) * gi for gi, mi in zip(g, self.d, strict=True)]
            self.pending_d = m
            return scaled(u, hp["rho"])
        if self.name == "vasso":
            if self.d is None:
                d = [gi.clone() for gi in g]
            else:
                th = hp["theta"]
                d = [(1 - th) * di + th * gi for di, gi in zip(self.d, g, strict=True)]
            self.pending_d = d
            return scaled(d, hp["rho"])
        raise AssertionError(self.name)

    def commit(self) -> None:
        self.d = self.pending_d
        self.t += 1
        if self.name == "bsam":
            self.mom, self.prec = self.pending_moments

    def full_step(self) -> bool:
        """False on LookSAM's steps between its k-steps (one pass)."""
        return self.name != "looksam" or self.t % self.hp["k"] == 0 or self.gv is None

    def after_descent(self, g: Sequence[Tensor], ga: Sequence[Tensor]) -> None:
        if self.name == "looksam":  # g_v = g' - (<g, g'> / ||g||^2) g
            ip = sum((a * b).sum() for a, b in zip(g, ga, strict=True))
            sq = sum((a * a).sum() for a in g)
            self.gv = [b - ip / (sq + XI) * a for a, b in zip(g, ga, strict=True)]

    def reuse(self, g: Sequence[Tensor]) -> list[Tensor]:
        """LookSAM's one-pass direction ``g + alpha ||g|| / ||g_v|| g_v``."""
        assert self.gv is not None
        self.pending_d = self.d
        scale = self.hp["alpha"] * set_norm(g) / (set_norm(self.gv) + XI)
        return [a + scale * v for a, v in zip(g, self.gv, strict=True)]

    def descent(self, g: Sequence[Tensor], ga: Sequence[Tensor]) -> list[Tensor]:
        if self.name == "bsam":
            # m <- b1 m + (1-b1)(g' + delta phi); s <- b2 s + (1-b2)(sqrt(s)|g| + delta + gamma)
            hp, s = self.hp, self.precision(self.phi)
            b1, b2, dl = hp["beta1"], hp["beta2"], hp["delta"]
            m = self.mom or [torch.zeros_like(p) for p in self.phi]
            m = [
                b1 * mi + (1 - b1) * (a + dl * p) for mi, a, p in zip(m, ga, self.phi, strict=True)
            ]
            s = [
                b2 * si + (1 - b2) * (torch.sqrt(si) * gi.abs() + dl + hp["damping"])
                for si, gi in zip(s, g, strict=True)
            ]
            self.pending_moments = (m, s)
            return [mi / si for mi, si in zip(m, s, strict=True)]
        if self.name == "wsam":  # d = g + gamma / (1 - gamma) (g' - g)
            a = self.hp["gamma"] / (1 - self.hp["gamma"])
            return [x + a * (y - x) for x, y in zip(g, ga, strict=True)]
        if self.name != "gsam":
            return list(ga)
        ip = sum((a * b).sum() for a, b in zip(g, ga, strict=True))
        sq = sum((b * b).sum() for b in ga)
        alpha = self.hp["alpha"]
        return [b - alpha * (a - ip / (sq + XI) * b) for a, b in zip(g, ga, strict=True)]


class RefHeavyBall:
    """torch.optim.SGD semantics (dampening 0, no nesterov): ``buf = m buf + g`` (first: ``g``)."""

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buf: dict[int, Tensor] = {}

    def step(self, params: list[Tensor], grads: Sequence[Tensor]) -> None:
        for k, (p, g) in enumerate(zip(params, grads, strict=True)):
            g = g + self.weight_decay * p if self.weight_decay else g
            if self.momentum:
                self.buf[k] = g.clone() if k not in self.buf else self.momentum * self.buf[k] + g
                g = self.buf[k]
            params[k] = p - self.lr * g


def reference_run(
    rule: RefRule,
    objective: Objective,
    P0: Sequence[Tensor],
    Q0: Sequence[Tensor],
    steps: int,
    *,
    lr: float,
    momentum: float = 0.0,
    smooth: float = 0.0,
    seed: int = 0,
) -> list[tuple[list[Tensor], list[Tensor]]]:
    """Parameters after each step of the full algorithm of DESIGN.md section 3, in float64.

    The noise ``z`` is drawn in the dtypes of ``P0`` (as the library does), everything else in
    float64.
    """
    generator = torch.Generator().manual_seed(seed)
    z_dtypes = [p.dtype for p in P0]
    P = [p.detach().to(torch.float64) for p in P0]
    Q = [q.detach().to(torch.float64) for q in Q0]
    n_p = len(P)
    base = RefHeavyBall(lr, momentum)
    out = []
    for _ in range(steps):
        noise = ref_noise(P, smooth, generator, z_dtypes) if smooth > 0 else None
        if rule.name == "bsam":  # its own draws follow the smoothing draws
            z = [
                torch.randn(p.shape, generator=generator, dtype=t)
                for p, t in zip(P, z_dtypes, strict=True)
            ]
            own = rule.noise(P, [zi.to(torch.float64) for zi in z])
            noise = own if noise is None else [a + b for a, b in zip(noise, own, strict=True)]
        if noise is not None:
            g, gq = objective.grads([p + n for p, n in zip(P, noise, strict=True)], Q)
        else:
            g, gq = objective.grads(P, Q)
        if rule.centralize:
            g = ref_centralized(g)
        if rule.two_pass and rule.full_step():
            eps = rule.ascent(P, g, lr)
            ga, gq = objective.grads([p + e for p, e in zip(P, eps, strict=True)], Q)
            if rule.centralize:
                ga = ref_centralized(ga)
            d = rule.descent(g, ga)
            rule.after_descent(g, ga)
            rule.commit()
        elif rule.two_pass:
            d = rule.reuse(g)
            rule.commit()
        else:
            d = g
        params = P + Q
        base.step(params, list(d) + list(gq))
        P, Q = params[:n_p], params[n_p:]
        out.append(([p.clone() for p in P], [q.clone() for q in Q]))
    return out


# ---------------------------------------------------------------------- small utilities
def clones(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().clone() for t in ts]


def all_equal(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    """Bit-for-bit equality of two lists of tensors (dtype included)."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True)
    )


def nested_equal(a: Any, b: Any) -> bool:
    """Recursive bit-exact equality of state dicts (tensors by ``torch.equal``)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(nested_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return (
            isinstance(b, list | tuple)
            and len(a) == len(b)
            and all(nested_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b)
