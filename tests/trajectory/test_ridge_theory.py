r"""The unroll on a strongly convex inner problem (ridge regression), checked against theory.

Inner problem. The student is a bias-free linear map ``W`` (``[k, d]``, flat ``w = W.reshape(-1)``,
row-major). The synthetic inputs ``X`` (``phi``, ``[n, d]``) and targets ``Y`` (``[n, k]``) are
extended by ``d`` fixed ridge rows ``c I_d`` with zero targets, so with ``m = n + d`` rows the inner
loss is ridge regression with ``lambda = c^2 / m``:

.. math::
    \ell(W) = \frac{1}{2m}\big(\|X W^\top - Y\|_F^2 + c^2 \|W\|_F^2\big), \qquad
    \nabla \ell(W) = W A - b, \quad A = \frac{X^\top X + c^2 I}{m}, \quad b = \frac{Y^\top X}{m}.

Plain SGD on the full batch, ``W_{t+1} = W_t - \alpha \nabla \ell(W_t) = W_t C + \alpha b`` with
``C = I - \alpha A`` (symmetric), so

.. math::
    W_t = W_0 C^t + \alpha\, b \sum_{j<t} C^j ,

a differentiable closed form in ``X`` and ``alpha`` that the tests differentiate with autograd.

* Prop. 4.1 (TUH): the error of the truncated hypergradient is
  ``<dL/dW_N, C^K dW_iota/dX>`` with ``K = N - iota`` kept steps; it decays like ``rho(C)^K``,
  ``rho(C) = max_i |1 - alpha lambda_i(A)|``.
* Thm. 4.2 (TR): with ``Delta_t = W_t(X + E) - W_t(X)``,
  ``Delta_{t+1} = Delta_t C' - alpha (g'(W_t) - g(W_t))`` and
  ``g'(W) - g(W) = W (A' - A) - Y^T E / m``; so when ``||C'||_2 <= 1``,
  ``||Delta_tau|| <= alpha tau B`` with ``B = ||A' - A||_2 R + ||Y^T E||_F / m`` and
  ``R = max_{t < tau} ||W_t(X)||_F``.
* SATM Eq. 10: ``dL/dalpha ~= <dL/dw_N, sum_i u_i>`` is exact for ``L(w_0 + alpha sum_i u_i)``
  with the directions held constant; its error against BPTT is ``O(alpha N ||A||)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from sharp_bilevel.trajectory.hypergradient import first_order_lr_grad
from sharp_bilevel.trajectory.step_plan import StepPlan
from sharp_bilevel.trajectory.student import FunctionalStudent
from sharp_bilevel.trajectory.unroll import UnrollResult, unroll

DT = torch.float64
N_SAMPLES, DIM, OUT = 12, 5, 3
RIDGE = 0.5  # c: ridge rows c * I_d, lambda = c^2 / (n + d)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Thousands of tiny matmuls: intra-op threads only add contention on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------- the problem
@dataclass
class Ridge:
    """One inner problem: inputs ``x`` (``phi``), targets ``y``, start ``w0`` and outer target."""

    x: Tensor  # [n, d]
    y: Tensor  # [n, k]
    w0: Tensor  # [k, d]
    w_target: Tensor  # [k, d]
    c: float = RIDGE

    @property
    def rows(self) -> int:
        return self.x.shape[0] + self.x.shape[1]

    def images(self, x: Tensor) -> Tensor:
        """``[m, d]``: ``x`` and the ridge rows (differentiable in ``x``)."""
        return torch.cat([x, self.c * torch.eye(x.shape[1], dtype=DT)])

    def targets(self) -> Tensor:
        return torch.cat([self.y, torch.zeros(self.x.shape[1], self.y.shape[1], dtype=DT)])

    def hessian(self, x: Tensor) -> Tensor:
        """``A = (x^T x + c^2 I) / m``."""
        z = self.images(x)
        return z.T @ z / self.rows

    def linear_term(self, x: Tensor) -> Tensor:
        """``b = Y^T x / m`` (``[k, d]``)."""
        return self.y.T @ x / self.rows

    def loss_fn(self, out: Tensor, y: Tensor) -> Tensor:
        return 0.5 * (out - y).square().sum() / self.rows

    def student(self) -> FunctionalStudent:
        d, k = self.x.shape[1], self.y.shape[1]
        return FunctionalStudent(torch.nn.Linear(d, k, bias=False).to(DT))

    def plan(self, steps: int) -> StepPlan:
        return StepPlan(
            indices=tuple(torch.arange(self.rows) for _ in range(steps)), draws=(None,) * steps
        )

    def outer(self, w_final: Tensor) -> Tensor:
        """``L = ||w_N - w_target||^2``."""
        return (w_final.reshape(-1) - self.w_target.reshape(-1)).square().sum()

    def run(
        self, x: Tensor, lr: Tensor, steps: int, start: Tensor | None = None, **kwargs: Any
    ) -> UnrollResult:
        """The library's unroll of ``steps`` full-batch steps on inputs ``x``."""
        return unroll(
            self.student(),
            self.w0.reshape(-1) if start is None else start,
            self.images(x),
            self.targets(),
            lr,
            self.plan(steps),
            loss_fn=self.loss_fn,
            **kwargs,
        )

    def gd(self, x: Tensor, lr: float | Tensor, w: Tensor, steps: int) -> list[Tensor]:
        """Hand-written GD ``W <- W - lr (W A - b)``: ``[W_0, ..., W_steps]`` (``[k, d]`` each)."""
        a, b = self.hessian(x), self.linear_term(x)
        out = [w]
        for _ in range(steps):
            w = w - lr * (w @ a - b)
            out.append(w)
        return out


