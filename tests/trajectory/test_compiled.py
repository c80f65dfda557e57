"""The compiled inner step: the same gradients as the eager one, compiled once per shape."""

from __future__ import annotations

import pytest
import torch
from test_trajectory_matching import Problem, library_grads

from sharp_bilevel import SharpBilevelOptimizer
from sharp_bilevel.trajectory.compiled import _CACHE
from sharp_bilevel.trajectory.hypergradient import UnrollSettings
from sharp_bilevel.trajectory.matching import TrajectoryMatching

# torch.compile's own machinery warns (torch.jit.script_method is deprecated) while compiling
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def objective(
    problem: Problem, settings: UnrollSettings | None, compile_inner: bool, seed: int = 4
) -> TrajectoryMatching:
    return problem.closure(settings, seed=seed, compile_inner=compile_inner)


@pytest.mark.parametrize(
    "settings",
    [
        UnrollSettings(keep=2, lr_gradient="first_order"),
        UnrollSettings.tesla(),
        UnrollSettings(hypergradient="checkpointed", keep=4),
    ],
    ids=["tuh", "tesla", "checkpointed"],
)
def test_compiled_steps_give_the_eager_gradients_in_float64(settings: UnrollSettings) -> None:
    problem = Problem(41, soft=True)  # DSA on: the augmentation runs before the compiled part
    eager = library_grads(objective(problem, settings, False), problem.leaves())
    compiled = library_grads(objective(problem, settings, True), problem.leaves())
    assert _CACHE.get(problem.net)  # the compiled path ran (and is cached for the network)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_outer_steps_do_not_recompile() -> None:
    """After the first outer step the compiled function is reused: no new graphs, no silent
    fallback to eager (the plan's two batch sizes, 4 and 2, are compiled on the first step)."""
    from torch._dynamo.utils import counters

    problem = Problem(42)
    opt = SharpBilevelOptimizer(
        [{"params": [problem.images]}, {"params": [problem.syn_lr], "perturb": False, "lr": 1e-4}],
        perturbation="sam",
        lr=1.0,
        closure_options={"unroll": UnrollSettings(keep=2)},
    )
    opt.step(objective(problem, None, True, seed=0))
    graphs = counters["stats"]["unique_graphs"]
    for seed in range(1, 4):
        opt.step(objective(problem, None, True, seed=seed))
    assert counters["stats"]["unique_graphs"] == graphs


def test_networks_with_buffers_are_refused() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten())
    net = torch.nn.Sequential(*net, torch.nn.Linear(2 * 6 * 6, 3)).double()
    problem = Problem(43)
    problem.net = net
    problem.start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    problem.target = problem.start + 0.01
    with pytest.raises(ValueError, match="compile_inner supports networks without buffers"):
        objective(problem, UnrollSettings(keep=2), True)()


def test_a_compiled_network_is_driven_through_its_original_module() -> None:
    problem = Problem(44)
    eager = library_grads(objective(problem, UnrollSettings(keep=2), False), problem.leaves())
    problem.net = torch.compile(problem.net)
    with pytest.warns(UserWarning, match="pass compile_inner=True"):
        closure = objective(problem, UnrollSettings(keep=2), False)
    for a, b in zip(library_grads(closure, problem.leaves()), eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_inside_saved_tensor_hooks_the_eager_step_is_used() -> None:
    """torch.func refuses saved-tensor hooks (activation offloading, memory meters): the
    compiled path steps aside for the eager one, with the same gradients."""
    problem = Problem(45)
    eager = library_grads(objective(problem, UnrollSettings(keep=2), False), problem.leaves())
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        hooked = library_grads(objective(problem, UnrollSettings(keep=2), True), problem.leaves())
    for a, b in zip(hooked, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_steps_agree_to_1e_6_in_float32(seed: int) -> None:
    """float32: the compiler reorders sums, so agreement is to rounding, not bitwise (measured
    2e-7 relative here; the bound is the issue's 1e-6)."""
    from test_mixed_precision import Problem32

    problem = Problem32(seed)
    grads = []
    for compile_inner in (False, True):
        closure = problem.objective(seed=0)
        closure.settings = UnrollSettings(keep=2, lr_gradient="first_order")
        closure.compile_inner = compile_inner
        grads.append(library_grads(closure, [problem.images, problem.syn_lr]))
    for a, b in zip(grads[1], grads[0], strict=True):
        assert float((a - b).norm() / b.norm()) <= 1e-6
