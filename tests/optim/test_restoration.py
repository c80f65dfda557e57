"""Restoration guarantees of ``SharpBilevelOptimizer.step`` (DESIGN.md section 3).

Whatever happens in a step (the closure raises, a NaN/inf loss or gradient in either pass, under
``nonfinite="raise"`` or ``"skip"``), every parameter ends bit for bit at its pre-step value,
perturbed and unperturbed groups alike, and the optimizer's state is untouched. Restoring is
exact even where ``(phi + eps) - eps != phi`` in floating point. A zero gradient never divides
by zero.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import (
    ALL_RULES,
    TWO_PASS_RULES,
    XI,
    Objective,
    RefRule,
    all_equal,
    backward_closure,
    clones,
    nested_equal,
    ref_centralized,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sharp_bilevel import NonFiniteError, SharpBilevelOptimizer

F64 = torch.float64
FAILURES = ("exception", "nan_loss", "inf_loss", "nan_grad", "inf_grad", "nan_grad_unperturbed")
PROPERTY = settings(max_examples=50, deadline=None)


class Boom(RuntimeError):
    """A user exception raised inside the closure."""


def _params(dtype, seed, scale):
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, s=scale):
        return torch.nn.Parameter((s * torch.randn(*shape, generator=gen, dtype=F64)).to(dtype))

    P = [draw(3, 2), draw(4)]
    Q = [draw(2, s=0.3)]
    # targets within O(1) of the parameters keep F and its gradients O(1) at every scale
    objective = Objective(
        [(p.detach().to(F64) + torch.randn(p.shape, generator=gen, dtype=F64)).to(dtype) for p in P]
    )
    return P, Q, objective


def _optimizer(rule, smooth, P, Q, lr=1e-3, q_lr=None, **kwargs):
    return SharpBilevelOptimizer(
        [{"params": P}, {"params": Q, "perturb": False, "lr": lr if q_lr is None else q_lr}],
        perturbation=rule,
        smooth=smooth,
        seed=5,
        lr=lr,
        momentum=0.9,
        **kwargs,
    )


def _without_counters(state):
    """A state dict minus what a failed step may legitimately change (counters, noise RNG)."""
    state = copy.copy(state)
    extra = dict(state["sharp_bilevel"])
    for key in ("skipped_steps", "noise_rng"):
        extra.pop(key)
    state["sharp_bilevel"] = extra
    return state


@PROPERTY
@given(
    rule=st.sampled_from(ALL_RULES),
    smooth=st.sampled_from([None, 0.2]),
    failure=st.sampled_from(FAILURES),
    failing_pass=st.sampled_from(["ascent", "descent"]),
    policy=st.sampled_from(["raise", "skip"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.sampled_from([1e-8, 1.0, 1e8]),
    good_steps=st.integers(0, 2),
    seed=st.integers(0, 2**16),
    fail_after_backward=st.booleans(),
)
def test_failed_step_restores_every_parameter_bit_for_bit(
    rule,
    smooth,
    failure,
    failing_pass,
    policy,
    dtype,
    scale,
    good_steps,
    seed,
    fail_after_backward,
):
    if rule == "none":
        failing_pass = "ascent"  # its only closure call
    P, Q, objective = _params(dtype, seed, scale)
    # dF/dq grows like ||p + Delta - c||^2 ~ scale^2 with smoothing: keep q's steps O(1)
    opt = _optimizer(rule, smooth, P, Q, q_lr=1e-3 / max(1.0, scale) ** 2, nonfinite=policy)
    closure = backward_closure(objective, P, Q)
    for _ in range(good_steps):  # momentum buffers, VaSSO's d, a used noise generator
        opt.step(closure)
    assert opt.last_step is None or opt.last_step.skipped is None
    two = opt.perturbation.two_pass and opt.perturbation.wants_second_pass(opt._rule_state)
    if not two:
        failing_pass = "ascent"  # a one-pass step (LookSAM between its k-steps)
    before = clones(P + Q)
    state_before = copy.deepcopy(_without_counters(opt.state_dict()))
    steps_before = opt.steps_taken
    boom = Boom("user failure")
    phases = []

    def failing(ctx):
        phases.append(ctx.phase)
        if ctx.phase != failing_pass:
            return closure(ctx)
        if failure == "exception" and not fail_after_backward:
            raise boom
        loss = objective.loss(P, Q)
        loss.backward()
        if failure == "exception":
            raise boom
        if failure == "nan_loss":
            return loss.detach() * float("nan")
        if failure == "inf_loss":
            return loss.detach() + float("-inf" if seed % 2 else "inf")
        target = Q[0] if failure == "nan_grad_unperturbed" else P[seed % len(P)]
        with torch.no_grad():
            target.grad.view(-1)[seed % target.numel()] = float(
                "inf" if failure == "inf_grad" else "nan"
            )
        return loss

    if failure == "exception":
        with pytest.raises(Boom) as info:
            opt.step(failing)
        assert info.value is boom  # propagated unchanged
    elif policy == "raise":
        with pytest.raises(NonFiniteError) as info:
            opt.step(failing)
        message = str(info.value)
        assert "restored" in message
        if two:  # the single-pass case has its own test below
            assert f"{failing_pass} pass" in message
        assert ("loss" if "loss" in failure else "gradient") in message
    else:
        returned = opt.step(failing)
        assert returned is not None
        assert opt.skipped_steps["nonfinite"] == 1
        assert opt.skipped_steps["gate"] == 0
        assert opt.last_step.skipped == "nonfinite"

    assert phases[-1] == failing_pass
    assert all_equal(P + Q, before)
    assert opt.steps_taken == steps_before
    assert nested_equal(_without_counters(opt.state_dict()), state_before)
    if failure == "exception" or policy == "raise":
        assert opt.skipped_steps["nonfinite"] == 0

    # the optimizer goes on normally afterwards
    opt.step(closure)
    assert opt.steps_taken == steps_before + 1
    assert opt.last_step.skipped is None
    assert all(torch.isfinite(t).all() for t in P + Q)


@pytest.mark.parametrize("failure", ["nan_loss", "nan_grad"])
def test_single_pass_nonfinite_error_names_the_pass(failure):
    """The one closure call of "none" is the ascent pass (ctx.phase == "ascent")."""
    P, Q, objective = _params(torch.float64, 0, 1.0)
    opt = _optimizer("none", None, P, Q)
    phases = []

    def closure(ctx):
        phases.append(ctx.phase)
        loss = objective.loss(P, Q)
        loss.backward()
        if failure == "nan_loss":
            return loss.detach() * float("nan")
        with torch.no_grad():
            P[0].grad[0, 0] = float("nan")
        return loss

    with pytest.raises(NonFiniteError) as info:
        opt.step(closure)
    assert phases == ["ascent"]
    assert "ascent" in str(info.value)
    assert "restored" in str(info.value)


@PROPERTY
@given(
    rule=st.sampled_from(ALL_RULES),
    smooth=st.sampled_from([None, 0.2]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.sampled_from([1e-8, 1e-3, 1.0, 1e3, 1e8]),
    seed=st.integers(0, 2**16),
    rho=st.sampled_from([1e-6, 0.05, 0.5, 3.0]),
)
def test_lr_zero_step_leaves_parameters_bit_identical(rule, smooth, dtype, scale, seed, rho):
    """With lr = 0 the base step changes nothing, so any inexact undo of Delta or eps shows."""
    P, Q, objective = _params(dtype, seed, scale)
    rule_kwargs = {} if rule == "none" else {"rho": rho}
    opt = _optimizer(rule, smooth, P, Q, lr=0.0, **rule_kwargs)
    before = clones(P + Q)
    seen = []
    for _ in range(2):
        opt.step(backward_closure(objective, P, Q, seen))
        assert opt.last_step.skipped is None
        assert all_equal(P + Q, before)
    smoothed = (smooth is not None) or rule in ("ssam", "bsam")  # bsam draws its own noise
    for record in seen:
        assert all_equal(record["Q"], before[len(P) :])
        if record["phase"] == "ascent" and not smoothed:
            assert all_equal(record["P"], before[: len(P)])
    if rule != "none" and rho >= 0.05 and scale <= 1.0:  # eps above the rounding of phi
        assert not all_equal(seen[1]["P"], before[: len(P)])  # the descent call was perturbed


def _rounding_params(dtype, mags):
    """Values of mixed magnitudes for which ``(phi + eps) - eps != phi`` somewhere."""
    gen = torch.Generator().manual_seed(2)
    mags = torch.tensor(mags, dtype=F64)
    P = [
        torch.nn.Parameter((mags * (1 + torch.rand(6, generator=gen, dtype=F64))).to(dtype)),
        torch.nn.Parameter(torch.randn(8, 8, generator=gen, dtype=F64).to(dtype)),
    ]
    Q = [torch.nn.Parameter(torch.tensor([0.25], dtype=dtype))]
    # targets O(1) away from every parameter: O(1) gradient in every coordinate
    objective = Objective(
        [p.detach() - torch.randn(p.shape, generator=gen, dtype=F64).to(dtype) for p in P]
    )
    return P, Q, objective


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", TWO_PASS_RULES)
def test_restore_is_exact_where_subtracting_eps_is_not(rule, dtype):
    # ASAM's eps grows with |phi|^2: keep its magnitudes closer so eps is not all on one entry
    mags = [3.7, 1.3, 12.3, 0.9, 5.5, 2.2] if rule == "asam" else [1e8, 3.7, 1e-3, 1e4, 0.1, 7e5]
    P, Q, objective = _rounding_params(dtype, mags)
    rho = 0.7
    opt = _optimizer(rule, None, P, Q, lr=0.0, rho=rho)
    P0, Q0 = clones(P), clones(Q)
    seen = []
    opt.step(backward_closure(objective, P, Q, seen))
    ascent, descent = seen
    noisy = rule in ("ssam", "bsam")  # the first pass runs at phi + Delta
    if not noisy:
        assert all_equal(ascent["P"], P0)
    # the rule's eps (float64 reference at phi; ssam's gradient is taken at phi + Delta)
    g, _ = objective.grads(P0, Q0)
    ref = RefRule(rule, rho=rho)
    g = ref_centralized(g) if ref.centralize else g
    eps = [e.to(dtype) for e in ref.ascent(P0, g, 0.0)]
    if not noisy:
        tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-6, "atol": 1e-6}
        for d, p0, e in zip(descent["P"], P0, eps, strict=True):
            torch.testing.assert_close(d, p0 + e, **tol)
    # precondition that gives this test its teeth: undoing by subtraction is not exact here
    undone = [(p0 + e) - e for p0, e in zip(P0, eps, strict=True)]
    assert not all_equal(undone, P0)
    # ... but the optimizer restored exactly (lr = 0: the base step changes nothing)
    assert all_equal(P + Q, P0 + Q0)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_zero_gradient_gives_a_normal_step_and_no_nan(rule):
    gen = torch.Generator().manual_seed(4)
    P = [torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=F64))]
    Q = [torch.nn.Parameter(torch.randn(2, generator=gen, dtype=F64))]
    lr, wd = 0.1, 0.5
    opt = SharpBilevelOptimizer(
        [{"params": P}, {"params": Q, "perturb": False}],
        perturbation=rule,
        lr=lr,
        weight_decay=wd,
        smooth=0.0,
    )
    before = clones(P + Q)
    seen = []

    def flat(ctx):  # constant in the parameters: zero gradient everywhere
        seen.append([t.detach().clone() for t in P])
        loss = sum((t * 0.0).sum() for t in P + Q) + 1.5
        loss.backward()
        return loss

    loss = opt.step(flat)
    assert float(loss.detach()) == 1.5
    assert opt.last_step.skipped is None
    assert opt.last_step.grad_norm == 0.0
    assert opt.steps_taken == 1
    for record in seen[1:] if rule == "bsam" else seen:  # eps = 0: no NaN reached the closure
        assert all_equal(record, before[: len(P)])  # (bsam's first pass is noisy)
    for t, t0 in zip(P + Q, before, strict=True):
        assert torch.isfinite(t.grad).all()
        # SGD with weight decay: p - lr * (0 + wd p)
        torch.testing.assert_close(t.detach(), t0 - lr * wd * t0, rtol=1e-15, atol=0)


def test_ref_rules_zero_gradient_is_finite():
    """The reference rules (used across the suite) agree: a zero gradient gives eps = 0."""
    zeros = [torch.zeros(3, dtype=F64)]
    for rule in TWO_PASS_RULES:
        ref = RefRule(rule)
        eps = ref.ascent([torch.ones(3, dtype=F64)], zeros, 0.1)
        assert all(torch.equal(e, torch.zeros(3, dtype=F64)) for e in eps)
        assert all(torch.isfinite(d).all() for d in ref.descent(zeros, zeros))
    assert XI == 1e-12