def make_problem(seed: int, eigs: list[float] | None = None) -> Ridge:
    """A random problem; with ``eigs``, ``x`` is built so that ``A`` has those eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    n, d, k, c = N_SAMPLES, DIM, OUT, RIDGE
    m = n + d
    if eigs is None:
        x = torch.randn(n, d, generator=g, dtype=DT)
    else:
        u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=DT))
        v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
        s = torch.sqrt(torch.tensor(eigs, dtype=DT) * m - c**2)  # x^T x = v s^2 v^T
        x = u @ torch.diag(s) @ v.T
    y = torch.randn(n, k, generator=g, dtype=DT)
    w0 = 0.5 * torch.randn(k, d, generator=g, dtype=DT)
    w_target = torch.randn(k, d, generator=g, dtype=DT)
    return Ridge(x, y, w0, w_target)


def closed_form(
    p: Ridge, x: Tensor, lr: Tensor, steps: int, w_start: Tensor | None = None
) -> Tensor:
    """``W_steps = W_start C^steps + lr b sum_{j<steps} C^j``, differentiable in ``x``, ``lr``."""
    w_start = p.w0 if w_start is None else w_start
    d = x.shape[1]
    eye = torch.eye(d, dtype=DT)
    c_mat = eye - lr * p.hessian(x)
    power_sum = torch.zeros(d, d, dtype=DT)
    for j in range(steps):
        power_sum = power_sum + torch.linalg.matrix_power(c_mat, j)
    return w_start @ torch.linalg.matrix_power(c_mat, steps) + lr * p.linear_term(x) @ power_sum


def contraction(p: Ridge, x: Tensor, lr: float) -> float:
    """``rho(C) = max_i |1 - lr lambda_i(A)|``."""
    return float((1 - lr * torch.linalg.eigvalsh(p.hessian(x))).abs().max())


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def lr_tensor(value: float) -> Tensor:
    return torch.tensor(value, dtype=DT, requires_grad=True)


def tuh_grads(p: Ridge, lr: float, steps: int, iota: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(w_N, dL/dX, dL/dalpha)`` from the library's unroll with ``graph_from = iota``."""
    x = p.x.clone().requires_grad_(True)
    alpha = lr_tensor(lr)
    final = p.run(x, alpha, steps, graph_from=iota).final
    gx, ga = torch.autograd.grad(p.outer(final), (x, alpha))
    return final.detach(), gx, ga


# ---------------------------------------------------------------------- 1. closed form
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_unroll_and_exact_hypergradient_match_the_closed_form(seed: int) -> None:
    p = make_problem(seed)
    lr, steps = 0.3, 25
    assert float(torch.linalg.eigvalsh(p.hessian(p.x)).min()) > 0.1  # strongly convex
    final, grad_x, grad_lr = tuh_grads(p, lr, steps, iota=0)

    x = p.x.clone().requires_grad_(True)
    alpha = lr_tensor(lr)
    ref = closed_form(p, x, alpha, steps)
    ref_gx, ref_ga = torch.autograd.grad(p.outer(ref), (x, alpha))

    assert rel_err(final, ref.detach().reshape(-1)) < 1e-10
    assert rel_err(grad_x, ref_gx) < 1e-9
    assert abs(float(grad_lr - ref_ga)) < 1e-9 * abs(float(ref_ga))
    assert float(ref_gx.norm()) > 1e-2
    assert abs(float(ref_ga)) > 1e-2


