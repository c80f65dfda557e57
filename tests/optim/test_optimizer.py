"""SharpBilevelOptimizer against hand-written references (DESIGN.md sections 3 and 5).

Covers: uni-level parity with a hand-written SAM loop and with torch SGD, every rule against a
float64 reference, the ``skip_if`` gate, closure forms and ``StepContext``, param groups,
schedulers, base optimizer instances, argument validation, dtypes, and SATM's smoothing.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    ALL_RULES,
    TWO_PASS_RULES,
    XI,
    Objective,
    RefRule,
    all_equal,
    backward_closure,
    clones,
    ref_noise,
    reference_run,
    set_norm,
)

from sharp_bilevel import SharpBilevelOptimizer, StepContext, smoothing_noise

F64 = torch.float64


def _problem(dtype: torch.dtype = F64, seed: int = 0, scale: float = 1.0):
    """Two perturbed tensors, one unperturbed tensor and the objective's targets."""
    gen = torch.Generator().manual_seed(seed)
    P = [
        torch.nn.Parameter(scale * torch.randn(3, 2, generator=gen, dtype=dtype)),
        torch.nn.Parameter(scale * torch.randn(4, generator=gen, dtype=dtype)),
    ]
    Q = [torch.nn.Parameter(0.3 * torch.randn(2, generator=gen, dtype=dtype))]
    objective = Objective([torch.randn(p.shape, generator=gen, dtype=dtype) for p in P])
    return P, Q, objective


def _groups(P, Q, **extra):
    return [{"params": P, **extra}, {"params": Q, "perturb": False}]


def _rule_kwargs(rule: str) -> dict:
    if rule == "ssam":
        return {"smooth": 0.01, "seed": 7}
    return {"seed": 7} if rule == "bsam" else {}


# ---------------------------------------------------------------------- 1. uni-level checks
def _logistic_problem():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(40, 3, generator=gen, dtype=F64)
    w_true = torch.tensor([1.5, -2.0, 0.5], dtype=F64)
    y = ((X @ w_true + 0.3 + 0.7 * torch.randn(40, generator=gen, dtype=F64)) > 0).to(F64)
    w0 = 0.1 * torch.randn(3, generator=gen, dtype=F64)
    b0 = torch.tensor(-0.2, dtype=F64)
    return X, y, w0, b0


def _logistic_grad(X, y, w, b):
    """Closed form gradient of the mean logistic loss ``mean(softplus(z) - y z)``."""
    r = torch.sigmoid(X @ w + b) - y
    return X.T @ r / X.shape[0], r.mean()


def _logistic_loss(X, y, w, b):
    z = X @ w + b
    return (F.softplus(z) - y * z).mean()


def test_sam_matches_hand_written_sam_loop_on_logistic_regression():
    X, y, w0, b0 = _logistic_problem()
    rho, lr, momentum, steps = 0.05, 0.1, 0.9, 20

    w = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(b0.clone())
    opt = SharpBilevelOptimizer([w, b], perturbation="sam", rho=rho, lr=lr, momentum=momentum)

    def closure():
        loss = F.binary_cross_entropy_with_logits(X @ w + b, y)
        loss.backward()
        return loss

    # hand-written SAM + heavy-ball SGD
    rw, rb = w0.clone(), b0.clone()
    buf = None
    for _ in range(steps):
        returned = opt.step(closure)
        torch.testing.assert_close(
            returned.detach(), _logistic_loss(X, y, rw, rb), rtol=1e-12, atol=0
        )
        gw, gb = _logistic_grad(X, y, rw, rb)
        norm = torch.sqrt((gw**2).sum() + gb**2)  # over ALL parameters
        ew, eb = rho * gw / (norm + 1e-12), rho * gb / (norm + 1e-12)
        gw2, gb2 = _logistic_grad(X, y, rw + ew, rb + eb)  # rw, rb themselves are untouched
        buf = (
            [gw2.clone(), gb2.clone()]
            if buf is None
            else [
                momentum * buf[0] + gw2,
                momentum * buf[1] + gb2,
            ]
        )
        rw, rb = rw - lr * buf[0], rb - lr * buf[1]
        torch.testing.assert_close(w.detach(), rw, rtol=1e-12, atol=0)
        torch.testing.assert_close(b.detach(), rb, rtol=1e-12, atol=0)
    assert opt.steps_taken == steps
    # the run really moved: the check above is not a fixed point
    assert (w.detach() - w0).abs().max() > 0.1


