"""Checkpointed unrolling: exact BPTT (to 1e-12 in float64) with segment recomputation."""

from __future__ import annotations

import pytest
import torch
from tesla_memory import peak_saved_bytes
from test_trajectory_matching import STEPS, Problem, library_grads
from torch import Tensor

from sharp_bilevel import SharpBilevelOptimizer, StepContext
from sharp_bilevel.trajectory.checkpointed import segment_starts
from sharp_bilevel.trajectory.hypergradient import UnrollSettings
from sharp_bilevel.trajectory.matching import TrajectoryMatching


def close(a: list[Tensor], b: list[Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)


def objective(problem: Problem, settings: UnrollSettings, steps: int = STEPS) -> TrajectoryMatching:
    return problem.closure(settings, seed=11, syn_steps=steps)


@pytest.mark.parametrize("segment", [1, 2, 3, None, STEPS])
@pytest.mark.parametrize("soft", [False, True])
def test_checkpointed_equals_exact_bptt(segment: int | None, soft: bool) -> None:
    """DSA on, batch_syn < n: every recomputed segment must replay its minibatches and draws."""
    problem = Problem(31, soft=soft)
    exact = library_grads(objective(problem, UnrollSettings()), problem.leaves())
    settings = UnrollSettings(hypergradient="checkpointed", segment=segment)
    ours = library_grads(objective(problem, settings), problem.leaves())
    close(ours, exact)


@pytest.mark.parametrize(("keep", "lr_gradient"), [(4, "exact"), (5, "first_order")])
def test_checkpointed_with_truncation_and_reuse_equals_the_plain_unroll(
    keep: int, lr_gradient: str
) -> None:
    """TUH (checkpoint the kept steps only) and TR (the descent pass restarts at tau)."""
    problem = Problem(32, soft=True)
    results = []
    for mode in ("bptt", "checkpointed"):
        settings = UnrollSettings(
            keep=keep, reuse=True, lr_gradient=lr_gradient, hypergradient=mode
        )
        closure = objective(problem, settings)
        scratch: dict[str, object] = {}
        ascent = StepContext("ascent", 0, two_pass=True, smoothed=False, scratch=scratch)
        first = library_grads(closure, problem.leaves(), ascent)
        with torch.no_grad():
            problem.images.add_(0.01)
        descent = StepContext("descent", 0, two_pass=True, smoothed=False, scratch=scratch)
        second = library_grads(closure, problem.leaves(), descent)
        with torch.no_grad():
            problem.images.sub_(0.01)
        results.append(first + second)
    close(results[1], results[0])


def test_checkpointed_sam_steps_through_the_optimizer_equal_bptt_steps() -> None:
    finals = []
    for mode in ("bptt", "checkpointed"):
        problem = Problem(33)
        opt = SharpBilevelOptimizer(
            [
                {"params": [problem.images]},
                {"params": [problem.syn_lr], "perturb": False, "lr": 1e-4},
            ],
            perturbation="sam",
            rho=0.1,
            lr=5.0,
            momentum=0.5,
            closure_options={"unroll": UnrollSettings(hypergradient=mode)},
        )
        for _ in range(3):
            opt.step(objective(problem, None))  # type: ignore[arg-type]
        finals.append([problem.images.detach().clone(), problem.syn_lr.detach().clone()])
    close(finals[1], finals[0])


def test_checkpointed_memory_is_a_fraction_of_bptts() -> None:
    problem = Problem(34, dsa=False)
    steps = 16
    bptt = peak_saved_bytes(objective(problem, UnrollSettings(), steps))
    ours = peak_saved_bytes(objective(problem, UnrollSettings(hypergradient="checkpointed"), steps))
    # one segment of ceil(sqrt(16)) = 4 steps alive instead of 16 (plus the cotangent step)
    assert ours <= 0.4 * bptt


def test_segment_starts_and_bad_settings() -> None:
    assert segment_starts(0, 10, None) == [0, 4, 8]
    assert segment_starts(4, 10, 2) == [4, 6, 8]
    with pytest.raises(ValueError, match="segment must be an int >= 1"):
        UnrollSettings(hypergradient="checkpointed", segment=0)
    with pytest.raises(ValueError, match="segment is a setting of hypergradient='checkpointed'"):
        UnrollSettings(segment=3)
    problem = Problem(35)
    closure = objective(problem, UnrollSettings(hypergradient="checkpointed"))
    closure.match_step = "closest"
    with pytest.raises(ValueError, match="does not support match_step='closest'"):
        closure()
