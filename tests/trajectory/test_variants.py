"""Trajectory-matching variants (PAD, ATT, partial updates, random window) against references
written from the papers on top of the MTT reference loop of ``test_trajectory_matching``."""

from __future__ import annotations

import pytest
import torch
from test_trajectory_matching import (
    N_SYN,
    RTOL,
    STEPS,
    Problem,
    grads_of,
    library_grads,
    reference_forward,
)
from torch import Tensor

from sharp_bilevel import SharpBilevelOptimizer, StepContext
from sharp_bilevel.trajectory.hypergradient import UnrollSettings
from sharp_bilevel.trajectory.matching import TrajectoryMatching
from sharp_bilevel.trajectory.selection import ParameterSelection
from sharp_bilevel.trajectory.step_plan import StepPlan

F64 = torch.float64


def close(ours: list[Tensor], ref: list[Tensor]) -> None:
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-14)


def build(problem: Problem, **options: object) -> TrajectoryMatching:
    return problem.closure(**options)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- PAD
def pad_reference_loss(problem: Problem, w_final: Tensor, mode: str, ratio: float) -> Tensor:
    """PAD's loss as its scripts write it: per-entry squared errors, kept entries summed."""
    losses = (w_final - problem.target) ** 2
    dists = (problem.start - problem.target) ** 2
    num = losses.numel()
    if mode == "depth":  # PAD_depth.py: indices from int(depth_ratio * P) on
        keep = torch.arange(num)[int(ratio * num) :]
    else:  # PAD.py: sort the losses, drop the lowest int(loss_ratio * P)
        keep = torch.sort(losses.detach()).indices[int(ratio * num) :]
    return losses[keep].sum() / dists[keep].sum()


@pytest.mark.parametrize("mode", ["depth", "loss_rank"])
@pytest.mark.parametrize("soft", [False, True])
def test_pad_selection_matches_its_reference(mode: str, soft: bool) -> None:
    problem = Problem(11, soft=soft)
    ratio = 0.4
    closure = build(problem, selection=ParameterSelection(mode, ratio))
    ours = library_grads(closure, problem.leaves())
    w = problem.reference_unroll(closure.plan, problem.images)
    ref = grads_of(pad_reference_loss(problem, w[-1], mode, ratio), problem.leaves())
    close(ours, ref)
    full = library_grads(build(problem), problem.leaves())
    assert not torch.allclose(full[0], ours[0])  # the selection changes the gradient


def test_pad_depth_and_loss_rank_keep_different_entries() -> None:
    final = torch.tensor([0.0, 5.0, 0.1, 3.0, 0.2, 0.0])
    target = torch.zeros(6)
    assert ParameterSelection("depth", 0.5).kept(final, target).tolist() == [3, 4, 5]
    assert sorted(ParameterSelection("loss_rank", 0.5).kept(final, target).tolist()) == [1, 3, 4]
    assert ParameterSelection("loss_rank", 0.0).kept(final, target).numel() == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "layers"}, "mode must be one of"),
        ({"ratio": 1.0}, "ratio must be in [0, 1)"),
        ({"ratio": -0.1}, "ratio must be in [0, 1)"),
        ({"ratio": True}, "ratio must be a number"),
    ],
)
def test_pad_bad_settings_name_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        ParameterSelection(**kwargs)


# ---------------------------------------------------------------------- ATT
def att_problem() -> tuple[Problem, int]:
    """A target placed near the student's step-3 point, so the closest step is not the last."""
    problem = Problem(12)
    plan = build(problem).plan
    w = problem.reference_unroll(plan, problem.images)
    gen = torch.Generator().manual_seed(5)
    problem.target = w[3].detach() + 1e-4 * torch.randn(w[3].shape, generator=gen, dtype=F64)
    return problem, 3


def att_reference(problem: Problem, w: list[Tensor], candidates: range) -> tuple[Tensor, int]:
    """NiaLiu/ATT: the candidate with the smallest L1 distance, ties to the later step."""
    best, index = None, -1
    for i in candidates:
        distance = float((w[i].detach() - problem.target).abs().sum())
        if best is None or best >= distance:
            best, index = distance, i
    return problem.reference_loss(w[index]), index


def test_att_matches_at_the_closest_step() -> None:
    problem, expected_step = att_problem()
    closure = build(problem, match_step="closest")
    ours = library_grads(closure, problem.leaves())
    w = problem.reference_unroll(closure.plan, problem.images)
    loss, index = att_reference(problem, w, range(1, STEPS + 1))
    assert index == expected_step
    assert closure.last_unroll is not None
    assert closure.last_unroll.closest_step == index
    close(ours, grads_of(loss, problem.leaves()))
    final = library_grads(build(problem), problem.leaves())
    assert not torch.allclose(final[0], ours[0])