def test_none_matches_plain_torch_sgd_on_logistic_regression():
    X, y, w0, b0 = _logistic_problem()
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    w2, b2 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = SharpBilevelOptimizer([w, b], perturbation="none", lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([w2, b2], lr=0.1, momentum=0.9)

    def closure():
        loss = F.binary_cross_entropy_with_logits(X @ w + b, y)
        loss.backward()
        return loss

    for _ in range(20):
        opt.step(closure)
        ref.zero_grad()
        F.binary_cross_entropy_with_logits(X @ w2 + b2, y).backward()
        ref.step()
        assert torch.equal(w.detach(), w2.detach())
        assert torch.equal(b.detach(), b2.detach())
    # and against the closed form heavy ball too
    rw, rb, buf = w0.clone(), b0.clone(), None
    for _ in range(20):
        gw, gb = _logistic_grad(X, y, rw, rb)
        buf = [gw, gb] if buf is None else [0.9 * buf[0] + gw, 0.9 * buf[1] + gb]
        rw, rb = rw - 0.1 * buf[0], rb - 0.1 * buf[1]
    torch.testing.assert_close(w.detach(), rw, rtol=1e-12, atol=0)
    torch.testing.assert_close(b.detach(), rb, rtol=1e-12, atol=0)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_every_rule_matches_float64_reference(rule):
    P, Q, objective = _problem()
    P0, Q0 = clones(P), clones(Q)
    opt = SharpBilevelOptimizer(
        _groups(P, Q), perturbation=rule, lr=0.05, momentum=0.9, **_rule_kwargs(rule)
    )
    expected = reference_run(
        RefRule(rule),
        objective,
        P0,
        Q0,
        5,
        lr=0.05,
        momentum=0.9,
        smooth=0.01 if rule == "ssam" else 0.0,
        seed=7,
    )
    closure = backward_closure(objective, P, Q)
    for ref_P, ref_Q in expected:
        opt.step(closure)
        for got, want in zip(P + Q, ref_P + ref_Q, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("smooth", [0.0, 0.05])
def test_bsam_with_a_prior_and_smoothing_matches_float64_reference(smooth):
    """Bayesian SAM's prior term and its noise drawn after SATM's (both from one seed)."""
    P, Q, objective = _problem()
    P0, Q0 = clones(P), clones(Q)
    hp = {"rho": 0.2, "num_data": 50.0, "delta": 0.3, "damping": 0.05, "beta2": 0.9}
    opt = SharpBilevelOptimizer(
        _groups(P, Q), perturbation="bsam", lr=0.05, smooth=smooth, seed=3, **hp
    )
    expected = reference_run(
        RefRule("bsam", **hp), objective, P0, Q0, 6, lr=0.05, smooth=smooth, seed=3
    )
    closure = backward_closure(objective, P, Q)
    for ref_P, ref_Q in expected:
        opt.step(closure)
        for got, want in zip(P + Q, ref_P + ref_Q, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    state = opt.state_dict()["sharp_bilevel"]["rule_state"]
    assert sorted(state) == ["m", "s"]  # no transient entry (the prior term) left behind
    assert all(bool((s > 0).all()) for s in state["s"])


@pytest.mark.parametrize("rule", ["none", "asam", "gsam", "vasso", "looksam", "bsam"])
def test_centralize_option_matches_float64_reference(rule):
    """``centralize=True``: every rule sees gc(g) and gc(g'); "none" steps on gc(g)."""
    P, Q, objective = _problem()
    P0, Q0 = clones(P), clones(Q)
    hp = {"k": 2} if rule == "looksam" else {}
    opt = SharpBilevelOptimizer(
        _groups(P, Q), perturbation=rule, lr=0.05, momentum=0.9, centralize=True, seed=7, **hp
    )
    ref = RefRule(rule, centralize=True, **hp)
    expected = reference_run(ref, objective, P0, Q0, 5, lr=0.05, momentum=0.9, seed=7)
    plain = reference_run(RefRule(rule, **hp), objective, P0, Q0, 5, lr=0.05, momentum=0.9, seed=7)
    closure = backward_closure(objective, P, Q)
    for ref_P, ref_Q in expected:
        opt.step(closure)
        for got, want in zip(P + Q, ref_P + ref_Q, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    assert (expected[-1][0][0] - plain[-1][0][0]).abs().max() > 1e-6  # it changed something


def test_gcsam_is_sam_with_centralize():
    runs = []
    for kwargs in ({"perturbation": "gcsam"}, {"perturbation": "sam", "centralize": True}):
        P, Q, _ = _problem()
        objective = _problem()[2]
        opt = SharpBilevelOptimizer(_groups(P, Q), lr=0.05, momentum=0.9, **kwargs)
        for _ in range(4):
            opt.step(backward_closure(objective, P, Q))
        runs.append(clones(P + Q))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_bsam_noise_has_variance_one_over_n_s():
    """The first pass runs at phi + Delta with Var(Delta) = 1 / (N s): measured on many draws."""
    phi = torch.nn.Parameter(torch.zeros(20000, dtype=F64))
    opt = SharpBilevelOptimizer([phi], perturbation="bsam", lr=0.0, num_data=400.0, seed=1)
    opt._rule_state["s"] = [torch.full_like(phi, 4.0)]  # s = 4: Var = 1 / 1600
    seen = []

    def closure(ctx):
        if ctx.is_ascent:
            seen.append(phi.detach().clone())
        loss = (phi**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    var = float(seen[0].var())
    assert abs(var * 1600 - 1) < 0.05  # 20000 draws: the sample variance is within ~2%
    assert abs(float(seen[0].mean())) < 4 * (1 / 40) / 20000**0.5


def test_rules_really_differ_on_the_reference_problem():
    """Guard for the test above: the reference problem tells the rules apart."""
    P, Q, objective = _problem()
    finals = {}
    for rule in ALL_RULES:
        run = reference_run(
            RefRule(rule),
            objective,
            P,
            Q,
            5,
            lr=0.05,
            momentum=0.9,
            smooth=0.01 if rule == "ssam" else 0.0,
            seed=7,
        )
        finals[rule] = torch.cat([t.flatten() for t in run[-1][0]])
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (finals[a] - finals[b]).abs().max() > 1e-8, (a, b)


# ---------------------------------------------------------------------- 3. the gate
@pytest.mark.parametrize("rule", ALL_RULES)
def test_gate_skips_the_step_and_leaves_params_and_base_state_untouched(rule):
    P, Q, objective = _problem()
    opt = SharpBilevelOptimizer(
        _groups(P, Q), perturbation=rule, lr=0.05, momentum=0.9, **_rule_kwargs(rule)
    )
    closure = backward_closure(objective, P, Q)
    for _ in range(2):  # build momentum buffers
        opt.step(closure)
    before_params = clones(P + Q)
    before_state = copy.deepcopy(opt.state_dict())
    calls = []

    def counting(ctx):
        calls.append(ctx.phase)
        return closure(ctx)

    threshold = float(objective.loss(P, Q).detach()) * 0.5  # the loss is above it: skip
    seen_gate = []

    def gate(loss):
        seen_gate.append(float(loss.detach()))
        return loss > threshold

    returned = opt.step(counting, skip_if=gate)
    assert calls == ["ascent"]
    assert len(seen_gate) == 1
    assert float(returned.detach()) == seen_gate[0]
    assert all_equal(P + Q, before_params)
    assert opt.skipped_steps["gate"] == 1
    assert opt.skipped_steps["nonfinite"] == 0
    assert opt.last_step.skipped == "gate"
    assert opt.steps_taken == 2
    after_state = opt.state_dict()
    for key, buf in before_state["state"].items():
        for name, value in buf.items():
            assert torch.equal(after_state["state"][key][name], value), (key, name)
    assert after_state["state"].keys() == before_state["state"].keys()

    # a gate that says no lets the step through
    calls.clear()
    two = opt.perturbation.two_pass and opt.perturbation.wants_second_pass(opt._rule_state)
    opt.step(counting, skip_if=lambda loss: loss > 1e30)
    assert calls == (["ascent", "descent"] if two else ["ascent"])
    assert opt.skipped_steps["gate"] == 1
    assert opt.last_step.skipped is None
    assert opt.steps_taken == 3
    assert not all_equal(P, before_params[: len(P)])


# ---------------------------------------------------------------------- 4. closure forms
@pytest.mark.parametrize(
    ("rule", "smooth"), [("sam", 0.0), ("none", 0.0), ("sam", 0.1), ("ssam", None), ("none", 0.1)]
)
def test_one_argument_closure_receives_step_context(rule, smooth):
    P, Q, objective = _problem()
    options = {"keep": 5, "reuse": True}
    opt = SharpBilevelOptimizer(
        _groups(P, Q), perturbation=rule, lr=0.05, smooth=smooth, seed=1, closure_options=options
    )
    contexts: list[StepContext] = []
    closure = backward_closure(objective, P, Q)

    def recording(ctx):
        contexts.append(ctx)
        return closure(ctx)

    for _ in range(2):
        opt.step(recording)
    two_pass = rule != "none"
    smoothed = (smooth is None and rule == "ssam") or bool(smooth)
    per_step = 2 if two_pass else 1
    assert len(contexts) == 2 * per_step
    assert all(isinstance(c, StepContext) for c in contexts)
    phases = ["ascent", "descent"] if two_pass else ["ascent"]
    assert [c.phase for c in contexts] == phases * 2
    assert [c.step for c in contexts] == [0] * per_step + [1] * per_step
    assert all(c.two_pass is two_pass for c in contexts)
    assert all(c.smoothed is smoothed for c in contexts)
    assert all(dict(c.options) == options for c in contexts)
    with pytest.raises(TypeError):
        contexts[0].options["keep"] = 6
    assert contexts[0].is_ascent
    assert not contexts[0].is_descent
    if two_pass:
        assert contexts[1].is_descent


def test_scratch_lives_across_the_two_calls_of_one_step_only():
    P, Q, objective = _problem()
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation="sam", lr=0.05)
    closure = backward_closure(objective, P, Q)
    scratches, found = [], []

    def with_scratch(ctx):
        scratches.append(ctx.scratch)
        if ctx.is_ascent:
            found.append(dict(ctx.scratch))
            ctx.scratch["w_tau"] = ctx.step
        else:
            found.append(dict(ctx.scratch))
        return closure(ctx)

    opt.step(with_scratch)
    opt.step(with_scratch)
    assert scratches[0] is scratches[1]
    assert scratches[2] is scratches[3]
    assert scratches[1] is not scratches[2]
    assert found == [{}, {"w_tau": 0}, {}, {"w_tau": 1}]


def test_no_argument_closure_works():
    P, Q, objective = _problem()
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation="sam", lr=0.05)
    calls = []

    def closure():
        calls.append(1)
        loss = objective.loss(P, Q)
        loss.backward()
        return loss

    expected = reference_run(RefRule("sam"), objective, P, Q, 1, lr=0.05)
    opt.step(closure)
    assert len(calls) == 2
    for got, want in zip(P + Q, expected[0][0] + expected[0][1], strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_grad_by_assignment_equals_grad_by_backward(rule):
    P1, Q1, objective = _problem()
    P2, Q2 = (
        [torch.nn.Parameter(t.detach().clone()) for t in P1],
        [torch.nn.Parameter(t.detach().clone()) for t in Q1],
    )
    opt1 = SharpBilevelOptimizer(
        _groups(P1, Q1), perturbation=rule, lr=0.05, momentum=0.5, **_rule_kwargs(rule)
    )
    opt2 = SharpBilevelOptimizer(
        _groups(P2, Q2), perturbation=rule, lr=0.05, momentum=0.5, **_rule_kwargs(rule)
    )
    by_backward = backward_closure(objective, P1, Q1)

    def by_assignment():  # TESLA style: no backward() on the parameters
        with torch.no_grad():
            loss = objective.loss(P2, Q2)
        gp, gq = objective.grads(P2, Q2)
        for t, g in zip(P2 + Q2, gp + gq, strict=True):
            t.grad = g.to(t.dtype)
        return loss

    for _ in range(3):
        l1 = opt1.step(by_backward)
        l2 = opt2.step(by_assignment)
        torch.testing.assert_close(l1.detach(), l2, rtol=1e-13, atol=0)
        for a, b in zip(P1 + Q1, P2 + Q2, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
    assert not all_equal(P2, clones(_problem()[0]))


@pytest.mark.parametrize("bad_call", [0, 1])
def test_closure_returning_none_raises_type_error_and_restores(bad_call):
    P, Q, objective = _problem()
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation="sam", lr=0.05)
    before = clones(P + Q)
    calls = []

    def closure():
        calls.append(1)
        loss = objective.loss(P, Q)
        loss.backward()
        return None if len(calls) - 1 == bad_call else loss

    with pytest.raises(TypeError, match="None"):
        opt.step(closure)
    assert len(calls) == bad_call + 1
    assert all_equal(P + Q, before)
    assert opt.steps_taken == 0


@pytest.mark.parametrize("rule", ["sam", "none"])
def test_non_scalar_loss_raises_value_error_and_restores(rule):
    P, Q, objective = _problem()
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation=rule, lr=0.05)
    before = clones(P + Q)

    def closure():
        loss = objective.loss(P, Q)
        loss.backward()
        return torch.stack([loss, loss])

    with pytest.raises(ValueError, match="scalar"):
        opt.step(closure)
    assert all_equal(P + Q, before)


def test_grads_are_cleared_before_each_closure_call():
    P, Q, objective = _problem()
    P0, Q0 = clones(P), clones(Q)
    lr = 0.05
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation="sam", lr=lr)
    for t in P + Q:  # stale gradients from somewhere else
        t.grad = torch.full_like(t, 100.0)
    seen = []
    closure = backward_closure(objective, P, Q, seen)  # backward() without zeroing
    opt.step(closure)
    ascent, descent = seen
    g, gq = objective.grads(P0, Q0)
    for got, want in zip(ascent["gP"] + ascent["gQ"], g + gq, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    ga, gqa = objective.grads(descent["P"], descent["Q"])
    for got, want in zip(descent["gP"] + descent["gQ"], ga + gqa, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # the step used g' alone (not g + g')
    for t, t0, d in zip(P + Q, P0 + Q0, ga + gqa, strict=True):
        torch.testing.assert_close(t.detach(), t0 - lr * d, rtol=1e-12, atol=1e-14)


def test_step_without_closure_uses_existing_grads_with_none():
    """DESIGN/optimizer docstring: "none" without smoothing may omit the closure."""
    P, Q, objective = _problem()
    P0, Q0 = clones(P), clones(Q)
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation="none", lr=0.1)
    opt.zero_grad()
    objective.loss(P, Q).backward()
    opt.step()
    g, gq = objective.grads(P0, Q0)
    for t, t0, d in zip(P + Q, P0 + Q0, g + gq, strict=True):
        torch.testing.assert_close(t.detach(), t0 - 0.1 * d, rtol=1e-12, atol=1e-14)
    assert opt.steps_taken == 1


@pytest.mark.parametrize(("rule", "smooth"), [("sam", None), ("none", 0.1)])
def test_step_without_closure_is_rejected_when_two_calls_are_needed(rule, smooth):
    P, Q, objective = _problem()
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation=rule, smooth=smooth, lr=0.1)
    objective.loss(P, Q).backward()
    before = clones(P + Q)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    assert all_equal(P + Q, before)


# ---------------------------------------------------------------------- 5. param groups
@pytest.mark.parametrize("rule", TWO_PASS_RULES)
def test_unperturbed_group_is_stepped_with_descent_gradient_but_never_perturbed(rule):
    P, Q, objective = _problem()
    Q0 = clones(Q)
    lr = 0.05
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation=rule, lr=lr, **_rule_kwargs(rule))
    seen = []
    opt.step(backward_closure(objective, P, Q, seen))
    assert [s["phase"] for s in seen] == ["ascent", "descent"]
    for s in seen:
        assert all_equal(s["Q"], Q0)
    # the perturbed group was perturbed in the descent call
    assert not all_equal(seen[1]["P"], seen[0]["P"])
    gq_descent = seen[1]["gQ"]
    for q, q0, g in zip(Q, Q0, gq_descent, strict=True):
        assert torch.equal(q.detach(), q0.add(g, alpha=-lr))
        assert not torch.equal(q.detach(), q0.add(seen[0]["gQ"][0], alpha=-lr))


def test_per_group_learning_rates():
    P, Q, objective = _problem()
    P0, Q0 = clones(P), clones(Q)
    opt = SharpBilevelOptimizer(
        [
            {"params": [P[0]], "lr": 0.1},
            {"params": [P[1]], "lr": 0.01},
            {"params": Q, "perturb": False, "lr": 0.3},
        ],
        perturbation="sam",
        lr=1.0,
    )
    seen = []
    opt.step(backward_closure(objective, P, Q, seen))
    descent = seen[1]
    # eps uses the norm over both perturbed groups
    g, _ = objective.grads(P0, Q0)
    eps = [0.05 * gi / (set_norm(g) + XI) for gi in g]
    for seen_p, p0, e in zip(descent["P"], P0, eps, strict=True):
        torch.testing.assert_close(seen_p, p0 + e, rtol=1e-12, atol=1e-14)
    for t, t0, d, lr in zip(
        P + Q, P0 + Q0, descent["gP"] + descent["gQ"], (0.1, 0.01, 0.3), strict=True
    ):
        assert torch.equal(t.detach(), t0.add(d, alpha=-lr))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    P, Q, objective = _problem()
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation="sam", lr=0.05)
    opt.step(backward_closure(objective, P, Q))
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in P + Q)
    opt.zero_grad(set_to_none=set_to_none)
    for t in P + Q:
        if set_to_none:
            assert t.grad is None
        else:
            assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("scheduler", ["step", "lambda"])
