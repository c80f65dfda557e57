"""Perturbation rules, their registry and how the optimizer routes to them.

Every numerical check compares against a reference written here from the formulas of DESIGN.md
section 4 (float64, plain torch ops over flattened concatenations or explicit per-sample loops);
no library helper (``reductions``, ``scaled_direction``, ``smoothing_noise``) is used to build an
expected value.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

import sharp_bilevel
from sharp_bilevel import (
    ASAM,
    GSAM,
    SAM,
    NoPerturbation,
    PerturbationRule,
    SharpBilevelOptimizer,
    SmoothedSAM,
    VaSSO,
    available_perturbations,
    get_perturbation,
    register_perturbation,
)
from sharp_bilevel.optim.perturbations import registry

XI = 1e-12
F64 = torch.float64
SHAPES: list[tuple[int, ...]] = [(5, 3, 4, 4), (7,), ()]
SEEDS = [0, 1, 2]
TOL = {"rtol": 1e-12, "atol": 1e-14}
BUILTINS = {
    "none": NoPerturbation,
    "sam": SAM,
    "asam": ASAM,
    "gsam": GSAM,
    "vasso": VaSSO,
    "ssam": SmoothedSAM,
}
_unique = itertools.count()


# ---------------------------------------------------------------------- test helpers
def unique_name(prefix: str = "test_rule") -> str:
    return f"{prefix}_{next(_unique)}"


def make_params(seed: int, shapes: Sequence[tuple[int, ...]] = SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1000 + seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in shapes]


def random_like(tensors: Sequence[Tensor], seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(5000 + seed)
    return [torch.randn(t.shape, generator=gen, dtype=F64) for t in tensors]


def clones(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().clone() for t in tensors]


def assert_all_close(actual: Sequence[Tensor], expected: Sequence[Tensor], **tol: float) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, **(tol or TOL))


def assert_all_equal(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e), (a, e)


class Objective:
    """A non-quadratic objective with an analytic gradient.

    ``F(phi) = sum_k sum(c_k phi_k^3 / 3 + a_k sin(phi_k)) + x^T Q x / 2 + b^T x`` with
    ``x`` the flattened concatenation of all tensors and ``Q`` a random symmetric matrix, so
    gradients couple the tensors and differ between ``phi`` and ``phi + eps``.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], seed: int) -> None:
        gen = torch.Generator().manual_seed(9000 + seed)
        self.shapes = [tuple(s) for s in shapes]
        self.c = [0.1 + 0.5 * torch.rand(s, generator=gen, dtype=F64) for s in shapes]
        self.a = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
        n = sum(math.prod(s) for s in shapes)
        m = torch.randn(n, n, generator=gen, dtype=F64) / math.sqrt(n)
        self.q = (m + m.T) / 2
        self.b = torch.randn(n, generator=gen, dtype=F64)
        self.calls: list[list[Tensor]] = []

    def value(self, tensors: Sequence[Tensor]) -> Tensor:
        x = torch.cat([t.reshape(-1) for t in tensors])
        out = 0.5 * (x @ (self.q @ x)) + self.b @ x
        for t, c, a in zip(tensors, self.c, self.a, strict=True):
            out = out + (c * t**3 / 3 + a * torch.sin(t)).sum()
        return out

    def grad(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The analytic gradient (the reference; the closure uses autograd)."""
        x = torch.cat([t.detach().reshape(-1) for t in tensors])
        linear = unflat(self.q @ x + self.b, tensors)
        return [
            c * t.detach() ** 2 + a * torch.cos(t.detach()) + lin
            for t, c, a, lin in zip(tensors, self.c, self.a, linear, strict=True)
        ]

    def closure(self, params: Sequence[Tensor]) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            self.calls.append(clones(params))
            loss = self.value(params)
            loss.backward()
            return loss

        return closure


def zero_grad_closure(params: Sequence[Tensor], calls: list[list[Tensor]]) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        calls.append(clones(params))
        loss = sum((p * 0).sum() for p in params) + 3.0
        loss.backward()
        return loss

    return closure


# ---------------------------------------------------------------------- reference maths
def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like:
        out.append(vector[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    assert start == vector.numel()
    return out


def l2(v: Tensor) -> Tensor:
    return torch.sqrt((v * v).sum())


def in_scope(fn: Callable[..., Tensor], per_sample: bool, *lists: Sequence[Tensor]) -> list[Tensor]:
    """Apply a function of aligned 1-d vectors over the whole set or sample by sample.

    Whole set: ``fn`` sees the flattened concatenation of every tensor. Per sample: ``fn`` sees
    one row (leading index) of one tensor at a time; a 0-d tensor is a single sample.
    """
    if not per_sample:
        return unflat(fn(*[flat(lst) for lst in lists]), lists[0])
    out = []
    for aligned in zip(*lists, strict=True):
        shape = aligned[0].shape
        rows = [t.reshape(1, -1) if t.dim() == 0 else t.reshape(t.shape[0], -1) for t in aligned]
        result = [fn(*[r[i] for r in rows]) for i in range(rows[0].shape[0])]
        out.append(torch.stack(result).reshape(shape))
    return out


def ref_sam_eps(grads: Sequence[Tensor], rho: float, per_sample: bool) -> list[Tensor]:
    return in_scope(lambda g: rho * g / (l2(g) + XI), per_sample, grads)


def ref_asam_eps(
    params: Sequence[Tensor], grads: Sequence[Tensor], rho: float, eta: float, per_sample: bool
) -> list[Tensor]:
    def row(phi: Tensor, g: Tensor) -> Tensor:
        t = phi.abs() + eta
        return rho * t * t * g / (l2(t * g) + XI)

    return in_scope(row, per_sample, params, grads)


def ref_gsam_descent(
    grads: Sequence[Tensor], grads_adv: Sequence[Tensor], alpha: float, per_sample: bool
) -> list[Tensor]:
    def row(g: Tensor, ga: Tensor) -> Tensor:
        g_perp = g - ((g * ga).sum() / ((ga * ga).sum() + XI)) * ga
        return ga - alpha * g_perp

    return in_scope(row, per_sample, grads, grads_adv)


def ref_vasso_average(
    previous: Sequence[Tensor] | None, grads: Sequence[Tensor], theta: float
) -> list[Tensor]:
    if previous is None:
        return [g.clone() for g in grads]
    return [(1 - theta) * d + theta * g for d, g in zip(previous, grads, strict=True)]


def add(a: Sequence[Tensor], b: Sequence[Tensor], scale: float = 1.0) -> list[Tensor]:
    return [x + scale * y for x, y in zip(a, b, strict=True)]


@dataclass
class RefStep:
    """One reference step: what each closure call sees and the parameters after the step."""

    eps: list[Tensor]
    after: list[Tensor]
    state: dict[str, Any]


def reference_step(
    name: str,
    hyper: dict[str, Any],
    phi: list[Tensor],
    objective: Objective,
    lr: float,
    state: dict[str, Any],
) -> RefStep:
    per_sample = hyper.get("per_sample", False)
    g = objective.grad(phi)
    new_state = dict(state)
    if name == "none":
        return RefStep([torch.zeros_like(p) for p in phi], add(phi, g, -lr), new_state)
    if name in ("sam", "gsam"):
        eps = ref_sam_eps(g, hyper["rho"], per_sample)
    elif name == "asam":
        eps = ref_asam_eps(phi, g, hyper["rho"], hyper["eta"], per_sample)
    elif name == "vasso":
        d = ref_vasso_average(state.get("d"), g, hyper["theta"])
        new_state["d"] = d
        eps = ref_sam_eps(d, hyper["rho"], per_sample)
    else:
        raise AssertionError(name)
    g_adv = objective.grad(add(phi, eps))
    direction = ref_gsam_descent(g, g_adv, hyper["alpha"], per_sample) if name == "gsam" else g_adv
    return RefStep(eps, add(phi, direction, -lr), new_state)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture
def clean_registry():
    """Snapshot the registry dicts and restore them in place, whatever the test registered."""
    factories = dict(registry._FACTORIES)
    aliases = dict(registry._ALIASES)
    yield
    registry._FACTORIES.clear()
    registry._FACTORIES.update(factories)
    registry._ALIASES.clear()
    registry._ALIASES.update(aliases)


# ====================================================================== 1. single steps
STEP_CASES = [
    ("sam", {"rho": 0.07}),
    ("sam", {"rho": 0.3}),
    ("asam", {"rho": 0.5, "eta": 0.01}),
    ("asam", {"rho": 0.2, "eta": 0.0}),
    ("gsam", {"rho": 0.1, "alpha": 0.4}),
    ("gsam", {"rho": 0.25, "alpha": 1.0}),
    ("vasso", {"rho": 0.1, "theta": 0.9}),
    ("vasso", {"rho": 0.2, "theta": 0.3}),
]
STEP_PARAMS = [
    *[(n, {**h, "per_sample": ps}) for n, h in STEP_CASES for ps in (False, True)],
    ("none", {}),  # no per_sample hyperparameter
]


@pytest.mark.parametrize(("name", "hyper"), STEP_PARAMS, ids=lambda v: str(v))
@pytest.mark.parametrize("seed", SEEDS)
def test_one_step_matches_reference(name, hyper, seed):
    params = make_params(seed)
    objective = Objective(SHAPES, seed)
    lr = 0.05
    phi = clones(params)
    opt = SharpBilevelOptimizer(
        params, base_optimizer=torch.optim.SGD, perturbation=name, lr=lr, **hyper
    )
    loss = opt.step(objective.closure(params))

    ref = reference_step(name, hyper, phi, objective, lr, {})
    # the first call sees phi exactly and its loss is returned
    assert_all_equal(objective.calls[0], phi)
    torch.testing.assert_close(loss.detach(), objective.value(phi).detach(), **TOL)
    if name == "none":
        assert len(objective.calls) == 1
    else:
        assert len(objective.calls) == 2
        assert_all_close(objective.calls[1], add(phi, ref.eps))
        # the perturbation actually moved the second evaluation point
        assert not all(torch.equal(a, b) for a, b in zip(objective.calls[1], phi, strict=True))
    assert_all_close([p.detach() for p in params], ref.after)


@pytest.mark.parametrize("per_sample", [False, True], ids=["whole", "per_sample"])
@pytest.mark.parametrize("theta", [0.9, 0.35, 1.0])
@pytest.mark.parametrize("seed", SEEDS)
def test_vasso_several_steps_match_reference(theta, per_sample, seed):
    rho, lr = 0.15, 0.03
    params = make_params(seed)
    objective = Objective(SHAPES, seed)
    opt = SharpBilevelOptimizer(
        params, perturbation="vasso", rho=rho, theta=theta, per_sample=per_sample, lr=lr
    )
    hyper = {"rho": rho, "theta": theta, "per_sample": per_sample}
    phi, state = clones(params), {}
    for _ in range(4):
        objective.calls.clear()
        opt.step(objective.closure(params))
        ref = reference_step("vasso", hyper, phi, objective, lr, state)
        assert_all_close(objective.calls[1], add(phi, ref.eps))
        assert_all_close([p.detach() for p in params], ref.after)
        saved_d = opt.state_dict()["sharp_bilevel"]["rule_state"]["d"]
        assert_all_close(saved_d, ref.state["d"])
        phi, state = [p.detach().clone() for p in params], ref.state


@pytest.mark.parametrize("seed", SEEDS)
def test_vasso_theta_one_is_sam(seed):
    """theta = 1 forgets the average: every step must equal SAM's from the same point."""
    params_v, params_s = make_params(seed), make_params(seed)
    obj_v, obj_s = Objective(SHAPES, seed), Objective(SHAPES, seed)
    opt_v = SharpBilevelOptimizer(params_v, perturbation="vasso", rho=0.1, theta=1.0, lr=0.04)
    opt_s = SharpBilevelOptimizer(params_s, perturbation="sam", rho=0.1, lr=0.04)
    for _ in range(3):
        opt_v.step(obj_v.closure(params_v))
        opt_s.step(obj_s.closure(params_s))
    assert_all_close([p.detach() for p in params_v], [p.detach() for p in params_s])


@pytest.mark.parametrize("seed", SEEDS)
def test_ssam_step_removes_noise_before_the_ascent(seed):
    """The first call runs at phi + Delta; eps is added to phi itself, not to phi + Delta."""
    rho, gamma, lr = 0.1, 0.05, 0.02
    params = make_params(seed)
    objective = Objective(SHAPES, seed)
    phi = clones(params)
    opt = SharpBilevelOptimizer(params, perturbation="ssam", rho=rho, gamma=gamma, lr=lr, seed=seed)
    assert opt.smooth == gamma
    opt.step(objective.closure(params))
    noisy = objective.calls[0]
    delta = add(noisy, phi, -1.0)
    assert all(not torch.equal(d, torch.zeros_like(d)) for d in delta)
    g = objective.grad(noisy)
    eps = ref_sam_eps(g, rho, False)
    assert_all_close(objective.calls[1], add(phi, eps))
    assert_all_close([p.detach() for p in params], add(phi, objective.grad(add(phi, eps)), -lr))


@pytest.mark.parametrize("seed", SEEDS)
def test_none_calls_the_closure_once_and_steps_on_g(seed):
    params = make_params(seed)
    objective = Objective(SHAPES, seed)
    phi = clones(params)
    opt = SharpBilevelOptimizer(params, perturbation="none", lr=0.1)
    opt.step(objective.closure(params))
    assert len(objective.calls) == 1
    assert_all_close([p.detach() for p in params], add(phi, objective.grad(phi), -0.1))


# ---------------------------------------------------------------------- the rule objects
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_rule_objects_ascent_and_descent(per_sample, seed):
    params = [p.detach() for p in make_params(seed)]
    grads = random_like(params, seed)
    grads_adv = random_like(params, seed + 100)
    params_before, grads_before = clones(params), clones(grads)
    lr = 0.3

    eps, state = SAM(rho=0.2, per_sample=per_sample).ascent(params, grads, {}, lr)
    assert state == {}
    assert_all_close(eps, ref_sam_eps(grads, 0.2, per_sample))

    for eta in (0.01, 0.0, 0.7):
        eps, state = ASAM(rho=0.4, eta=eta, per_sample=per_sample).ascent(params, grads, {}, lr)
        assert state == {}
        assert_all_close(eps, ref_asam_eps(params, grads, 0.4, eta, per_sample))

    gsam = GSAM(rho=0.3, alpha=0.6, per_sample=per_sample)
    eps, state = gsam.ascent(params, grads, {}, lr)
    assert state == {}
    assert_all_close(eps, ref_sam_eps(grads, 0.3, per_sample))
    assert_all_close(
        gsam.descent(grads, grads_adv, {}), ref_gsam_descent(grads, grads_adv, 0.6, per_sample)
    )

    for rule in (SAM(), ASAM(), VaSSO(), SmoothedSAM()):
        assert_all_equal(rule.descent(grads, grads_adv, {}), grads_adv)

    vasso = VaSSO(rho=0.2, theta=0.3, per_sample=per_sample)
    state0 = vasso.init(params)
    eps1, state1 = vasso.ascent(params, grads, state0, lr)
    assert_all_close(state1["d"], grads)
    assert_all_close(eps1, ref_sam_eps(grads, 0.2, per_sample))
    d1 = clones(state1["d"])
    eps2, state2 = vasso.ascent(params, grads_adv, state1, lr)
    d2 = ref_vasso_average(d1, grads_adv, 0.3)
    assert_all_close(state2["d"], d2)
    assert_all_close(eps2, ref_sam_eps(d2, 0.2, per_sample))
    # pure: the input state is not modified (the optimizer commits state only on a taken step)
    assert "d" not in state0
    assert_all_equal(state1["d"], d1)

    eps, _ = NoPerturbation().ascent(params, grads, {}, lr)
    assert_all_equal(eps, [torch.zeros_like(p) for p in params])

    # no rule mutates its inputs
    assert_all_equal(params, params_before)
    assert_all_equal(grads, grads_before)


def test_gsam_descent_removes_the_orthogonal_part():
    """Independent property: alpha = 1 leaves d = g' - g_perp, whose part orthogonal to g' is
    the negative of g's (so <d - g', g'> = 0 and d + g_perp = g')."""
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(4, 3, generator=gen, dtype=F64), torch.randn((), generator=gen, dtype=F64)]
    ga = [torch.randn(4, 3, generator=gen, dtype=F64), torch.randn((), generator=gen, dtype=F64)]
    d = GSAM(alpha=1.0).descent(g, ga, {})
    correction = flat(d) - flat(ga)
    scale = float(l2(flat(g)) * l2(flat(ga)))
    assert abs(float((correction * flat(ga)).sum())) <= 1e-13 * scale
    assert_all_equal(GSAM(alpha=0.0).descent(g, ga, {}), ga)