def test_att_with_truncation_picks_among_the_kept_steps_only() -> None:
    problem, _ = att_problem()
    keep = 3  # iota = 4: the steps with graph end at w_5 .. w_7, all after the closest one
    closure = build(problem, match_step="closest", settings=UnrollSettings(keep=keep))
    ours = library_grads(closure, problem.leaves())
    iota = STEPS - keep
    w = problem.reference_unroll(closure.plan, problem.images, iota=iota)
    loss, index = att_reference(problem, w, range(iota + 1, STEPS + 1))
    assert closure.last_unroll is not None
    assert closure.last_unroll.closest_step == index
    close(ours, grads_of(loss, problem.leaves()))


def test_att_first_order_lr_sums_the_directions_up_to_the_matched_step() -> None:
    problem, step = att_problem()
    closure = build(
        problem, match_step="closest", settings=UnrollSettings(lr_gradient="first_order")
    )
    ours = library_grads(closure, problem.leaves())
    w = problem.reference_unroll(closure.plan, problem.images)
    inner = [((w[i] - w[i + 1]) / problem.syn_lr).detach() for i in range(step)]
    w_first = problem.start - problem.syn_lr * torch.stack(inner).sum(0)
    (ref_lr,) = torch.autograd.grad(problem.reference_loss(w_first), [problem.syn_lr])
    torch.testing.assert_close(ours[1], ref_lr, rtol=1e-9, atol=1e-14)


def test_match_step_is_checked() -> None:
    problem = Problem(1)
    with pytest.raises(ValueError, match="match_step must be one of"):
        build(problem, match_step="best")


# ---------------------------------------------------------------------- partial updates
def fixed_set(problem: Problem, m: int = 3) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(77)
    images = torch.randn(m, *problem.images.shape[1:], generator=gen, dtype=F64)
    if problem.soft:
        return images, torch.randn(m, problem.labels.shape[1], generator=gen, dtype=F64)
    return images, torch.arange(m) % 3


@pytest.mark.parametrize("soft", [False, True])
def test_partial_updates_train_on_both_and_learn_only_the_learnable(soft: bool) -> None:
    problem = Problem(13, soft=soft)
    fixed_images, fixed_labels = fixed_set(problem)
    closure = build(problem, fixed_images=fixed_images, fixed_labels=fixed_labels)
    assert closure.plan.num_steps == STEPS
    assert max(int(i.max()) for i in closure.plan.indices) >= N_SYN  # fixed samples are drawn
    ours = library_grads(closure, problem.leaves())
    # reference: MTT's loop on the whole set, with the fixed rows constant
    whole = torch.cat([problem.images, fixed_images])
    labels = problem.labels
    problem.labels = torch.cat([labels, fixed_labels])
    w = problem.reference_unroll(closure.plan, whole)
    problem.labels = labels
    ref = grads_of(problem.reference_loss(w[-1]), problem.leaves())
    close(ours, ref)
    assert ours[0].shape == problem.images.shape


def test_partial_updates_leave_the_fixed_samples_unperturbed_and_unchanged() -> None:
    problem = Problem(14)
    fixed_images, fixed_labels = fixed_set(problem)
    before = fixed_images.clone()
    seen: list[Tensor] = []
    opt = SharpBilevelOptimizer(
        [{"params": [problem.images]}, {"params": [problem.syn_lr], "perturb": False}],
        perturbation="sam",
        rho=0.5,
        smooth=0.1,
        lr=10.0,
    )
    closure = build(problem, fixed_images=fixed_images, fixed_labels=fixed_labels)

    def watched(ctx: StepContext) -> Tensor:
        seen.append(closure._inner_set()[0][N_SYN:].clone())
        return closure(ctx)

    start = problem.images.detach().clone()
    opt.step(watched)
    assert len(seen) == 2
    assert all(torch.equal(s, before) for s in seen)
    assert torch.equal(fixed_images, before)
    assert not torch.equal(problem.images.detach(), start)


def test_partial_updates_bad_inputs_name_the_argument() -> None:
    problem = Problem(15)
    fixed_images, fixed_labels = fixed_set(problem)
    with pytest.raises(ValueError, match="fixed_images and fixed_labels go together"):
        build(problem, fixed_images=fixed_images)
    with pytest.raises(ValueError, match="fixed_images must be"):
        build(problem, fixed_images=fixed_images[:, :, :4], fixed_labels=fixed_labels)
    with pytest.raises(ValueError, match="fixed_labels must have shape"):
        build(problem, fixed_images=fixed_images, fixed_labels=fixed_labels[:2])