@pytest.mark.parametrize("rule", ["sam", "none"])
def test_lr_schedulers_change_the_lr_of_the_base_step(scheduler, rule):
    P, Q, objective = _problem()
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation=rule, lr=0.2)
    if scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        expected_lr = [0.2 * 0.5**t for t in range(4)]
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        expected_lr = [0.2 / (1 + t) for t in range(4)]
    for t in range(4):
        seen = []
        before = clones(P + Q)
        opt.step(backward_closure(objective, P, Q, seen))
        last = seen[-1]
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(expected_lr[t], rel=1e-15)
        for p, p0, d in zip(P + Q, before, last["gP"] + last["gQ"], strict=True):
            assert torch.equal(p.detach(), p0.add(d, alpha=-expected_lr[t]))
        sched.step()


def test_gsam_rho_follows_the_scheduled_lr():
    P, Q, objective = _problem()
    hp = {"rho": 0.2, "rho_min": 0.02, "lr_min": 0.0, "lr_max": 0.4}
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation="gsam", lr=0.4, **hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.3 * t)
    for t in range(3):
        lr_t = 0.4 * (1.0 - 0.3 * t)
        seen = []
        P0 = clones(P)
        opt.step(backward_closure(objective, P, Q, seen))
        rho_t = 0.02 + (0.2 - 0.02) * (lr_t - 0.0) / (0.4 - 0.0)
        eps = [s - p0 for s, p0 in zip(seen[1]["P"], P0, strict=True)]
        torch.testing.assert_close(set_norm(eps), torch.tensor(rho_t, dtype=F64), rtol=1e-9, atol=0)
        sched.step()