# ====================================================================== 2. per sample
@pytest.mark.parametrize("seed", SEEDS)
def test_per_sample_norms_are_per_leading_index(seed):
    params = [p.detach() for p in make_params(seed)]
    grads = random_like(params, seed)
    grads[0][2].zero_()  # a zero sample stays at zero
    rho = 0.3
    eps, _ = SAM(rho=rho, per_sample=True).ascent(params, grads, {}, 0.1)
    # each non-zero sample has its own length rho; a 0-d tensor is one sample
    for t, e in zip(grads, eps, strict=True):
        if t.dim() == 0:
            torch.testing.assert_close(e, rho * t / (t.abs() + XI), **TOL)
            continue
        for i in range(t.shape[0]):
            if torch.count_nonzero(t[i]) == 0:
                assert torch.equal(e[i], torch.zeros_like(e[i]))
            else:
                n = l2(t[i])
                torch.testing.assert_close(l2(e[i]), rho * n / (n + XI), **TOL)
                torch.testing.assert_close(e[i], rho * t[i] / (n + XI), **TOL)
    # rows are independent: rescaling one sample leaves every other sample's eps unchanged
    scaled = clones(grads)
    scaled[0][1] *= 1000.0
    scaled[1][4] *= 1e-3
    eps_scaled, _ = SAM(rho=rho, per_sample=True).ascent(params, scaled, {}, 0.1)
    for k, (e, es) in enumerate(zip(eps, eps_scaled, strict=True)):
        if e.dim() == 0:
            assert torch.equal(e, es)
            continue
        for i in range(e.shape[0]):
            if (k, i) in ((0, 1), (1, 4)):
                row = scaled[k][i]
                torch.testing.assert_close(es[i], rho * row / (l2(row) + XI), **TOL)
            else:
                assert torch.equal(es[i], e[i])
    # whole-set scope: a single norm over everything
    eps_all, _ = SAM(rho=rho).ascent(params, grads, {}, 0.1)
    n = l2(flat(grads))
    torch.testing.assert_close(l2(flat(eps_all)), rho * n / (n + XI), **TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_per_sample_asam_and_gsam_reference_loops(seed):
    """Explicit per-row loops, written without the in_scope helper."""
    params = [p.detach() for p in make_params(seed)]
    grads = random_like(params, seed)
    grads_adv = random_like(params, seed + 7)
    rho, eta, alpha = 0.4, 0.02, 0.3
    eps, _ = ASAM(rho=rho, eta=eta, per_sample=True).ascent(params, grads, {}, 0.1)
    d = GSAM(alpha=alpha, per_sample=True).descent(grads, grads_adv, {})
    for phi, g, ga, e, dd in zip(params, grads, grads_adv, eps, d, strict=True):
        samples = [()] if phi.dim() == 0 else [(i,) for i in range(phi.shape[0])]
        for idx in samples:
            t = phi[idx].abs() + eta
            expected = rho * t**2 * g[idx] / (math.sqrt(float(((t * g[idx]) ** 2).sum())) + XI)
            torch.testing.assert_close(e[idx], expected, **TOL)
            coef = float((g[idx] * ga[idx]).sum()) / (float((ga[idx] ** 2).sum()) + XI)
            expected_d = ga[idx] - alpha * (g[idx] - coef * ga[idx])
            torch.testing.assert_close(dd[idx], expected_d, **TOL)


# ====================================================================== 3. GSAM's schedule
@pytest.mark.parametrize(
    ("rho", "rho_min", "lr_min", "lr_max"),
    [(0.1, 0.01, 0.0, 0.5), (0.05, 0.05, 0.1, 0.2), (2.0, 0.0, 1e-4, 3.0), (0.3, 0.2, 0.5, 0.6)],
)
def test_gsam_rho_at_follows_the_linear_schedule(rho, rho_min, lr_min, lr_max):
    rule = GSAM(rho=rho, rho_min=rho_min, lr_min=lr_min, lr_max=lr_max)
    gen = torch.Generator().manual_seed(11)
    lrs = [lr_min, lr_max, *(lr_min + (lr_max - lr_min) * torch.rand(5, generator=gen)).tolist()]
    for lr in lrs:
        expected = rho_min + (rho - rho_min) * (lr - lr_min) / (lr_max - lr_min)
        assert rule.rho_at(lr) == pytest.approx(expected, rel=1e-13, abs=1e-15)
    assert rule.rho_at(lr_min) == pytest.approx(rho_min, abs=1e-15)
    assert rule.rho_at(lr_max) == pytest.approx(rho, rel=1e-14)
    # documented in GSAM's docstring: lr is clipped to [lr_min, lr_max]
    assert rule.rho_at(lr_max * 10 + 1) == pytest.approx(rho, rel=1e-14)
    assert rule.rho_at(lr_min - 1.0) == pytest.approx(rho_min, abs=1e-15)
    # without a schedule rho is constant
    assert GSAM(rho=rho).rho_at(lr_max * 0.5) == rho


@pytest.mark.parametrize("seed", SEEDS)
def test_gsam_optimizer_uses_the_current_lr_of_the_first_perturbed_group(seed):
    rho, rho_min, lr_min, lr_max, alpha = 0.2, 0.02, 0.0, 0.1, 0.4
    params = make_params(seed)
    extra = torch.nn.Parameter(torch.randn(3, dtype=F64))  # not perturbed, its lr is ignored
    objective = Objective(SHAPES, seed)
    groups = [
        {"params": [extra], "perturb": False, "lr": 0.9},
        {"params": params[:2], "lr": lr_max},
        {"params": params[2:], "lr": 0.01},
    ]
    opt = SharpBilevelOptimizer(
        groups,
        perturbation="gsam",
        rho=rho,
        alpha=alpha,
        rho_min=rho_min,
        lr_min=lr_min,
        lr_max=lr_max,
        lr=lr_max,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen_rhos = []
    for _ in range(4):
        lr_now = opt.param_groups[1]["lr"]
        rho_t = rho_min + (rho - rho_min) * (lr_now - lr_min) / (lr_max - lr_min)
        phi = clones(params)
        objective.calls.clear()

        def closure():
            objective.calls.append(clones(params))
            loss = objective.value(params) + (extra**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        g = objective.grad(phi)
        eps_seen = add(objective.calls[1], phi, -1.0)
        assert_all_close(eps_seen, ref_sam_eps(g, rho_t, False), rtol=1e-10, atol=1e-14)
        seen_rhos.append(float(l2(flat(eps_seen))))
        sched.step()
    # the radius halved towards rho_min with each scheduler step
    expected = [rho_min + (rho - rho_min) * 0.5**k for k in range(4)]
    assert seen_rhos == pytest.approx(expected, rel=1e-10)


# ====================================================================== 4. zero gradient
ZERO_RULES = [
    SAM(),
    SAM(per_sample=True),
    ASAM(),
    ASAM(eta=0.0),
    ASAM(per_sample=True),
    GSAM(),
    GSAM(rho=0.1, rho_min=0.01, lr_min=0.0, lr_max=1.0, per_sample=True),
    VaSSO(),
    VaSSO(per_sample=True),
    SmoothedSAM(),
    NoPerturbation(),
]


@pytest.mark.parametrize("rule", ZERO_RULES, ids=repr)
@pytest.mark.parametrize("zero_params", [False, True])
def test_zero_gradient_gives_zero_eps(rule, zero_params):
    params = [p.detach() for p in make_params(0)]
    if zero_params:
        params = [torch.zeros_like(p) for p in params]
    zeros = [torch.zeros_like(p) for p in params]
    eps, _ = rule.ascent(params, zeros, rule.init(params), 0.5)
    assert_all_equal(eps, zeros)
    d = rule.descent(zeros, zeros, {})
    assert all(torch.isfinite(t).all() for t in d)
    assert_all_equal(d, zeros)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_zero_gradient_through_the_optimizer(name):
    params = make_params(1)
    phi = clones(params)
    calls: list[list[Tensor]] = []
    opt = SharpBilevelOptimizer(params, perturbation=name, lr=0.1, smooth=0.0)
    loss = opt.step(zero_grad_closure(params, calls))
    assert float(loss.detach()) == 3.0
    assert all(torch.equal(c, p) for call in calls for c, p in zip(call, phi, strict=True))
    assert_all_equal([p.detach() for p in params], phi)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    assert opt.last_step is not None
    assert opt.last_step.grad_norm == 0.0


# ====================================================================== 5. validation
NAN, INF = float("nan"), float("inf")
RHO = r"rho must be a finite number > 0"
PER_SAMPLE = r"per_sample must be True or False"
TOGETHER = r"rho_min, lr_min and lr_max must be given together"
SCHED = {"rho": 0.1, "rho_min": 0.01, "lr_min": 0.0, "lr_max": 1.0}
BAD_HYPER = [
    *[(n, {"rho": v}, RHO) for n in ("sam", "asam", "gsam", "vasso", "ssam") for v in (0.0, -0.1)],
    *[(n, {"rho": NAN}, RHO) for n in ("sam", "asam", "gsam", "vasso", "ssam")],
    *[(n, {"rho": v}, RHO) for n in ("sam", "vasso") for v in (INF, -INF)],
    *[(n, {"per_sample": None}, PER_SAMPLE) for n in ("sam", "asam", "gsam", "vasso", "ssam")],
    ("sam", {"per_sample": "yes"}, PER_SAMPLE),
    ("asam", {"per_sample": 1}, PER_SAMPLE),
    ("asam", {"eta": -0.01}, r"eta must be a finite number >= 0"),
    ("asam", {"eta": NAN}, r"eta must be a finite number >= 0"),
    ("gsam", {"alpha": -0.1}, r"alpha must be in \[0(\.0)?, 1(\.0)?\]"),
    ("gsam", {"alpha": 1.5}, r"alpha must be in \[0(\.0)?, 1(\.0)?\]"),
    ("gsam", {"alpha": NAN}, r"alpha must be in \[0(\.0)?, 1(\.0)?\]"),
    ("vasso", {"theta": 0.0}, r"theta must be in \(0(\.0)?, 1(\.0)?\]"),
    ("vasso", {"theta": 1.01}, r"theta must be in \(0(\.0)?, 1(\.0)?\]"),
    ("vasso", {"theta": -0.5}, r"theta must be in \(0(\.0)?, 1(\.0)?\]"),
    ("ssam", {"gamma": -0.1}, r"gamma must be a finite number >= 0"),
    ("ssam", {"gamma": INF}, r"gamma must be a finite number >= 0"),
    ("gsam", {"rho_min": 0.01}, TOGETHER),
    ("gsam", {"lr_min": 0.0, "lr_max": 1.0}, TOGETHER),
    ("gsam", {"rho_min": 0.01, "lr_max": 1.0}, TOGETHER),
    ("gsam", {**SCHED, "lr_max": 0.0}, r"lr_max must be > lr_min"),
    ("gsam", {**SCHED, "lr_min": 0.5, "lr_max": 0.2}, r"lr_max must be > lr_min"),
    ("gsam", {**SCHED, "rho_min": 0.2}, r"rho_min must be in \[0(\.0)?, 0\.1\]"),
    ("gsam", {**SCHED, "rho_min": -0.01}, r"rho_min must be in \[0(\.0)?, 0\.1\]"),
    ("gsam", {**SCHED, "lr_min": -0.1}, r"lr_min must be a finite number >= 0"),
    # a schedule with an infinite lr_max is degenerate (rho_t == rho_min for every finite lr)
    ("gsam", {**SCHED, "lr_max": INF}, r"lr_max"),
]


@pytest.mark.parametrize(("name", "hyper", "match"), BAD_HYPER, ids=lambda v: repr(v))
def test_bad_hyperparameters_rejected_by_the_rule_class(name, hyper, match):
    with pytest.raises(ValueError, match=match):
        BUILTINS[name](**hyper)
    with pytest.raises(ValueError, match=match):
        get_perturbation(name, **hyper)


@pytest.mark.parametrize(("name", "hyper", "match"), BAD_HYPER, ids=lambda v: repr(v))
def test_bad_hyperparameters_rejected_by_the_optimizer(name, hyper, match):
    params = make_params(0)
    before = clones(params)
    with pytest.raises(ValueError, match=match):
        SharpBilevelOptimizer(params, perturbation=name, lr=0.1, **hyper)
    with pytest.raises(ValueError, match=match):
        SharpBilevelOptimizer(params, perturbation=name, lr=0.1, perturbation_kwargs=hyper)
    assert_all_equal([p.detach() for p in params], before)


@pytest.mark.parametrize(
    ("cls", "hyper"),
    [
        (GSAM, {"alpha": 0.0}),
        (GSAM, {"alpha": 1.0}),
        (GSAM, {**SCHED, "rho_min": 0.0}),
        (GSAM, {**SCHED, "rho_min": 0.1}),
        (VaSSO, {"theta": 1.0}),
        (VaSSO, {"theta": 1e-9}),
        (ASAM, {"eta": 0.0}),
        (SmoothedSAM, {"gamma": 0.0}),
        (SAM, {"rho": 1e-300}),
        (SAM, {"rho": 3}),
    ],
    ids=repr,
)
def test_boundary_hyperparameters_accepted(cls, hyper):
    rule = cls(**hyper)
    for key, value in hyper.items():
        assert getattr(rule, key) == value


def test_rules_are_frozen():
    rule = SAM(rho=0.1)
    with pytest.raises(AttributeError):
        rule.rho = -1.0  # type: ignore[misc]


# ====================================================================== 6. registry
def test_builtin_names_and_aliases():
    names = available_perturbations()
    assert names == sorted(names)
    assert set(BUILTINS) <= set(names)
    for alias in ("mtt", "plain", "smooth", "smoothed", "smoothed_sam"):
        assert alias not in names
    cases = {
        "SAM": SAM,
        " asam ": ASAM,
        "GSam": GSAM,
        "VASSO": VaSSO,
        "None": NoPerturbation,
        "ssam": SmoothedSAM,
        "smoothed": SmoothedSAM,
        "Smooth": SmoothedSAM,
        "smoothed_sam": SmoothedSAM,
        "mtt": NoPerturbation,
        " MTT": NoPerturbation,
        "plain": NoPerturbation,
    }
    for name, cls in cases.items():
        assert type(get_perturbation(name)) is cls, name
        params = make_params(0)
        opt = SharpBilevelOptimizer(params, perturbation=name, lr=0.1, smooth=0.0)
        assert type(opt.perturbation) is cls, name
    assert get_perturbation("Sam", rho=0.3) == SAM(rho=0.3)
    assert get_perturbation(" ASAM", eta=0.0, rho=1.0) == ASAM(rho=1.0, eta=0.0)


@pytest.mark.parametrize("bad", ["nosuchrule", "sam2", "s a m"])
def test_unknown_name_lists_the_known_ones(bad):
    with pytest.raises(ValueError, match="unknown perturbation") as info:
        get_perturbation(bad)
    for name in BUILTINS:
        assert repr(name) in str(info.value)
    assert bad in str(info.value)
    with pytest.raises(ValueError, match="unknown perturbation") as info:
        SharpBilevelOptimizer(make_params(0), perturbation=bad, lr=0.1)
    for name in BUILTINS:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_bad_name_types(bad):
    with pytest.raises((ValueError, TypeError)):
        get_perturbation(bad)


@pytest.mark.parametrize(
    ("name", "hyper", "unknown"),
    [("sam", {"eta": 0.1}, "eta"), ("none", {"eta": 0.1}, "eta"), ("vasso", {"alpha": 1}, "alpha")],
)
def test_unknown_hyperparameter_is_a_type_error_naming_it(name, hyper, unknown):
    with pytest.raises(TypeError, match=unknown):
        get_perturbation(name, **hyper)
    with pytest.raises(TypeError, match=unknown):
        SharpBilevelOptimizer(make_params(0), perturbation=name, perturbation_kwargs=hyper)


@dataclass(frozen=True)
class SignSAM(PerturbationRule):
    """A user rule: eps = rho * sign(g); d = g' + beta * g."""

    rho: float = 0.05
    beta: float = 0.0

    def validate(self) -> None:
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho!r}")

    def ascent(self, params, grads, state, lr):
        return [self.rho * g.sign() for g in grads], state

    def descent(self, grads, grads_adv, state):
        return [ga + self.beta * g for g, ga in zip(grads, grads_adv, strict=True)]


def test_register_as_a_call(clean_registry):
    name = unique_name("SignSam")
    returned = register_perturbation(name, SignSAM, aliases=(f"{name}_alias",))
    assert returned is SignSAM
    assert name.lower() in available_perturbations()
    assert f"{name}_alias".lower() not in available_perturbations()
    for key in (name, name.upper(), f" {name.lower()} ", f"{name}_ALIAS"):
        rule = get_perturbation(key, rho=0.2, beta=0.5)
        assert rule == SignSAM(rho=0.2, beta=0.5)


def test_register_as_a_decorator(clean_registry):
    name = unique_name()

    @register_perturbation(name, aliases=[f"{name}_x"])
    @dataclass(frozen=True)
    class Decorated(PerturbationRule):
        rho: float = 0.05

        def ascent(self, params, grads, state, lr):
            return [self.rho * g for g in grads], state

    assert isinstance(Decorated, type)  # the decorator returns the class itself
    assert type(get_perturbation(name)) is Decorated
    assert get_perturbation(f"{name}_X", rho=0.4).rho == 0.4


def test_register_a_factory_function(clean_registry):
    name = unique_name()

    def factory(rho: float = 0.1, factor: float = 2.0) -> PerturbationRule:
        return SAM(rho=rho * factor)

    register_perturbation(name, factory)
    rule = get_perturbation(name, factor=3.0)
    assert type(rule) is SAM
    assert rule.rho == pytest.approx(0.3, rel=1e-15)
    opt = SharpBilevelOptimizer(make_params(0), perturbation=name, factor=0.5, rho=0.4, lr=0.1)
    assert opt.perturbation == SAM(rho=0.2)
    assert opt.base_optimizer.defaults["lr"] == 0.1
    with pytest.raises(TypeError, match="nope"):
        get_perturbation(name, nope=1)


def test_factory_must_return_a_rule(clean_registry):
    name = unique_name()
    register_perturbation(name, lambda: "not a rule")
    with pytest.raises(TypeError, match="not a PerturbationRule"):
        get_perturbation(name)


def test_register_rejects_non_callables_and_instances(clean_registry):
    with pytest.raises(TypeError):
        register_perturbation(unique_name(), SAM())
    with pytest.raises(TypeError):
        register_perturbation(unique_name(), 42)
    with pytest.raises(ValueError, match="non-empty string"):
        register_perturbation("  ", SAM)


def test_duplicates_rejected_unless_overwrite(clean_registry):
    name = unique_name()
    register_perturbation(name, SignSAM, aliases=(f"{name}_a",))
    for taken in (name, name.upper(), f" {name} "):
        with pytest.raises(ValueError, match="already registered"):
            register_perturbation(taken, SAM)
    with pytest.raises(ValueError, match="already registered"):
        register_perturbation(unique_name(), SAM, aliases=(f"{name}_A",))
    with pytest.raises(ValueError, match="already registered"):
        register_perturbation("SAM", SignSAM)
    with pytest.raises(ValueError, match="already registered"):
        register_perturbation(unique_name(), SignSAM, aliases=("smooth",))
    # a refused registration changed nothing
    assert type(get_perturbation("sam")) is SAM
    assert type(get_perturbation("smooth")) is SmoothedSAM
    assert type(get_perturbation(name)) is SignSAM
    register_perturbation(name, ASAM, overwrite=True)
    assert type(get_perturbation(name)) is ASAM
    assert type(get_perturbation(f"{name}_a")) is ASAM


def test_alias_equal_to_its_own_name(clean_registry):
    """Registering a name with an alias that normalises to the same key must either be refused
    or leave the rule reachable; it must never make the name unresolvable."""
    name = unique_name()
    try:
        register_perturbation(name, SignSAM, aliases=(name.upper(),))
    except ValueError:
        return
    assert type(get_perturbation(name)) is SignSAM
    assert name in available_perturbations()


@pytest.mark.parametrize("seed", SEEDS)
def test_user_rule_through_the_optimizer_by_name(clean_registry, seed):
    name = unique_name("SignSAM")
    register_perturbation(name, SignSAM)
    params = make_params(seed)
    objective = Objective(SHAPES, seed)
    phi = clones(params)
    rho, beta, lr = 0.03, 0.25, 0.07
    opt = SharpBilevelOptimizer(
        params, perturbation=name.upper(), rho=rho, beta=beta, lr=lr, momentum=0.5
    )
    assert opt.perturbation == SignSAM(rho=rho, beta=beta)
    assert opt.base_optimizer.param_groups[0]["momentum"] == 0.5
    assert "beta" not in opt.base_optimizer.defaults
    opt.step(objective.closure(params))
    g = objective.grad(phi)
    eps = [rho * torch.sign(t) for t in g]
    g_adv = objective.grad(add(phi, eps))
    d = [ga + beta * gg for gg, ga in zip(g, g_adv, strict=True)]
    assert_all_close(objective.calls[1], add(phi, eps))
    # momentum buffer starts at d on the first step, so the update is phi - lr * d
    assert_all_close([p.detach() for p in params], add(phi, d, -lr))


# ====================================================================== 7. every rule's harness
@dataclass(frozen=True)
class SignMomentumSAM(PerturbationRule):
    """Stateful user rule for the harness: m <- beta m + (1 - beta) g; eps = rho * sign(m)."""

    rho: float = 0.05
    beta: float = 0.5

    def init(self, params):
        return {"m": [torch.zeros_like(p) for p in params], "count": 0}

    def ascent(self, params, grads, state, lr):
        m = [self.beta * mm + (1 - self.beta) * g for mm, g in zip(state["m"], grads, strict=True)]
        return [self.rho * mm.sign() for mm in m], {"m": m, "count": state["count"] + 1}


USER_RULE = "harness_user_rule"
# Every rule the library registers (found by the factory's module, so rules that other test
# modules may have registered do not leak in), plus a user rule registered by the fixture.
LIBRARY_RULES = sorted(
    name
    for name, factory in registry._FACTORIES.items()
    if getattr(factory, "__module__", "").startswith("sharp_bilevel.")
)
HARNESS_RULES = [*LIBRARY_RULES, USER_RULE]


def test_harness_covers_the_builtin_rules():
    assert set(BUILTINS) <= set(LIBRARY_RULES)


@pytest.fixture(params=HARNESS_RULES)
def rule_name(request, clean_registry):
    if request.param == USER_RULE:
        register_perturbation(USER_RULE, SignMomentumSAM)
    return request.param


def harness_closure(params: Sequence[Tensor], calls: list[list[Tensor]]):
    objective = Objective([tuple(p.shape) for p in params], 42)

    def closure():
        calls.append(clones(params))
        loss = objective.value(params)
        loss.backward()
        return loss

    return closure, objective


def test_harness_constructs_with_defaults(rule_name):
    rule = get_perturbation(rule_name)
    assert isinstance(rule, PerturbationRule)
    assert get_perturbation(rule_name.upper()) == rule
    opt = SharpBilevelOptimizer(make_params(0), perturbation=rule_name, lr=0.1)
    assert opt.perturbation == rule
    assert opt.smooth == rule.default_smooth
    assert rule.init([p.detach() for p in make_params(0)]) is not None


@pytest.mark.parametrize("seed", SEEDS)
def test_harness_step_finite_changed_and_restored(rule_name, seed):
    params = make_params(seed)
    phi = clones(params)
    calls: list[list[Tensor]] = []
    lr = 0.05
    opt = SharpBilevelOptimizer(params, perturbation=rule_name, lr=lr, seed=seed)
    closure, objective = harness_closure(params, calls)
    loss = opt.step(closure)

    two_pass = opt.perturbation.two_pass
    assert len(calls) == (2 if two_pass else 1)
    if opt.smooth > 0 or opt.perturbation.draws_noise:  # SATM smoothing, Bayesian SAM
        assert not all(torch.equal(c, p) for c, p in zip(calls[0], phi, strict=True))
    else:
        assert_all_equal(calls[0], phi)  # the ascent call sees phi exactly
        torch.testing.assert_close(loss.detach(), objective.value(phi).detach(), **TOL)
    if two_pass:
        assert not all(torch.equal(c, p) for c, p in zip(calls[1], phi, strict=True))
    after = [p.detach() for p in params]
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(after, phi, strict=True))
    # the result is the base optimizer's (SGD's) update of the saved phi with the written grad
    expected = [torch.add(s, p.grad, alpha=-lr) for s, p in zip(phi, params, strict=True)]
    assert_all_equal(after, expected)


def test_harness_zero_gradient_gives_zero_eps(rule_name):
    rule = get_perturbation(rule_name)
    params = [p.detach() for p in make_params(3)]
    zeros = [torch.zeros_like(p) for p in params]
    eps, _ = rule.ascent(params, zeros, rule.init(params), 0.1)
    assert_all_equal(eps, zeros)
    # through the optimizer: the second call runs at phi exactly, nothing moves, no NaN
    opt_params = make_params(3)
    phi = clones(opt_params)
    calls: list[list[Tensor]] = []
    opt = SharpBilevelOptimizer(opt_params, perturbation=rule_name, lr=0.1)
    opt.step(zero_grad_closure(opt_params, calls))
    assert_all_equal(calls[-1], phi)
    assert_all_equal([p.detach() for p in opt_params], phi)


def _run(opt, params, steps, calls):
    closure, _ = harness_closure(params, calls)
    for _ in range(steps):
        opt.step(closure)


def test_harness_state_survives_a_checkpoint(rule_name):
    def build(params, seed):
        return SharpBilevelOptimizer(
            params, perturbation=rule_name, lr=0.05, momentum=0.9, seed=seed
        )

    params_a = make_params(5)
    opt_a = build(params_a, seed=1)
    _run(opt_a, params_a, 2, [])

    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = build(params_b, seed=999)
    opt_b.load_state_dict(copy.deepcopy(saved))
    assert opt_b.steps_taken == opt_a.steps_taken == 2

    _run(opt_a, params_a, 2, [])
    _run(opt_b, params_b, 2, [])
    assert_all_equal([p.detach() for p in params_b], [p.detach() for p in params_a])
    # and the saved state round-trips: a second save equals the first one's rule state
    state_a = opt_a.state_dict()["sharp_bilevel"]["rule_state"]
    state_b = opt_b.state_dict()["sharp_bilevel"]["rule_state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        va, vb = state_a[key], state_b[key]
        if isinstance(va, list):
            assert_all_equal(vb, va)
        else:
            assert vb == va


def test_vasso_checkpoint_state_matters():
    """The harness checkpoint check can fail: without loading, VaSSO continues differently."""
    params_a = make_params(5)
    opt_a = SharpBilevelOptimizer(params_a, perturbation="vasso", theta=0.2, rho=0.3, lr=0.05)
    _run(opt_a, params_a, 2, [])
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    params_c = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = SharpBilevelOptimizer(params_b, perturbation="vasso", theta=0.2, rho=0.3, lr=0.05)
    opt_b.load_state_dict(opt_a.state_dict())
    opt_c = SharpBilevelOptimizer(params_c, perturbation="vasso", theta=0.2, rho=0.3, lr=0.05)
    for opt, params in ((opt_a, params_a), (opt_b, params_b), (opt_c, params_c)):
        _run(opt, params, 1, [])
    assert_all_equal([p.detach() for p in params_b], [p.detach() for p in params_a])
    assert not all(torch.equal(c, a) for c, a in zip(params_c, params_a, strict=True))


# ====================================================================== 8. kwarg routing
@pytest.mark.parametrize(
    ("name", "rule_kwargs", "expected"),
    [
        ("asam", {"eta": 0.2}, ASAM(eta=0.2)),
        (
            "asam",
            {"eta": 0.0, "rho": 0.9, "per_sample": True},
            ASAM(rho=0.9, eta=0.0, per_sample=True),
        ),
        ("gsam", {"alpha": 0.1}, GSAM(alpha=0.1)),
        ("gsam", {**SCHED, "alpha": 0.7}, GSAM(**SCHED, alpha=0.7)),
        ("vasso", {"theta": 0.5}, VaSSO(theta=0.5)),
        ("sam", {"per_sample": True}, SAM(per_sample=True)),
        ("ssam", {"gamma": 0.2}, SmoothedSAM(gamma=0.2)),
    ],
    ids=repr,
)
@pytest.mark.parametrize("how", ["kwargs", "perturbation_kwargs"])
def test_rule_kwargs_go_to_the_rule_and_the_rest_to_the_base(name, rule_kwargs, expected, how):
    params = make_params(0)
    if how == "kwargs":
        opt = SharpBilevelOptimizer(
            params, perturbation=name, lr=0.125, momentum=0.75, **rule_kwargs
        )
    else:
        opt = SharpBilevelOptimizer(
            params, perturbation=name, lr=0.125, momentum=0.75, perturbation_kwargs=rule_kwargs
        )
    assert opt.perturbation == expected
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    group = opt.base_optimizer.param_groups[0]
    assert group["lr"] == 0.125
    assert group["momentum"] == 0.75
    for key in rule_kwargs:
        assert key not in opt.base_optimizer.defaults
    if name == "ssam":
        assert opt.smooth == rule_kwargs["gamma"]


def test_rho_positional_and_adam_kwargs():
    params = make_params(0)
    opt = SharpBilevelOptimizer(params, torch.optim.Adam, "asam", 0.7, eta=0.05, betas=(0.8, 0.9))
    assert opt.perturbation == ASAM(rho=0.7, eta=0.05)
    assert isinstance(opt.base_optimizer, torch.optim.Adam)
    assert opt.base_optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    # rho= overrides perturbation_kwargs' rho
    opt = SharpBilevelOptimizer(params, perturbation="sam", rho=0.3, perturbation_kwargs={"rho": 9})
    assert opt.perturbation.rho == 0.3


@pytest.mark.parametrize("seed", SEEDS)
def test_rule_instance_is_accepted(seed):
    params = make_params(seed)
    objective = Objective(SHAPES, seed)
    phi = clones(params)
    rule = ASAM(rho=0.3, eta=0.05, per_sample=True)
    opt = SharpBilevelOptimizer(params, perturbation=rule, lr=0.02, momentum=0.5)
    assert opt.perturbation is rule
    assert opt.base_optimizer.param_groups[0]["momentum"] == 0.5
    opt.step(objective.closure(params))
    ref = reference_step(
        "asam", {"rho": 0.3, "eta": 0.05, "per_sample": True}, phi, objective, 0.02, {}
    )
    assert_all_close([p.detach() for p in params], ref.after)


@pytest.mark.parametrize(
    "extra",
    [
        {"rho": 0.1},
        {"perturbation_kwargs": {"eta": 0.1}},
        {"perturbation_kwargs": {"rho": 0.1}},
        # a hyperparameter the instance's rule has, given as an optimizer kwarg
        {"eta": 0.1},
        {"per_sample": True},
    ],
    ids=repr,
)
def test_hyperparameters_with_an_instance_raise_value_error(extra):
    with pytest.raises(ValueError, match="instance"):
        SharpBilevelOptimizer(make_params(0), perturbation=ASAM(), lr=0.1, **extra)


def test_get_perturbation_returns_instances_as_is():
    rule = VaSSO(theta=0.4)
    assert get_perturbation(rule) is rule
    with pytest.raises(ValueError, match="instance"):
        get_perturbation(rule, theta=0.5)


def test_public_exports():
    for name in ("SAM", "ASAM", "GSAM", "VaSSO", "SmoothedSAM", "NoPerturbation"):
        assert issubclass(getattr(sharp_bilevel, name), PerturbationRule)
    assert sharp_bilevel.register_perturbation is register_perturbation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_gsam_is_asams_ascent_with_gsams_descent(seed: int) -> None:
    """FTD's experts: GSAM with ``adaptive=True`` (eps = rho T^2 g / (||T g|| + xi), T = |phi|)."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(4, 3, generator=gen, dtype=torch.float64),
        torch.randn(5, generator=gen, dtype=torch.float64),
    ]
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    grads_adv = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    rule = GSAM(rho=0.3, alpha=0.25, adaptive=True)
    eps, _ = rule.ascent(params, grads, {}, 0.1)
    flat_p = torch.cat([p.reshape(-1) for p in params])
    flat_g = torch.cat([g.reshape(-1) for g in grads])
    flat_ga = torch.cat([g.reshape(-1) for g in grads_adv])
    t = flat_p.abs()
    expected_eps = 0.3 * t * t * flat_g / (torch.linalg.vector_norm(t * flat_g) + 1e-12)
    torch.testing.assert_close(
        torch.cat([e.reshape(-1) for e in eps]), expected_eps, rtol=1e-12, atol=1e-14
    )
    d = rule.descent(grads, grads_adv, {})
    g_perp = flat_g - (flat_g @ flat_ga) / (flat_ga @ flat_ga + 1e-12) * flat_ga
    torch.testing.assert_close(
        torch.cat([x.reshape(-1) for x in d]), flat_ga - 0.25 * g_perp, rtol=1e-12, atol=1e-14
    )
    with pytest.raises(ValueError, match="adaptive"):
        GSAM(adaptive=1)  # type: ignore[arg-type]


# ====================================================================== 9. mixed dtypes
# Each eps and each descent direction stays in its parameter's dtype, whatever the others are
# (0-d tensors promote each other, so a float32 scalar beside a float64 tensor is the trap).
# Sums over the set accumulate in the promoted dtype; the tolerance is the lowest precision's.
BF16 = torch.bfloat16
MIXED = {
    "f64+f32_0d": ([((5, 3), F64), ((), torch.float32), ((4,), torch.float32)], 1e-5),
    "f32+bf16": ([((4, 3), torch.float32), ((6, 2), BF16), ((), BF16)], 3e-2),
}
MIXED_RULES = [
    ("sam", {"rho": 0.2}),
    ("asam", {"rho": 0.4, "eta": 0.02}),
    ("gsam", {"rho": 0.3, "alpha": 0.5}),
    ("gsam", {"rho": 0.3, "alpha": 0.5, "adaptive": True, "eta": 0.01}),
    ("vasso", {"rho": 0.2, "theta": 0.4}),
    ("ssam", {"rho": 0.2, "gamma": 0.05}),
]
MIXED_CASES = [
    *[(n, {**h, "per_sample": ps}) for n, h in MIXED_RULES for ps in (False, True)],
    ("none", {}),
]


def mixed_tensors(spec, seed: int, requires_grad: bool = False) -> list[Tensor]:
    gen = torch.Generator().manual_seed(700 + seed)
    out = [torch.randn(shape, generator=gen, dtype=F64).to(dtype) for shape, dtype in spec]
    return [torch.nn.Parameter(t) if requires_grad else t for t in out]


def f64(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().to(F64, copy=True) for t in tensors]


def ref_eps(name: str, hyper: dict, phi: list[Tensor], g: list[Tensor], d_prev=None):
    """Float64 eps (and VaSSO's new average) from DESIGN.md section 4."""
    per_sample = hyper.get("per_sample", False)
    if name == "asam" or hyper.get("adaptive"):
        return ref_asam_eps(phi, g, hyper["rho"], hyper["eta"], per_sample), None
    if name == "vasso":
        d = ref_vasso_average(d_prev, g, hyper["theta"])
        return ref_sam_eps(d, hyper["rho"], per_sample), d
    return ref_sam_eps(g, hyper["rho"], per_sample), None


def assert_close_in_dtypes(actual, expected64, like, rtol: float, scale: float | None = None):
    """Each tensor in its parameter's dtype, within ``rtol * scale`` of the float64 reference
    plus the rounding of the result to that dtype (``scale``: the reference's largest entry)."""
    if scale is None:
        scale = max(float(e.abs().max()) for e in expected64)
    for a, e, p in zip(actual, expected64, like, strict=True):
        assert a.dtype == p.dtype, (a.dtype, p.dtype)
        assert a.shape == p.shape
        unit = torch.finfo(p.dtype).eps / 2
        bound = rtol * scale + unit * e.abs()
        assert bool(((a.to(F64) - e).abs() <= bound).all()), (a, e)


@pytest.mark.parametrize("combo", list(MIXED))
@pytest.mark.parametrize(("name", "hyper"), MIXED_CASES, ids=lambda v: str(v))
def test_rule_outputs_keep_each_parameters_dtype(name, hyper, combo):
    spec, rtol = MIXED[combo]
    params, grads = mixed_tensors(spec, 0), mixed_tensors(spec, 1)
    grads_adv = mixed_tensors(spec, 2)
    rule = get_perturbation(name, **hyper)
    state = rule.init(params)
    eps, state = rule.ascent(params, grads, state, 0.1)
    if name == "none":
        expected, d = [torch.zeros_like(p) for p in f64(params)], None
    else:
        expected, d = ref_eps(name, hyper, f64(params), f64(grads))
    assert_close_in_dtypes(eps, expected, params, rtol)
    if name == "vasso":  # the stored average keeps the dtypes, and so does the next eps
        eps, state = rule.ascent(params, grads_adv, state, 0.1)
        expected, _ = ref_eps(name, hyper, f64(params), f64(grads_adv), d)
        assert_close_in_dtypes(eps, expected, params, rtol)
        assert all(s.dtype == p.dtype for s, p in zip(state["d"], params, strict=True))
    direction = rule.descent(grads, grads_adv, state)
    expected = f64(grads_adv)
    if name == "gsam":
        per_sample = hyper["per_sample"]
        expected = ref_gsam_descent(f64(grads), f64(grads_adv), hyper["alpha"], per_sample)
    assert_close_in_dtypes(direction, expected, params, rtol)


@pytest.mark.parametrize("combo", list(MIXED))
@pytest.mark.parametrize(("name", "hyper"), MIXED_CASES, ids=lambda v: str(v))
def test_optimizer_step_with_mixed_dtypes_matches_float64_reference(name, hyper, combo):
    spec, rtol = MIXED[combo]
    params = mixed_tensors(spec, 3, requires_grad=True)
    dtypes = [p.dtype for p in params]
    phi = f64(params)
    objective = Objective([p.shape for p in params], 3)
    calls: list[list[Tensor]] = []

    def closure():
        calls.append(f64(params))
        loss = objective.value([p.to(F64) for p in params])
        loss.backward()
        return loss

    lr = 0.05
    opt = SharpBilevelOptimizer(params, perturbation=name, lr=lr, seed=0, **hyper)
    opt.step(closure)
    assert [p.dtype for p in params] == dtypes
    assert all(p.grad.dtype == p.dtype for p in params)
    # the reference takes g where the first call ran (phi, or phi + Delta with smoothing)
    g = objective.grad(calls[0])
    if name == "none":
        expected_after = add(phi, g, -lr)
    else:
        eps, _ = ref_eps(name, hyper, phi, g)
        # the second call ran at phi + eps, rounded to each parameter's dtype
        scale = max(float(e.abs().max()) for e in eps)
        seen = [c.to(dt) for c, dt in zip(calls[1], dtypes, strict=True)]
        assert_close_in_dtypes(seen, add(phi, eps), params, rtol, scale)
        g_adv = objective.grad(add(phi, eps))
        direction = g_adv
        if name == "gsam":
            direction = ref_gsam_descent(g, g_adv, hyper["alpha"], hyper["per_sample"])
        expected_after = add(phi, direction, -lr)
    scale = max(float(s.abs().max()) for s in add(expected_after, phi, -1.0))  # the step
    assert_close_in_dtypes([p.detach() for p in params], expected_after, params, rtol, scale)


# ---------------------------------------------------------------------- xi and ASAM's scaled
@pytest.mark.parametrize("rule", ["sam", "asam", "gsam", "vasso", "wsam", "ssam"])
def test_xi_is_the_denominator_guard_of_every_norm_rule(rule: str) -> None:
    """A large xi makes its presence visible: eps = rho g / (||g|| + xi) (float64 by hand)."""
    from sharp_bilevel import get_perturbation

    gen = torch.Generator().manual_seed(3)
    phi = [torch.randn(3, 2, generator=gen, dtype=torch.float64)]
    g = [torch.randn(3, 2, generator=gen, dtype=torch.float64)]
    xi = 0.7
    eps, _ = get_perturbation(rule, xi=xi).ascent(phi, g, {}, 0.0)
    if rule == "asam":
        t = phi[0].abs() + 0.01
        expected = 0.5 * t * t * g[0] / ((t * g[0]).norm() + xi)
    else:
        expected = 0.05 * g[0] / (g[0].norm() + xi)
    torch.testing.assert_close(eps[0], expected, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="xi must be a finite number >= 0"):
        get_perturbation(rule, xi=-1.0)


def test_asam_scales_only_the_chosen_tensors() -> None:
    """The official ASAM's T on tensors named "weight" only: here by position, T = 1 elsewhere."""
    from sharp_bilevel import ASAM

    gen = torch.Generator().manual_seed(4)
    phi = [torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(2)]
    g = [torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(2)]
    eps, _ = ASAM(rho=0.5, eta=0.01, scaled=(1,)).ascent(phi, g, {}, 0.0)
    t = [torch.ones(3, dtype=torch.float64), phi[1].abs() + 0.01]
    n = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g, strict=True)))
    for e, ti, gi in zip(eps, t, g, strict=True):
        torch.testing.assert_close(e, 0.5 * ti * ti * gi / (n + 1e-12), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="scaled must be None or a tuple"):
        ASAM(scaled=[0])  # type: ignore[arg-type]


def test_wsam_descent_interpolates_between_g_and_sam() -> None:
    from sharp_bilevel import WSAM

    g = [torch.tensor([1.0, 2.0], dtype=torch.float64)]
    ga = [torch.tensor([3.0, -1.0], dtype=torch.float64)]
    assert torch.equal(WSAM(gamma=0.0).descent(g, ga, {})[0], g[0])  # plain descent
    assert torch.equal(WSAM(gamma=0.5).descent(g, ga, {})[0], ga[0])  # SAM
    torch.testing.assert_close(WSAM(gamma=0.9).descent(g, ga, {})[0], 9 * ga[0] - 8 * g[0])
    for bad in (1.0, -0.1, True, float("nan")):
        with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\)"):
            WSAM(gamma=bad)  # type: ignore[arg-type]