@pytest.mark.parametrize("iota", [1, 9, 24])
def test_truncated_hypergradient_matches_the_closed_form_with_w_iota_held_constant(
    iota: int,
) -> None:
    # TUH(iota) differentiates W_N = W_iota C^K + alpha b sum_{j<K} C^j with W_iota a constant.
    p = make_problem(3)
    lr, steps = 0.3, 25
    final, grad_x, grad_lr = tuh_grads(p, lr, steps, iota=iota)

    w_iota = closed_form(p, p.x, torch.tensor(lr, dtype=DT), iota).detach()
    x = p.x.clone().requires_grad_(True)
    alpha = lr_tensor(lr)
    ref = closed_form(p, x, alpha, steps - iota, w_start=w_iota)
    ref_gx, ref_ga = torch.autograd.grad(p.outer(ref), (x, alpha))

    assert rel_err(final, ref.detach().reshape(-1)) < 1e-10
    assert rel_err(grad_x, ref_gx) < 1e-9
    assert abs(float(grad_lr - ref_ga)) < 1e-9 * abs(float(ref_ga))


# ---------------------------------------------------------------------- 2. Prop. 4.1
@pytest.mark.parametrize(
    ("seed", "rho", "steps", "fit_max"),
    [(0, 0.75, 40, 22), (1, 0.75, 40, 22), (2, 0.85, 50, 22)],
)
def test_truncation_error_decays_geometrically_at_the_contraction_rate(
    seed: int, rho: float, steps: int, fit_max: int
) -> None:
    eigs = [0.2, 0.45, 0.6, 0.8, 1.0]  # mu = 0.2 isolated: rho(C) = 1 - alpha mu
    lr = (1 - rho) / eigs[0]
    p = make_problem(seed, eigs)
    rho_c = contraction(p, p.x, lr)
    assert rho_c == pytest.approx(rho, rel=1e-12)

    _, exact, _ = tuh_grads(p, lr, steps, iota=0)
    # err[K] for K = N - iota kept steps, K = 1..N (err[N] = 0: iota = 0 is the exact gradient).
    err = {
        steps - iota: float((tuh_grads(p, lr, steps, iota)[1] - exact).norm())
        for iota in range(steps)
    }
    assert err[steps] == 0.0
    errors = torch.tensor([err[k] for k in range(1, steps + 1)], dtype=DT)
    assert bool((errors[1:] <= errors[:-1] * (1 + 1e-12)).all()), errors  # weakly decreasing
    assert err[1] > 1e-2 * float(exact.norm())  # one kept step is a poor hypergradient

    ks = torch.arange(2, fit_max + 1, dtype=DT)
    logs = torch.tensor([math.log(err[int(k)]) for k in ks], dtype=DT)
    assert min(err[int(k)] for k in ks) > 1e-8  # far above round-off over the fit range
    slope = float(((ks - ks.mean()) * (logs - logs.mean())).sum() / (ks - ks.mean()).square().sum())
    assert slope < 0
    assert slope == pytest.approx(math.log(rho_c), rel=0.05)  # measured within 1.3%