def _sam_adam_reference(P0, Q0, objective, steps, rho, lr_p, lr_q):
    """SAM gradients computed in closed form, fed to a twin torch Adam."""
    P = [torch.nn.Parameter(p.clone()) for p in P0]
    Q = [torch.nn.Parameter(q.clone()) for q in Q0]
    adam = torch.optim.Adam([{"params": P}, {"params": Q, "lr": lr_q}], lr=lr_p)
    history = []
    for _ in range(steps):
        g, _ = objective.grads(P, Q)
        eps = [rho * gi / (set_norm(g) + XI) for gi in g]
        ga, gqa = objective.grads([p.detach() + e for p, e in zip(P, eps, strict=True)], Q)
        for t, d in zip(P + Q, ga + gqa, strict=True):
            t.grad = d
        adam.step()
        history.append(clones(P + Q))
    return history


@pytest.mark.parametrize("pass_params", [False, True])
def test_base_optimizer_instance_adam(pass_params):
    P, Q, objective = _problem()
    P0, Q0 = clones(P), clones(Q)
    adam = torch.optim.Adam([{"params": P}, {"params": Q, "lr": 0.03}], lr=0.1)
    if pass_params:
        params = [{"params": P}, {"params": Q, "perturb": False}]
        opt = SharpBilevelOptimizer(params, base_optimizer=adam, perturbation="sam", rho=0.05)
        assert [g["perturb"] for g in opt.param_groups] == [True, False]
    else:
        opt = SharpBilevelOptimizer(None, base_optimizer=adam, perturbation="sam", rho=0.05)
        assert [g["perturb"] for g in opt.param_groups] == [True, True]
    assert opt.base_optimizer is adam
    if pass_params:
        expected = _sam_adam_reference(P0, Q0, objective, 4, 0.05, 0.1, 0.03)
        for want in expected:
            seen = []
            opt.step(backward_closure(objective, P, Q, seen))
            assert all_equal(seen[1]["Q"], seen[0]["Q"])  # never perturbed
            for got, w in zip(P + Q, want, strict=True):
                torch.testing.assert_close(got.detach(), w, rtol=1e-10, atol=1e-12)
    else:
        seen = []
        opt.step(backward_closure(objective, P, Q, seen))
        # the second group is perturbed too: eps spans all tensors
        assert not all_equal(seen[1]["Q"], Q0)
        g, gq = objective.grads(P0, Q0)
        eps = [0.05 * t / (set_norm(g + gq) + XI) for t in g + gq]
        for s, t0, e in zip(seen[1]["P"] + seen[1]["Q"], P0 + Q0, eps, strict=True):
            torch.testing.assert_close(s, t0 + e, rtol=1e-12, atol=1e-14)
        assert len(adam.state) == 3


