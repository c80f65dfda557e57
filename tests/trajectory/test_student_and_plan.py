"""FunctionalStudent, StepPlan and the SATM preset's cost structure."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from sharp_bilevel import SmoothedSAM, StepContext
from sharp_bilevel.distill.networks import get_network
from sharp_bilevel.trajectory.hypergradient import UnrollSettings
from sharp_bilevel.trajectory.matching import TrajectoryMatching
from sharp_bilevel.trajectory.presets import satm_optimizer
from sharp_bilevel.trajectory.step_plan import StepPlan
from sharp_bilevel.trajectory.student import FunctionalStudent


def test_flatten_follows_parameters_order_like_mtt_buffers() -> None:
    net = get_network("ConvNet", 1, 10, (8, 8), width=8, seed=0)
    student = FunctionalStudent(net)
    snapshot = [p.detach().clone() for p in net.parameters()]  # one MTT buffer epoch
    flat = student.flatten(snapshot)
    assert torch.equal(flat, torch.cat([p.reshape(-1) for p in snapshot]))
    views = student.unflatten(flat)
    assert list(views) == [name for name, _ in net.named_parameters()]
    for (name, p), view in zip(net.named_parameters(), views.values(), strict=True):
        assert torch.equal(view, p.detach()), name
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(student(x, flat), net(x))


def test_student_runs_other_parameters_without_touching_the_module() -> None:
    net = get_network("ConvNetBN", 1, 4, (8, 8), width=8, seed=1).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    student = FunctionalStudent(net)
    flat = torch.randn(student.num_params) * 0.1
    x = torch.randn(5, 1, 8, 8)
    out = student(x, flat)
    # An independent forward: load the same vector into a copy of the module.
    copy = get_network("ConvNetBN", 1, 4, (8, 8), width=8, seed=1).train()
    torch.nn.utils.vector_to_parameters(flat, copy.parameters())
    torch.testing.assert_close(out, copy(x), rtol=1e-6, atol=1e-6)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed: buffers must not be updated"


def test_student_rejects_wrong_shapes_with_the_parameter_name() -> None:
    student = FunctionalStudent(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"weight.*\(2, 3\)"):
        student.flatten([torch.zeros(3, 2), torch.zeros(2)])
    with pytest.raises(ValueError, match="expected 2 tensors"):
        student.flatten([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"\[8\]"):
        student.unflatten(torch.zeros(7))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        FunctionalStudent("net")  # type: ignore[arg-type]


@pytest.mark.parametrize(("num_samples", "batch"), [(10, 3), (10, 10), (7, 2), (5, 1)])
def test_mtt_schedule_visits_every_sample_once_per_epoch(num_samples: int, batch: int) -> None:
    per_epoch = math.ceil(num_samples / batch)
    plan = StepPlan.mtt(
        num_samples, 3 * per_epoch, batch, generator=torch.Generator().manual_seed(4)
    )
    for epoch in range(3):
        chunks = plan.indices[epoch * per_epoch : (epoch + 1) * per_epoch]
        seen = torch.cat(list(chunks)).sort().values
        assert torch.equal(seen, torch.arange(num_samples))
        sizes = sorted(len(c) for c in chunks)
        assert sizes[-1] == batch
        assert sum(sizes) == num_samples


def test_mtt_schedule_pops_chunks_from_the_end_of_a_generator_permutation() -> None:
    plan = StepPlan.mtt(7, 3, 3, generator=torch.Generator().manual_seed(5))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    chunks = list(torch.split(perm, 3))
    assert [c.tolist() for c in plan.indices] == [c.tolist() for c in reversed(chunks)]


def test_plan_uses_only_its_generator() -> None:
    state = torch.get_rng_state()
    a = StepPlan.mtt(9, 6, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    b = StepPlan.mtt(9, 6, 4, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))


def test_plan_rejects_bad_sizes() -> None:
    gen = torch.Generator()
    with pytest.raises(ValueError, match="batch_size"):
        StepPlan.mtt(4, 2, 5, generator=gen)
    with pytest.raises(ValueError, match="num_steps"):
        StepPlan.mtt(4, 0, 2, generator=gen)
    with pytest.raises(ValueError, match="sample_shape"):
        StepPlan.mtt(4, 2, 2, generator=gen, augmentation=object())  # type: ignore[arg-type]


class CountingNet(nn.Module):
    """A small classifier that counts its forward calls (one per inner step)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out: Tensor = self.body(x)
        return out


def test_satm_preset_runs_n_plus_n_minus_tau_inner_steps_with_the_paper_settings() -> None:
    torch.manual_seed(0)
    net = CountingNet().double()
    size = sum(p.numel() for p in net.parameters())
    images = torch.randn(6, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    syn_lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(6) % 3
    start = torch.randn(size, dtype=torch.float64) * 0.3
    target = start + 0.1 * torch.randn(size, dtype=torch.float64)
    opt = satm_optimizer(
        [{"params": [images]}, {"params": [syn_lr], "perturb": False, "lr": 1e-3}], lr=1.0
    )
    assert isinstance(opt.perturbation, SmoothedSAM)
    assert opt.smooth > 0
    settings = opt.closure_options["unroll"]
    assert settings == UnrollSettings(keep=1 / 3, reuse=True, lr_gradient="first_order")
    n_steps = 12
    iota, tau = settings.resolve(n_steps)
    assert (iota, tau) == (8, 8)
    closure = TrajectoryMatching(
        net,
        images,
        syn_lr,
        labels,
        expert_start=start,
        expert_target=target,
        syn_steps=n_steps,
        batch_syn=4,
    )
    calls: list[tuple[str, int]] = []

    def counted(ctx: StepContext) -> Tensor:
        before = net.calls
        loss = closure(ctx)
        calls.append((ctx.phase, net.calls - before))
        return loss

    before = syn_lr.detach().clone()
    opt.step(counted)
    assert calls == [("ascent", n_steps), ("descent", n_steps - tau)]
    assert opt.last_step is not None
    assert opt.last_step.perturbed_loss is not None
    assert not torch.equal(syn_lr.detach(), before)  # the first-order lr gradient was applied