# ---------------------------------------------------------------------- 3. Thm. 4.2 and TR
def _perturbation(p: Ridge, seed: int, scale: float) -> Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    e = torch.randn(p.x.shape, generator=g, dtype=DT)
    return scale * e * p.x.norm() / e.norm()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reuse_drift_grows_at_most_linearly_in_alpha_tau(seed: int) -> None:
    p = make_problem(seed)
    lr, steps = 0.3, 20
    x, xe = p.x, p.x + _perturbation(p, seed, 0.02)
    alpha = torch.tensor(lr, dtype=DT)

    def w_at(inputs: Tensor, tau: int) -> Tensor:
        if tau == steps:
            return p.run(inputs, alpha, steps).final.detach()
        recorded = p.run(inputs, alpha, steps, record_at=tau).recorded
        assert recorded is not None
        return recorded

    w_clean = [w_at(x, tau) for tau in range(steps + 1)]
    w_pert = [w_at(xe, tau) for tau in range(steps + 1)]
    assert torch.equal(w_clean[0], p.w0.reshape(-1))
    assert torch.equal(w_pert[0], w_clean[0])
    drift = [float((a - b).norm()) for a, b in zip(w_pert, w_clean, strict=True)]

    a_diff = p.hessian(xe) - p.hessian(x)
    c_pert = torch.eye(DIM, dtype=DT) - lr * p.hessian(xe)
    assert float(torch.linalg.matrix_norm(c_pert, 2)) < 1.0  # the perturbed step contracts
    radius = max(float(w.norm()) for w in w_clean[:-1])
    bound_rate = float(torch.linalg.matrix_norm(a_diff, 2)) * radius + float(
        (p.y.T @ (xe - x)).norm() / p.rows
    )
    q = float(torch.linalg.matrix_norm(c_pert, 2))
    for tau in range(1, steps + 1):
        assert 0 < drift[tau] <= lr * tau * bound_rate * (1 + 1e-9), (tau, drift[tau])
        # Keeping the contraction q = ||C'||_2 < 1 gives the sharper alpha B (1 - q^tau) / (1 - q).
        assert drift[tau] <= lr * bound_rate * (1 - q**tau) / (1 - q) * (1 + 1e-9)

    # Step 1 is exactly alpha ||g'(W_0) - g(W_0)||, g'(W) - g(W) = W (A' - A) - Y^T E / m.
    g_diff = p.w0 @ a_diff - p.y.T @ (xe - x) / p.rows
    assert drift[1] == pytest.approx(lr * float(g_diff.norm()), rel=1e-10)
    # ... which the bound overestimates by < 3x here (measured 0.38-0.56 of alpha B: triangle
    # inequality and R >= ||W_0||); by tau = N the contraction makes the linear bound ~10x loose.
    assert drift[1] >= 0.3 * lr * bound_rate


@pytest.mark.parametrize(("seed", "tau"), [(0, 1), (1, 7), (2, 19)])
def test_reuse_restart_replays_the_remaining_steps_at_the_perturbed_point(
    seed: int, tau: int
) -> None:
    p = make_problem(seed)
    lr, steps = 0.3, 20
    alpha = torch.tensor(lr, dtype=DT)
    x, xe = p.x, p.x + _perturbation(p, seed, 0.05)

    first = p.run(x, alpha, steps, record_at=tau)  # first pass at phi, records w_tau(phi)
    w_tau, before = first.recorded, first.direction_sum_before
    assert w_tau is not None
    assert before is not None
    # Recording does not perturb anything: it is bit-for-bit a tau-step run at phi.
    assert torch.equal(w_tau, p.run(x, alpha, tau).final.detach())
    assert rel_err(w_tau, closed_form(p, x, alpha, tau).reshape(-1)) < 1e-12

    # Second pass: restart at phi + eps from w_tau, steps tau..N-1, graph on phi + eps.
    xe_leaf = xe.clone().requires_grad_(True)
    restart = p.run(xe_leaf, alpha, steps, start=w_tau, start_step=tau).final
    again = p.run(xe, alpha, steps, start=w_tau, start_step=tau).final
    assert torch.equal(restart.detach(), again.detach())  # deterministic replay

    # Reference: the first tau steps at phi, the last N - tau steps at phi + eps, by hand.
    xe_ref = xe.clone().requires_grad_(True)
    w_mid = p.gd(x, lr, p.w0, tau)[-1]
    ref = p.gd(xe_ref, lr, w_mid.detach(), steps - tau)[-1]
    torch.testing.assert_close(restart.detach(), ref.detach().reshape(-1), rtol=1e-12, atol=1e-13)
    (g_restart,) = torch.autograd.grad(p.outer(restart), xe_leaf)
    (g_ref,) = torch.autograd.grad(p.outer(ref), xe_ref)
    assert rel_err(g_restart, g_ref) < 1e-10

    # The direction sums split at tau: before it (first pass) plus the restart's (at phi) = all.
    rerun = p.run(x, alpha, steps, start=w_tau, start_step=tau)
    torch.testing.assert_close(
        before + rerun.direction_sum,
        first.direction_sum,
        rtol=1e-12,
        atol=1e-13,
    )