# ---------------------------------------------------------------------- random window
def test_random_window_is_drawn_once_per_objective_and_replayed() -> None:
    settings = UnrollSettings(keep=(2, 5), reuse=True, lr_gradient="first_order")
    problem = Problem(16)
    keeps = set()
    for seed in range(30):
        closure = TrajectoryMatching(
            problem.net,
            problem.images,
            problem.syn_lr,
            problem.labels,
            expert_start=problem.start,
            expert_target=problem.target,
            syn_steps=STEPS,
            batch_syn=4,
            augmentation=problem.augmentation,
            settings=settings,
            seed=seed,
        )
        scratch: dict[str, object] = {}
        closure(StepContext("ascent", 0, two_pass=True, smoothed=False, scratch=scratch))
        first = closure.last_window
        closure(StepContext("descent", 0, two_pass=True, smoothed=False, scratch=scratch))
        assert closure.last_window == first  # the descent pass and the restart replay it
        assert first is not None
        keeps.add(STEPS - first[0])
    assert keeps == {2, 3, 4, 5}  # every count of the window occurs, nothing outside it


def test_random_window_gradient_is_tuh_at_the_drawn_keep() -> None:
    problem = Problem(17, soft=True)
    closure = build(problem, settings=UnrollSettings(keep=(1, STEPS)))
    ours = library_grads(closure, problem.leaves())
    assert closure.last_window is not None
    iota = closure.last_window[0]
    w = problem.reference_unroll(closure.plan, problem.images, iota=iota)
    close(ours, grads_of(problem.reference_loss(w[-1]), problem.leaves()))
    again = library_grads(closure, problem.leaves())  # the same objective: the same window
    close(again, ours)


@pytest.mark.parametrize("keep", [(0, 3), (4, 2), (1.0, 3), (2,), (True, 3)])
def test_random_window_bad_settings_name_the_argument(keep: object) -> None:
    with pytest.raises(ValueError, match="keep as a window must be a pair of ints"):
        UnrollSettings(keep=keep)  # type: ignore[arg-type]


def test_random_window_longer_than_the_unroll_is_refused() -> None:
    problem = Problem(18)
    closure = build(problem, settings=UnrollSettings(keep=(2, STEPS + 1)))
    with pytest.raises(ValueError, match="exceeds the number of inner steps"):
        closure()


# ---------------------------------------------------------------------- TESLA
def _inner_grad(problem: Problem, plan: StepPlan, images: Tensor, i: int, w: Tensor) -> Tensor:
    """MTT's inner gradient at step ``i`` (with graph), through the reference forward."""
    x = images[plan.indices[i]]
    if problem.augmentation is not None:
        x = problem.augmentation.apply(x, plan.draws[i])
    y = problem.labels[plan.indices[i]]
    target = torch.softmax(y, 1) if problem.soft else y
    ce = torch.nn.functional.cross_entropy(reference_forward(problem.net, x, w), target)
    (g,) = torch.autograd.grad(ce, w, create_graph=True)
    return g


def tesla_reference(problem: Problem, plan: StepPlan, images: Tensor, lo: int = 0) -> list[Tensor]:
    """justincui03/tesla's distill.py formulas: store w_i, then per step the image gradient of
    ``2 (alpha (w* - w_0) + alpha^2 G) . g_i / D`` (and that of the lr in closed form)."""
    alpha = float(problem.syn_lr.detach())
    w = [problem.start.clone()]
    gs = []
    for i in range(plan.num_steps):
        g = _inner_grad(problem, plan, images, i, w[-1].clone().requires_grad_(True)).detach()
        gs.append(g)
        w.append(w[-1] - alpha * g)
    big_g = torch.stack(gs).sum(0)
    dist = ((problem.start - problem.target) ** 2).sum()
    coeff = alpha * (problem.target - problem.start) + alpha**2 * big_g
    leaves = problem.leaves()
    outer = [t for t in leaves if t is not problem.syn_lr]
    sums = [torch.zeros_like(t) for t in outer]
    for i in range(lo, plan.num_steps):
        g = _inner_grad(problem, plan, images, i, w[i].clone().requires_grad_(True))
        parts = torch.autograd.grad(2 * torch.dot(coeff, g) / dist, outer)
        sums = [a + b for a, b in zip(sums, parts, strict=True)]
    lr = problem.syn_lr.detach().clone().requires_grad_(True)
    loss = ((problem.start - lr * big_g - problem.target) ** 2).sum() / dist
    (lr_grad,) = torch.autograd.grad(loss, [lr])
    return [sums[0], lr_grad, *sums[1:]]


@pytest.mark.parametrize("soft", [False, True])
def test_tesla_matches_its_published_formulas(soft: bool) -> None:
    problem = Problem(21, soft=soft)
    closure = build(problem, settings=UnrollSettings.tesla())
    ours = library_grads(closure, problem.leaves())
    close(ours, tesla_reference(problem, closure.plan, problem.images))
    exact = library_grads(build(problem), problem.leaves())
    assert not torch.allclose(exact[0], ours[0])  # it drops terms: not BPTT


