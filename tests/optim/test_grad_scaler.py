"""A GradScaler in the two-pass step: exact unscaling, one update per step, overflow skips."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _helpers import Objective, all_equal, backward_closure, clones, nested_equal

from sharp_bilevel import SharpBilevelOptimizer

F32 = torch.float32


def problem(seed: int = 0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    P = [
        torch.nn.Parameter(torch.randn(3, 2, generator=gen)),
        torch.nn.Parameter(torch.randn(4, generator=gen)),
    ]
    Q = [torch.nn.Parameter(0.3 * torch.randn(2, generator=gen))]
    objective = Objective([torch.randn(p.shape, generator=gen) for p in P])
    return P, Q, objective


def scaled_closure(objective: Objective, P, Q, poison: dict | None = None):  # type: ignore[no-untyped-def]
    """Back-propagates ``ctx.scale(loss)``; ``poison`` = {"phase": ..., "step": ...} puts an
    inf into that pass's gradient (an overflow of the scaled loss)."""

    def closure(ctx):  # type: ignore[no-untyped-def]
        loss = objective.loss(P, Q)
        ctx.scale(loss).backward()
        if poison and ctx.phase == poison["phase"] and ctx.step == poison["step"]:
            P[0].grad[0, 0] = math.inf
        return loss

    return closure


def build(P, Q, scaler=None, **kwargs):  # type: ignore[no-untyped-def]
    return SharpBilevelOptimizer(
        [{"params": P}, {"params": Q, "perturb": False}],
        perturbation=kwargs.pop("perturbation", "sam"),
        lr=0.05,
        momentum=0.9,
        grad_scaler=scaler,
        **kwargs,
    )


@pytest.mark.parametrize("rule", ["sam", "gsam", "looksam", "none"])
def test_a_scaled_run_equals_the_unscaled_one_bit_for_bit(rule: str) -> None:
    """The scale is a power of two, so scaling and unscaling are exact."""
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)):
        P, Q, objective = problem()
        opt = build(P, Q, scaler, perturbation=rule)
        seen = []
        for _ in range(6):
            opt.step(scaled_closure(objective, P, Q))
            seen.append(opt.last_step)
        runs.append((clones(P + Q), seen))
    assert all_equal(runs[0][0], runs[1][0])
    assert [r.loss for r in runs[0][1]] == [r.loss for r in runs[1][1]]


@pytest.mark.parametrize("phase", ["ascent", "descent"])
def test_an_overflow_in_either_pass_skips_the_step_and_backs_off_once(phase: str) -> None:
    P, Q, objective = problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=100)
    opt = build(P, Q, scaler, perturbation="vasso")
    opt.step(scaled_closure(objective, P, Q))  # one normal step: momentum and rule state exist
    before, state = clones(P + Q), copy.deepcopy(opt.state_dict())  # not live references
    opt.step(scaled_closure(objective, P, Q, {"phase": phase, "step": 1}))
    assert opt.last_step is not None
    assert opt.last_step.skipped == "nonfinite"
    assert opt.skipped_steps["nonfinite"] == 1
    assert all_equal(P + Q, before)  # exactly pre-step
    after = opt.state_dict()
    assert nested_equal(
        {k: v for k, v in after.items() if k != "sharp_bilevel"},
        {k: v for k, v in state.items() if k != "sharp_bilevel"},
    )  # the base optimizer's state did not move
    assert nested_equal(after["sharp_bilevel"]["rule_state"], state["sharp_bilevel"]["rule_state"])
    assert scaler.get_scale() == 2.0**11  # backed off exactly once
    assert all(p.grad is None for p in P + Q)
    opt.step(scaled_closure(objective, P, Q))  # and the next step is a normal one
    assert opt.last_step.skipped is None
    assert scaler.get_scale() == 2.0**11


def test_the_overflow_skips_even_with_nonfinite_raise() -> None:
    P, Q, objective = problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = build(P, Q, scaler, nonfinite="raise")
    opt.step(scaled_closure(objective, P, Q, {"phase": "descent", "step": 0}))
    assert opt.skipped_steps["nonfinite"] == 1


def test_resume_with_the_scaler_is_bit_identical() -> None:
    def make():  # type: ignore[no-untyped-def]
        P, Q, objective = problem(3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        return P, Q, objective, scaler, build(P, Q, scaler, perturbation="asam")

    P, Q, objective, scaler, opt = make()
    poison = {"phase": "descent", "step": 1}
    for _ in range(3):
        opt.step(scaled_closure(objective, P, Q, poison))
    saved, params = copy.deepcopy(opt.state_dict()), clones(P + Q)
    assert "grad_scaler" in saved["sharp_bilevel"]
    scales = [scaler.get_scale()]
    for _ in range(4):
        opt.step(scaled_closure(objective, P, Q))
        scales.append(scaler.get_scale())
    straight, straight_scale = clones(P + Q), scaler.get_scale()

    P2, Q2, objective2, scaler2, opt2 = make()
    with torch.no_grad():
        for t, v in zip(P2 + Q2, params, strict=True):
            t.copy_(v)
    opt2.load_state_dict(saved)
    assert scaler2.get_scale() == saved["sharp_bilevel"]["grad_scaler"]["scale"]
    for _ in range(4):
        opt2.step(scaled_closure(objective2, P2, Q2))
    assert all_equal(P2 + Q2, straight)
    assert scaler2.get_scale() == straight_scale
    assert len(set(scales)) > 1  # the scale moved during the resumed part


def test_bad_scaler_and_missing_closure_are_refused() -> None:
    P, Q, _ = problem()
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch\.amp\.GradScaler"):
        build(P, Q, scaler=object())
    opt = build(P, Q, torch.amp.GradScaler("cpu"), perturbation="none")
    with pytest.raises(ValueError, match="needs a closure with a grad_scaler"):
        opt.step()


def test_a_plain_closure_can_scale_with_the_scaler_itself() -> None:
    """A closure without arguments scales with ``opt.grad_scaler.scale(loss)``."""
    P, Q, objective = problem()
    reference = problem()
    plain = build(reference[0], reference[1])
    plain.step(backward_closure(reference[2], reference[0], reference[1]))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    opt = build(P, Q, scaler)

    def closure():  # type: ignore[no-untyped-def]
        loss = objective.loss(P, Q)
        scaler.scale(loss).backward()
        return loss

    opt.step(closure)
    assert all_equal(P + Q, reference[0] + reference[1])
