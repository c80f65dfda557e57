"""Autocast inside the unroll (bf16 on CPU) and a GradScaler through trajectory matching."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from sharp_bilevel import SharpBilevelOptimizer, StepContext, TrajectoryMatching, UnrollSettings
from sharp_bilevel.trajectory.augment import DSA
from sharp_bilevel.trajectory.matching import autocast_dtype

CLASSES, N_SYN, STEPS = 4, 8, 6


def convnet(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.GroupNorm(8, 8),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, CLASSES),
        )


class Problem32:
    """A float32 distillation problem (the dtype mixed precision keeps as master values)."""

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.net = convnet(seed)
        self.images = torch.randn(N_SYN, 1, 8, 8, generator=gen).requires_grad_(True)
        self.syn_lr = torch.tensor(0.05, requires_grad=True)
        self.labels = torch.arange(N_SYN) % CLASSES
        self.start = torch.cat([p.detach().reshape(-1) for p in self.net.parameters()])
        self.target = self.start + 0.02 * torch.randn(self.start.shape, generator=gen)

    def objective(self, autocast: object = None, seed: int = 0) -> TrajectoryMatching:
        return TrajectoryMatching(
            self.net,
            self.images,
            self.syn_lr,
            self.labels,
            expert_start=self.start,
            expert_target=self.target,
            syn_steps=STEPS,
            batch_syn=6,
            augmentation=DSA(),
            seed=seed,
            autocast=autocast,  # type: ignore[arg-type]
        )


def hypergradient(problem: Problem32, settings: UnrollSettings, autocast: object) -> list[Tensor]:
    """Image and lr gradients of one two-pass-free evaluation (the ascent pass of a step)."""
    for t in (problem.images, problem.syn_lr):
        t.grad = None
    ctx = StepContext("ascent", 0, two_pass=True, smoothed=False, scratch={})
    objective = problem.objective(autocast)
    objective.settings = settings
    objective(ctx)
    assert problem.images.grad is not None
    assert problem.syn_lr.grad is not None
    return [problem.images.grad.clone(), problem.syn_lr.grad.clone()]


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()))


@pytest.mark.parametrize(
    "settings", [UnrollSettings(), UnrollSettings.satm(keep=2)], ids=["mtt-exact", "satm"]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_hypergradient_is_close_to_the_float32_one(
    settings: UnrollSettings, seed: int
) -> None:
    """bfloat16 keeps 8 significand bits (unit roundoff 2^-9 = 2e-3). Each conv/linear rounds
    its inputs to bf16 and accumulates in float32, so one inner gradient carries a relative
    error of a few 1e-3; the image hypergradient (a second derivative through N = 6 steps)
    compounds it: measured over seeds 0-5, relative error 0.9% to 3.3% and cosine >= 0.9994
    (the lr gradient: <= 0.22%). The bounds allow about 3x that (relative error 0.1, cosine
    0.997, lr 1%); dropping the Hessian chains (TUH here) gives cosine 0.8 and fails them.
    """
    problem = Problem32(seed)
    fp32 = hypergradient(problem, settings, None)
    bf16 = hypergradient(problem, settings, torch.bfloat16)
    images32, images16 = fp32[0], bf16[0]
    assert images16.dtype == torch.float32  # master values and their gradients stay float32
    assert not torch.equal(images16, images32)  # autocast really ran in bf16
    assert cosine(images16, images32) >= 0.997
    assert float((images16 - images32).norm() / images32.norm()) <= 0.1
    assert float(abs(bf16[1] - fp32[1]) / abs(fp32[1])) <= 0.01  # the lr gradient


def test_autocast_names_are_checked() -> None:
    assert autocast_dtype("bf16") is torch.bfloat16
    assert autocast_dtype("float16") is torch.float16
    assert autocast_dtype("off") is None
    with pytest.raises(ValueError, match=r"autocast must be torch\.bfloat16, torch\.float16"):
        autocast_dtype("int8")


def test_sam_with_a_grad_scaler_through_the_objective_equals_the_unscaled_step() -> None:
    """The closure back-propagates ``ctx.scale(loss)`` in both passes (a power of two): the
    result is bit-identical to the run without a scaler, for SATM with TR and the
    first-order lr."""
    finals = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**14)):
        problem = Problem32(5)
        opt = SharpBilevelOptimizer(
            [
                {"params": [problem.images]},
                {"params": [problem.syn_lr], "perturb": False, "lr": 1e-4},
            ],
            perturbation="ssam",
            rho=0.05,
            smooth=0.01,
            seed=1,
            lr=10.0,
            grad_scaler=scaler,
            closure_options={"unroll": UnrollSettings.satm(keep=2)},
        )
        for step in range(3):
            opt.step(problem.objective(seed=step))
        finals.append([problem.images.detach().clone(), problem.syn_lr.detach().clone()])
    for a, b in zip(*finals, strict=True):
        assert torch.equal(a, b)


def test_bf16_sam_step_runs_and_keeps_float32_master_values() -> None:
    problem = Problem32(6)
    opt = SharpBilevelOptimizer(
        [
            {"params": [problem.images]},
            {"params": [problem.syn_lr], "perturb": False, "lr": 1e-4},
        ],
        perturbation="sam",
        lr=10.0,
    )
    start = problem.images.detach().clone()
    opt.step(problem.objective(torch.bfloat16))
    assert problem.images.dtype == torch.float32
    assert opt.last_step is not None
    assert opt.last_step.perturbed_loss is not None
    assert not torch.equal(problem.images.detach(), start)