def test_tesla_equals_bptt_on_one_step_where_no_chain_exists() -> None:
    problem = Problem(22, soft=True)

    def one_step(settings: UnrollSettings) -> list[Tensor]:
        closure = TrajectoryMatching(
            problem.net,
            problem.images,
            problem.syn_lr,
            problem.labels,
            expert_start=problem.start,
            expert_target=problem.target,
            syn_steps=1,
            soft_labels=True,
            augmentation=problem.augmentation,
            seed=3,
        )
        closure.settings = settings
        return library_grads(closure, problem.leaves())

    close(one_step(UnrollSettings.tesla()), one_step(UnrollSettings(lr_gradient="first_order")))


def test_tesla_with_truncation_sums_the_kept_steps_only() -> None:
    problem = Problem(23)
    closure = build(problem, settings=UnrollSettings.tesla(keep=3))
    ours = library_grads(closure, problem.leaves())
    ref = tesla_reference(problem, closure.plan, problem.images, lo=STEPS - 3)
    close(ours[:1], ref[:1])  # images: steps iota..N-1; the lr gradient sums every direction
    close(ours[1:], ref[1:])


def test_tesla_restart_from_the_recorded_point_matches_a_fresh_pass() -> None:
    """TR with TESLA: the descent pass restarts at tau = iota and gives what a full TESLA pass
    at the perturbed point gives when the steps before iota see the unperturbed images."""
    problem = Problem(24)
    settings = UnrollSettings(keep=4, reuse=True, lr_gradient="first_order", hypergradient="tesla")
    closure = build(problem, settings=settings)
    scratch: dict[str, object] = {}
    library_grads(
        closure,
        problem.leaves(),
        StepContext("ascent", 0, two_pass=True, smoothed=False, scratch=scratch),
    )
    assert "trajectory_reuse" in scratch
    plain = library_grads(build(problem, settings=UnrollSettings.tesla(keep=4)), problem.leaves())
    restarted = library_grads(
        closure,
        problem.leaves(),
        StepContext("descent", 0, two_pass=True, smoothed=False, scratch=scratch),
    )
    close(restarted, plain)  # unperturbed: restarting at w_tau changes nothing


def test_tesla_saved_memory_does_not_grow_with_the_unroll() -> None:
    from tesla_memory import peak_saved_bytes

    problem = Problem(25, dsa=False)  # DSA's draws change a step's saved sizes a little
    peaks = {}
    for steps in (4, 8, 16):
        for mode in ("bptt", "tesla"):
            settings = UnrollSettings.tesla() if mode == "tesla" else UnrollSettings()
            closure = TrajectoryMatching(
                problem.net,
                problem.images,
                problem.syn_lr,
                problem.labels,
                expert_start=problem.start,
                expert_target=problem.target,
                syn_steps=steps,
                batch_syn=4,
                augmentation=problem.augmentation,
                settings=settings,
                seed=0,
            )
            peaks[mode, steps] = peak_saved_bytes(closure)
    assert peaks["tesla", 16] == peaks["tesla", 4]  # constant in N
    assert peaks["bptt", 16] > 3 * peaks["bptt", 4]  # BPTT grows linearly
    assert peaks["tesla", 4] < peaks["bptt", 4]


def test_tesla_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="lr_gradient='first_order'"):
        UnrollSettings(hypergradient="tesla")
    with pytest.raises(ValueError, match="hypergradient must be one of"):
        UnrollSettings(hypergradient="implicit")
    from sharp_bilevel.trajectory.inner import TorchoptInner

    torchopt = pytest.importorskip("torchopt")
    problem = Problem(26)
    closure = build(problem, settings=UnrollSettings.tesla())
    closure.inner = TorchoptInner(torchopt.sgd(0.1, momentum=0.5))
    with pytest.raises(ValueError, match="assumes plain SGD inside"):
        closure()


def test_tesla_composes_with_sam_through_the_optimizer() -> None:
    problem = Problem(27)
    opt = SharpBilevelOptimizer(
        [{"params": [problem.images]}, {"params": [problem.syn_lr], "perturb": False, "lr": 1e-4}],
        perturbation="sam",
        rho=0.1,
        lr=10.0,
        closure_options={"unroll": UnrollSettings.tesla()},
    )
    calls = []
    closure = build(problem)

    def counted(ctx: StepContext) -> Tensor:
        calls.append(ctx.phase)
        return closure(ctx)

    start = problem.images.detach().clone()
    opt.step(counted)
    assert calls == ["ascent", "descent"]  # two TESLA passes
    assert opt.last_step is not None
    assert opt.last_step.perturbed_loss is not None
    assert not torch.equal(problem.images.detach(), start)