def test_base_optimizer_instance_rejects_kwargs_and_foreign_params():
    P, Q, _ = _problem()
    adam = torch.optim.Adam(P + Q, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        SharpBilevelOptimizer(None, base_optimizer=adam, lr=0.2)
    with pytest.raises(ValueError, match="momentum"):
        SharpBilevelOptimizer(None, base_optimizer=adam, momentum=0.9)
    with pytest.raises(ValueError, match="exactly the tensors"):
        SharpBilevelOptimizer(P, base_optimizer=adam)  # Q missing


@pytest.mark.parametrize(
    "base",
    [object(), "sgd", torch.nn.Linear, lambda params, **kw: None, dict, int],
    ids=["object", "string", "module_class", "function", "dict_type", "int_type"],
)
def test_base_optimizer_that_is_not_an_optimizer_raises_type_error(base):
    P, _, _ = _problem()
    with pytest.raises(TypeError, match="base_optimizer"):
        SharpBilevelOptimizer(P, base_optimizer=base)
    with pytest.raises(TypeError, match="base_optimizer"):
        SharpBilevelOptimizer(P, base_optimizer=base, lr=0.1)


def test_nonfinite_policy_is_validated():
    P, _, _ = _problem()
    with pytest.raises(ValueError, match="nonfinite") as info:
        SharpBilevelOptimizer(P, nonfinite="bogus", lr=0.1)
    assert "raise" in str(info.value)
    assert "skip" in str(info.value)
    for ok in ("raise", "skip"):
        assert SharpBilevelOptimizer(P, nonfinite=ok, lr=0.1).nonfinite == ok


@pytest.mark.parametrize("smooth", [-0.1, -1e-12, math.nan, math.inf])
def test_bad_smooth_is_rejected(smooth):
    P, _, _ = _problem()
    with pytest.raises(ValueError, match="smooth"):
        SharpBilevelOptimizer(P, perturbation="sam", smooth=smooth, lr=0.1)


@pytest.mark.parametrize("rule", TWO_PASS_RULES)
def test_two_pass_rule_needs_a_perturbed_group(rule):
    P, Q, _ = _problem()
    with pytest.raises(ValueError, match="perturb"):
        SharpBilevelOptimizer([{"params": P + Q, "perturb": False}], perturbation=rule, lr=0.1)


def test_none_accepts_only_unperturbed_groups():
    P, Q, objective = _problem()
    P0, Q0 = clones(P), clones(Q)
    opt = SharpBilevelOptimizer([{"params": P + Q, "perturb": False}], perturbation="none", lr=0.1)
    opt.step(backward_closure(objective, P, Q))
    g, gq = objective.grads(P0, Q0)
    for t, t0, d in zip(P + Q, P0 + Q0, g + gq, strict=True):
        torch.testing.assert_close(t.detach(), t0 - 0.1 * d, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("perturb", [True, False])
def test_add_param_group(perturb):
    P, Q, objective = _problem()
    extra = torch.nn.Parameter(torch.tensor([0.7, -0.4], dtype=F64))
    opt = SharpBilevelOptimizer([{"params": P}], perturbation="sam", lr=0.05, momentum=0.9)
    opt.step(backward_closure(objective, P, []))
    opt.add_param_group({"params": [*Q, extra], "perturb": perturb, "lr": 0.2})
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["perturb"] is perturb
    assert opt.param_groups[1]["momentum"] == 0.9
    assert opt.base_optimizer.param_groups is opt.param_groups
    before = clones(P + Q + [extra])
    seen_extra = []

    def closure():
        seen_extra.append(extra.detach().clone())
        loss = objective.loss(P, Q) + (extra**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert (not torch.equal(seen_extra[1], before[-1])) is perturb
    assert torch.equal(seen_extra[0], before[-1])
    # stepped by the base optimizer with the group's lr (first step: buf = g)
    if not perturb:
        assert torch.equal(extra.detach(), before[-1].add(2 * seen_extra[1], alpha=-0.2))
    else:
        assert not torch.equal(extra.detach(), before[-1])
    assert len(opt.state) == len(P) + len(Q) + 1


# ---------------------------------------------------------------------- 6. dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", ALL_RULES)
def test_every_rule_in_float32_and_float64(rule, dtype):
    P, Q, objective = _problem(dtype)
    P0, Q0 = clones(P), clones(Q)
    opt = SharpBilevelOptimizer(
        _groups(P, Q), perturbation=rule, lr=0.05, momentum=0.9, **_rule_kwargs(rule)
    )
    expected = reference_run(
        RefRule(rule),
        objective,
        P0,
        Q0,
        3,
        lr=0.05,
        momentum=0.9,
        smooth=0.01 if rule == "ssam" else 0.0,
        seed=7,
    )
    closure = backward_closure(objective, P, Q)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    if rule == "looksam" and dtype == torch.float32:
        # g_v = g' - proj_g(g') cancels when g' is close to g: its float32 error is about
        # eps32 ||g'|| / ||g_v||, and the one-pass steps scale g_v up by ||g|| / ||g_v||
        tol = {"rtol": 5e-2, "atol": 1e-4}
    for ref_P, ref_Q in expected:
        opt.step(closure)
        for got, want in zip(P + Q, ref_P + ref_Q, strict=True):
            assert got.dtype == dtype
            assert got.grad.dtype == dtype
            torch.testing.assert_close(got.detach().to(F64), want, **tol)
    for buf in opt.state.values():
        assert buf["momentum_buffer"].dtype == dtype
    # restoration is exact in this dtype: an lr = 0 step leaves every bit in place
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = clones(P + Q)
    seen = []
    two = opt.perturbation.two_pass and opt.perturbation.wants_second_pass(opt._rule_state)
    opt.step(backward_closure(objective, P, Q, seen))
    assert all_equal(P + Q, before)
    assert len(seen) == (2 if two else 1)
    if two:
        assert not all_equal(seen[1]["P"], before[: len(P)])


# ---------------------------------------------------------------------- 7. smoothing
def _smoothing_params(dtype):
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(5, 3, 4, 4, generator=gen, dtype=dtype)
    images[2] = 0.0  # a zero sample
    images[4] *= 100.0
    return [
        images,
        torch.randn(6, generator=gen, dtype=dtype),  # 1-d: each element a sample
        torch.tensor(-2.5, dtype=dtype),  # 0-d: one sample
        torch.randn(3, 7, generator=gen, dtype=dtype),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smoothing_noise_matches_hand_written_construction(dtype):
    params = _smoothing_params(dtype)
    gamma = 0.3
    got = smoothing_noise(params, gamma, torch.Generator().manual_seed(5))
    want = ref_noise(params, gamma, torch.Generator().manual_seed(5))
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
    for g, w, p in zip(got, want, params, strict=True):
        assert g.dtype == dtype
        assert g.shape == p.shape
        torch.testing.assert_close(g.to(F64), w, **tol)
    assert torch.equal(got[0][2], torch.zeros_like(got[0][2]))  # zero sample: no noise
    # same seed, same noise; another seed, other noise
    again = smoothing_noise(params, gamma, torch.Generator().manual_seed(5))
    other = smoothing_noise(params, gamma, torch.Generator().manual_seed(6))
    assert all_equal(got, again)
    assert not torch.equal(got[0], other[0])


def test_smoothing_noise_statistics():
    """Per sample: mean ~0 and E||Delta_j||^2 = gamma^2 ||phi_j||^2, whatever the sample's scale."""
    gen = torch.Generator().manual_seed(0)
    n, d, gamma = 2000, 50, 0.2
    scales = torch.where(torch.arange(n) % 2 == 0, 1e-3, 1e3).to(F64)
    phi = torch.randn(n, d, generator=gen, dtype=F64) * scales[:, None]
    phi = phi + 0.5 * scales[:, None]  # non-zero mean per sample: noise must not follow it
    (delta,) = smoothing_noise([phi], gamma, torch.Generator().manual_seed(1))
    ratio = (delta**2).sum(dim=1) / (gamma**2 * (phi**2).sum(dim=1))  # chi2_d / d per sample
    for half in (ratio[0::2], ratio[1::2]):  # each scale separately: sd of the mean ~ 0.0063
        assert abs(float(half.mean()) - 1.0) < 0.04
    standardized = delta / (gamma * phi.norm(dim=1, keepdim=True) / math.sqrt(d))  # ~ N(0, 1)
    assert abs(float(standardized.mean())) < 0.02  # sd ~ 0.0045
    assert abs(float(standardized.var()) - 1.0) < 0.03
    # per-sample means are centred: their spread is that of an average of d normals
    sample_means = standardized.mean(dim=1)
    assert abs(float(sample_means.var()) * d - 1.0) < 0.15


def _smooth_problem():
    gen = torch.Generator().manual_seed(21)
    images = torch.randn(4, 2, 3, generator=gen, dtype=F64)
    images[1] = 0.0
    P = [torch.nn.Parameter(images), torch.nn.Parameter(torch.randn(5, generator=gen, dtype=F64))]
    Q = [torch.nn.Parameter(torch.tensor([0.4], dtype=F64))]
    objective = Objective([torch.randn(p.shape, generator=gen, dtype=F64) for p in P])
    return P, Q, objective


@pytest.mark.parametrize("rule", ["sam", "asam"])
def test_smoothing_first_call_at_phi_plus_delta_descent_at_phi_plus_eps(rule):
    P, Q, objective = _smooth_problem()
    P0, Q0 = clones(P), clones(Q)
    gamma, seed, rho = 0.5, 123, 0.1
    opt = SharpBilevelOptimizer(
        _groups(P, Q), perturbation=rule, rho=rho, smooth=gamma, seed=seed, lr=0.0
    )
    seen = []
    opt.step(backward_closure(objective, P, Q, seen))
    ascent, descent = seen
    delta = ref_noise(P0, gamma, torch.Generator().manual_seed(seed))
    for s, p0, dl in zip(ascent["P"], P0, delta, strict=True):
        torch.testing.assert_close(s, p0 + dl, rtol=1e-12, atol=1e-14)
    assert torch.equal(ascent["P"][0][1], torch.zeros_like(P0[0][1]))  # zero sample unchanged
    assert all_equal(ascent["Q"], Q0)
    assert not torch.equal(ascent["P"][1], P0[1])

    g, _ = objective.grads([p + dl for p, dl in zip(P0, delta, strict=True)], Q0)
    g_clean, _ = objective.grads(P0, Q0)
    if rule == "sam":
        eps = [rho * gi / (set_norm(g) + XI) for gi in g]
        other = [rho * gi / (set_norm(g_clean) + XI) for gi in g_clean]
    else:  # ASAM: T from the restored phi, gradient from phi + Delta
        T = [p.abs() + 0.01 for p in P0]
        n = set_norm([t * gi for t, gi in zip(T, g, strict=True)])
        eps = [rho * t * t * gi / (n + XI) for t, gi in zip(T, g, strict=True)]
        T_bad = [(p + dl).abs() + 0.01 for p, dl in zip(P0, delta, strict=True)]
        n_bad = set_norm([t * gi for t, gi in zip(T_bad, g, strict=True)])
        other = [rho * t * t * gi / (n_bad + XI) for t, gi in zip(T_bad, g, strict=True)]
    for s, p0, e in zip(descent["P"], P0, eps, strict=True):
        torch.testing.assert_close(s, p0 + e, rtol=1e-12, atol=1e-14)
    # the alternative (wrong) construction is far from what the closure saw
    gap = max(
        float((s - p0 - o).abs().max()) for s, p0, o in zip(descent["P"], P0, other, strict=True)
    )
    assert gap > 1e-4
    # Delta and eps are both gone: lr = 0 leaves the parameters bit-identical
    assert all_equal(P + Q, P0 + Q0)


def test_smoothing_same_seed_same_noise_and_new_noise_each_step():
    def first_calls(seed, steps=2):
        P, Q, objective = _smooth_problem()
        opt = SharpBilevelOptimizer(_groups(P, Q), perturbation="ssam", seed=seed, lr=0.0)
        seen = []
        for _ in range(steps):
            opt.step(backward_closure(objective, P, Q, seen))
        return [s["P"] for s in seen if s["phase"] == "ascent"], clones(P)

    a, P0 = first_calls(3)
    b, _ = first_calls(3)
    c, _ = first_calls(4)
    assert all(all_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all_equal(a[0], c[0])
    # step 2 draws anew from the same generator (the parameters did not move: lr = 0)
    assert not all_equal(a[0], a[1])
    gen = torch.Generator().manual_seed(3)
    first = ref_noise(P0, 0.01, gen)
    second = ref_noise(P0, 0.01, gen)
    for s, p0, dl in zip(a[1], P0, second, strict=True):
        torch.testing.assert_close(s, p0 + dl, rtol=1e-12, atol=1e-15)
    for s, p0, dl in zip(a[0], P0, first, strict=True):
        torch.testing.assert_close(s, p0 + dl, rtol=1e-12, atol=1e-15)


def test_smoothing_applies_to_perturbed_groups_only_and_none_rule_steps_on_smoothed_grad():
    P, Q, objective = _smooth_problem()
    P0, Q0 = clones(P), clones(Q)
    opt = SharpBilevelOptimizer(_groups(P, Q), perturbation="none", smooth=0.3, seed=9, lr=0.1)
    seen = []
    opt.step(backward_closure(objective, P, Q, seen))
    (only,) = seen
    assert all_equal(only["Q"], Q0)
    delta = ref_noise(P0, 0.3, torch.Generator().manual_seed(9))
    smoothed = [p + dl for p, dl in zip(P0, delta, strict=True)]
    for s, w in zip(only["P"], smoothed, strict=True):
        torch.testing.assert_close(s, w, rtol=1e-12, atol=1e-14)
    g, gq = objective.grads(smoothed, Q0)
    for t, t0, d in zip(P + Q, P0 + Q0, g + gq, strict=True):
        torch.testing.assert_close(t.detach(), t0 - 0.1 * d, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rule", ["none", "sam"])
def test_step_returns_the_first_loss_detached(rule: str) -> None:
    phi = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    opt = SharpBilevelOptimizer([phi], perturbation=rule, lr=0.1)

    def closure():
        loss = (phi**2).sum()
        loss.backward()
        return loss

    returned = opt.step(closure)
    assert returned.grad_fn is None
    assert not returned.requires_grad
    assert float(returned) == 5.0  # F(phi) at the pre-step point


def test_smooth_per_element_is_the_relative_form_scaled_by_sqrt_d() -> None:
    """SATM's paper convention: gamma_relative = sqrt(d_j) * gamma_per_element."""
    images = torch.randn(3, 2, 4, 4, dtype=F64)
    d = 2 * 4 * 4
    a = smoothing_noise([images], 0.01, torch.Generator().manual_seed(5), per_element=True)
    b = smoothing_noise([images], 0.01 * d**0.5, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=0)
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    norms = images.reshape(3, -1).norm(dim=1).reshape(3, 1, 1, 1)
    torch.testing.assert_close(a[0], 0.01 * norms * z, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="smooth_per_element"):
        SharpBilevelOptimizer([torch.nn.Parameter(images)], smooth_per_element=1, lr=0.1)