# ---------------------------------------------------------------------- 4. first-order lr
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_first_order_lr_gradient_is_the_derivative_with_directions_frozen(seed: int) -> None:
    p = make_problem(seed)
    lr, steps = 0.05, 20
    x = p.x.clone().requires_grad_(True)
    alpha = lr_tensor(lr)
    result = p.run(x, alpha, steps)
    final = result.final
    grad_final = torch.autograd.grad(p.outer(final), final, retain_graph=True)[0]
    first_order = first_order_lr_grad(grad_final, result.direction_sum)

    # u_i = -g_i from a hand-written GD loop, detached; then L(w_0 + alpha sum_i u_i).
    traj = p.gd(p.x, lr, p.w0, steps)
    a, b = p.hessian(p.x), p.linear_term(p.x)
    directions = torch.stack([-(w @ a - b) for w in traj[:-1]]).sum(0).reshape(-1)
    alpha_ref = lr_tensor(lr)
    (ref,) = torch.autograd.grad(p.outer(p.w0.reshape(-1) + alpha_ref * directions), alpha_ref)
    assert float(first_order) == pytest.approx(float(ref), rel=1e-12, abs=1e-13)
    torch.testing.assert_close(
        result.direction_sum,
        directions,
        rtol=1e-12,
        atol=1e-13,
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_first_order_lr_gradient_error_is_first_order_in_alpha(seed: int) -> None:
    # dW_N/dalpha = -sum_t g_t C^(N-1-t) (BPTT) against -sum_t g_t (Eq. 10), so
    # |exact - first_order| = |<v, sum_t g_t (I - C^(N-1-t))>|
    #                      <= alpha ||A||_2 ||v|| sum_t (N-1-t) ||g_t||   (v = dL/dW_N).
    p = make_problem(seed)
    steps = 20
    a, b = p.hessian(p.x), p.linear_term(p.x)
    a_norm = float(torch.linalg.matrix_norm(a, 2))
    eye = torch.eye(DIM, dtype=DT)
    rel_errors = {}
    for lr in (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003):
        alpha = lr_tensor(lr)
        result = p.run(p.x, alpha, steps)
        grad_final, exact = torch.autograd.grad(p.outer(result.final), (result.final, alpha))
        first_order = float(first_order_lr_grad(grad_final, result.direction_sum))
        v = grad_final.reshape(OUT, DIM)
        grads = [w @ a - b for w in p.gd(p.x, lr, p.w0, steps)[:-1]]
        c_mat = eye - lr * a
        dropped = sum(
            float((v * (g @ (eye - torch.linalg.matrix_power(c_mat, steps - 1 - t)))).sum())
            for t, g in enumerate(grads)
        )
        assert float(exact) - first_order == pytest.approx(dropped, rel=1e-9, abs=1e-12)
        bound = (
            lr
            * a_norm
            * float(v.norm())
            * sum((steps - 1 - t) * float(g.norm()) for t, g in enumerate(grads))
        )
        assert abs(float(exact) - first_order) <= bound * (1 + 1e-9)
        rel_errors[lr] = abs(float(exact) - first_order) / abs(float(exact))
        if lr <= 0.01:  # steps * alpha * ||A|| < 0.5: the dropped terms are small
            assert abs(float(exact)) > 1.0  # not a near-zero gradient whose sign is noise
            assert math.copysign(1.0, first_order) == math.copysign(1.0, float(exact))
    assert a_norm < 2.5
    # Over decades the relative error shrinks (not monotone on a finer grid for every seed).
    assert rel_errors[0.0003] < rel_errors[0.003] < rel_errors[0.03]
    assert rel_errors[0.0003] < 0.02


def test_first_order_lr_gradient_does_not_vanish_once_the_inner_problem_has_converged() -> None:
    # A known limitation of Eq. 10: w_N -> w* (independent of alpha), so the exact lr gradient
    # tends to 0, but <dL/dw_N, sum_i u_i> = <dL/dw_N, (w_N - w_0) / alpha> does not.
    p = make_problem(0)
    lr, steps = 0.8, 250
    assert contraction(p, p.x, lr) ** steps < 1e-12
    alpha = lr_tensor(lr)
    result = p.run(p.x, alpha, steps)
    final = result.final
    grad_final, exact = torch.autograd.grad(p.outer(final), (final, alpha))
    first_order = first_order_lr_grad(grad_final, result.direction_sum)
    expected = torch.dot(grad_final, (final.detach() - p.w0.reshape(-1)) / lr)
    assert float(first_order) == pytest.approx(float(expected), rel=1e-9)
    assert abs(float(exact)) < 1e-8
    assert abs(float(first_order)) > 0.1  # measured 0.215, against |exact| < 1e-8
