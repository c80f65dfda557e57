"""TrajectoryMatching against an MTT-style reference loop written here (float64).

The reference is MTT's unroll as its ``distill.py`` writes it: a Python list of flat vectors,
``torch.autograd.grad(create_graph=True)`` and ``w - syn_lr * g``; TUH is that loop with a
``detach()`` at step ``iota``; TR is a second reference pass started from the recorded ``w_tau``.
The network is run through ``torch.func.functional_call`` with a hand-written unflatten, so the
library's ``FunctionalStudent`` is not part of the reference.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn
from torch.func import functional_call

from sharp_bilevel import SharpBilevelOptimizer, StepContext
from sharp_bilevel.trajectory.augment import DSA
from sharp_bilevel.trajectory.hypergradient import UnrollSettings
from sharp_bilevel.trajectory.inner import TorchoptInner
from sharp_bilevel.trajectory.matching import TrajectoryMatching
from sharp_bilevel.trajectory.step_plan import StepPlan

N_SYN, CLASSES, STEPS, BATCH = 6, 3, 7, 4
RTOL = 1e-10


def tiny_convnet(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.GroupNorm(4, 4),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, CLASSES),
        ).double()


def reference_forward(net: nn.Module, x: Tensor, flat: Tensor) -> Tensor:
    params, offset = {}, 0
    for name, p in net.named_parameters():
        params[name] = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    out: Tensor = functional_call(net, params, (x,))
    return out


class Problem:
    """One random distillation problem: network, synthetic set, expert start and target."""

    def __init__(self, seed: int, soft: bool = False, dsa: bool = True) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.net = tiny_convnet(seed)
        size = sum(p.numel() for p in self.net.parameters())
        self.images = torch.randn(N_SYN, 1, 8, 8, generator=gen, dtype=torch.float64)
        self.images.requires_grad_(True)
        self.syn_lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        if soft:
            self.labels = torch.randn(N_SYN, CLASSES, generator=gen, dtype=torch.float64)
            self.labels.requires_grad_(True)
        else:
            self.labels = torch.arange(N_SYN) % CLASSES
        self.soft = soft
        self.start = torch.cat([p.detach().reshape(-1) for p in self.net.parameters()])
        self.target = self.start + 0.05 * torch.randn(size, generator=gen, dtype=torch.float64)
        self.augmentation = DSA() if dsa else None

    def closure(
        self,
        settings: UnrollSettings | None = None,
        seed: int = 0,
        syn_steps: int = STEPS,
        **options: Any,
    ) -> TrajectoryMatching:
        """The library's closure on this problem (``options``: more TrajectoryMatching args)."""
        return TrajectoryMatching(
            self.net,
            self.images,
            self.syn_lr,
            self.labels,
            expert_start=self.start,
            expert_target=self.target,
            syn_steps=syn_steps,
            batch_syn=BATCH,
            soft_labels=self.soft,
            augmentation=self.augmentation,
            settings=settings,
            seed=seed,
            **options,
        )

    def leaves(self) -> list[Tensor]:
        out = [self.images, self.syn_lr]
        return [*out, self.labels] if self.soft else out

    def reference_unroll(
        self,
        plan: StepPlan,
        images: Tensor,
        *,
        iota: int = 0,
        stop: int | None = None,
        begin: int = 0,
        w_begin: Tensor | None = None,
    ) -> list[Tensor]:
        """MTT's loop over steps ``begin..stop-1``; ``detach()`` at step ``iota``."""
        stop = plan.num_steps if stop is None else stop
        w0 = self.start if w_begin is None else w_begin
        student_params = [w0.clone().requires_grad_(True)]
        for i in range(begin, stop):
            if i == iota and i > begin:
                student_params[-1] = student_params[-1].detach().requires_grad_(True)
            idx = plan.indices[i]
            x = images[idx]
            if self.augmentation is not None:
                x = self.augmentation.apply(x, plan.draws[i])
            out = reference_forward(self.net, x, student_params[-1])
            y = self.labels[idx]
            ce = F.cross_entropy(out, torch.softmax(y, 1) if self.soft else y)
            grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
            student_params.append(student_params[-1] - self.syn_lr * grad)
        return student_params

    def reference_loss(self, w_final: Tensor) -> Tensor:
        return ((w_final - self.target) ** 2).sum() / ((self.start - self.target) ** 2).sum()


def grads_of(loss: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, leaves, allow_unused=False))


def library_grads(
    closure: TrajectoryMatching, leaves: list[Tensor], ctx: StepContext | None = None
) -> list[Tensor]:
    for t in leaves:
        t.grad = None
    closure(ctx)
    out = []
    for t in leaves:
        assert t.grad is not None
        out.append(t.grad.clone())
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("soft", [False, True])
def test_exact_bptt_matches_mtt_reference(seed: int, soft: bool) -> None:
    problem = Problem(seed, soft=soft)
    closure = problem.closure()
    assert closure.plan.num_steps == STEPS
    assert any(len(idx) < N_SYN for idx in closure.plan.indices)  # batch_syn < N_syn
    ours = library_grads(closure, problem.leaves())
    w = problem.reference_unroll(closure.plan, problem.images)
    ref = grads_of(problem.reference_loss(w[-1]), problem.leaves())
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-14)
    assert ours[0].abs().sum() > 0
    assert ours[1].abs() > 0


@pytest.mark.parametrize("keep", [1, 3, 5])
def test_truncated_unroll_matches_reference_detached_at_iota(keep: int) -> None:
    problem = Problem(3, soft=True)
    closure = problem.closure(UnrollSettings(keep=keep))
    ours = library_grads(closure, problem.leaves())
    iota = STEPS - keep
    w = problem.reference_unroll(closure.plan, problem.images, iota=iota)
    ref = grads_of(problem.reference_loss(w[-1]), problem.leaves())
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-14)
    exact = library_grads(problem.closure(), problem.leaves())
    assert not torch.allclose(exact[0], ours[0])  # truncation really changes the gradient


@pytest.mark.parametrize(("keep", "reuse"), [(3, True), (5, 4), (None, 2)])
def test_trajectory_reuse_restarts_from_the_recorded_state(
    keep: int | None, reuse: bool | int
) -> None:
    problem = Problem(4)
    settings = UnrollSettings(keep=keep, reuse=reuse)
    iota, tau = settings.resolve(STEPS)
    assert tau is not None
    closure = problem.closure(settings)
    scratch: dict[str, object] = {}
    ascent = StepContext("ascent", 0, two_pass=True, smoothed=False, scratch=scratch)
    library_grads(closure, problem.leaves(), ascent)
    eps = 0.01 * torch.randn(
        problem.images.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    with torch.no_grad():
        problem.images.add_(eps)
    descent = StepContext("descent", 0, two_pass=True, smoothed=False, scratch=scratch)
    ours = library_grads(closure, problem.leaves(), descent)
    with torch.no_grad():
        phi = problem.images - eps  # only to build the reference's first part
    w_first = problem.reference_unroll(closure.plan, phi.detach(), stop=tau)
    w_tau = w_first[-1].detach()
    w = problem.reference_unroll(closure.plan, problem.images, iota=iota, begin=tau, w_begin=w_tau)
    ref = grads_of(problem.reference_loss(w[-1]), [problem.images])
    torch.testing.assert_close(ours[0], ref[0], rtol=RTOL, atol=1e-14)


def test_first_order_lr_gradient_equals_autograd_with_detached_inner_gradients() -> None:
    problem = Problem(5)
    closure = problem.closure(UnrollSettings(lr_gradient="first_order"))
    ours = library_grads(closure, problem.leaves())
    w = problem.reference_unroll(closure.plan, problem.images)
    steps = [w[i] - w[i + 1] for i in range(STEPS)]  # = syn_lr * g_i
    inner_grads = [(s / problem.syn_lr).detach() for s in steps]
    w_first_order = problem.start - problem.syn_lr * torch.stack(inner_grads).sum(0)
    (ref_lr,) = torch.autograd.grad(problem.reference_loss(w_first_order), [problem.syn_lr])
    torch.testing.assert_close(ours[1], ref_lr, rtol=1e-9, atol=1e-14)
    # The image gradient is still exact BPTT (only alpha is taken out of the graph).
    ref_images, exact_lr = torch.autograd.grad(
        problem.reference_loss(w[-1]), [problem.images, problem.syn_lr]
    )
    torch.testing.assert_close(ours[0], ref_images, rtol=RTOL, atol=1e-14)
    assert torch.sign(exact_lr) == torch.sign(ours[1])


def test_two_passes_at_the_same_point_replay_bit_identically() -> None:
    problem = Problem(6)
    closure = problem.closure()
    first = library_grads(closure, problem.leaves())
    loss_one = closure.last_unroll.final.detach().clone() if closure.last_unroll else None
    torch.manual_seed(12345)  # the global RNG must not matter
    torch.rand(100)
    second = library_grads(closure, problem.leaves())
    assert closure.last_unroll is not None
    assert loss_one is not None
    assert torch.equal(loss_one, closure.last_unroll.final.detach())
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_torchopt_momentum_inner_loop_matches_a_hand_written_unroll() -> None:
    problem = Problem(7, dsa=False)
    momentum = 0.9
    closure = TrajectoryMatching(
        problem.net,
        problem.images,
        problem.syn_lr,
        problem.labels,
        expert_start=problem.start,
        expert_target=problem.target,
        syn_steps=STEPS,
        batch_syn=BATCH,
        inner=TorchoptInner(torchopt.sgd(lr=1.0, momentum=momentum)),
        seed=3,
    )
    ours = library_grads(closure, problem.leaves())
    w = problem.start.clone().requires_grad_(True)
    buf: Tensor | None = None
    for i in range(STEPS):
        idx = closure.plan.indices[i]
        ce = F.cross_entropy(
            reference_forward(problem.net, problem.images[idx], w), problem.labels[idx]
        )
        g = torch.autograd.grad(ce, w, create_graph=True)[0]
        buf = g if buf is None else momentum * buf + g
        w = w - problem.syn_lr * buf
    ref = grads_of(problem.reference_loss(w), problem.leaves())
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-14)


def test_sam_step_through_the_optimizer_equals_the_reference_composition() -> None:
    problem = Problem(8)
    rho, lr_img, lr_lr = 0.05, 2.0, 1e-3
    phi = problem.images.detach().clone()
    alpha = problem.syn_lr.detach().clone()
    opt = SharpBilevelOptimizer(
        [{"params": [problem.images]}, {"params": [problem.syn_lr], "perturb": False, "lr": lr_lr}],
        perturbation="sam",
        rho=rho,
        lr=lr_img,
    )
    closure = problem.closure(seed=11)
    opt.step(closure)
    # Reference: g at phi, eps = rho g/||g||, then the gradient at phi + eps, plain SGD update.
    stepped_images, stepped_lr = problem.images.detach().clone(), problem.syn_lr.detach().clone()
    problem.syn_lr = alpha.clone().requires_grad_(True)  # the reference runs at the pre-step lr
    images = phi.clone().requires_grad_(True)
    w = problem.reference_unroll(closure.plan, images)
    g = torch.autograd.grad(problem.reference_loss(w[-1]), images)[0]
    eps = rho * g / (g.norm() + 1e-12)
    images_adv = (phi + eps).requires_grad_(True)
    w = problem.reference_unroll(closure.plan, images_adv)
    loss_adv = problem.reference_loss(w[-1])
    g_adv, lr_adv = torch.autograd.grad(loss_adv, [images_adv, problem.syn_lr])
    torch.testing.assert_close(stepped_images, phi - lr_img * g_adv, rtol=RTOL, atol=1e-13)
    torch.testing.assert_close(stepped_lr, alpha - lr_lr * lr_adv, rtol=RTOL, atol=1e-15)


def test_bad_inputs_name_the_argument() -> None:
    problem = Problem(0, dsa=False)
    with pytest.raises(ValueError, match="expert_start"):
        TrajectoryMatching(
            problem.net,
            problem.images,
            problem.syn_lr,
            problem.labels,
            expert_start=problem.start[:-1],
            expert_target=problem.target,
            syn_steps=2,
        )
    with pytest.raises(ValueError, match="labels"):
        TrajectoryMatching(
            problem.net,
            problem.images,
            problem.syn_lr,
            problem.labels[:-1],
            expert_start=problem.start,
            expert_target=problem.target,
            syn_steps=2,
        )
    with pytest.raises(ValueError, match=rf"batch_syn must be an integer in \[1, {N_SYN}\]"):
        TrajectoryMatching(
            problem.net,
            problem.images,
            problem.syn_lr,
            problem.labels,
            expert_start=problem.start,
            expert_target=problem.target,
            syn_steps=2,
            batch_syn=N_SYN + 1,
        )
    with pytest.raises(ValueError, match="identical"):
        TrajectoryMatching(
            problem.net,
            problem.images,
            problem.syn_lr,
            problem.labels,
            expert_start=problem.start,
            expert_target=problem.start,
            syn_steps=2,
        )()
    with pytest.raises(ValueError, match="reuse"):
        UnrollSettings(keep=2, reuse=1).resolve(5)
    with pytest.raises(ValueError, match="keep"):
        UnrollSettings(keep=0)
    with pytest.raises(ValueError, match="lr_gradient"):
        UnrollSettings(lr_gradient="second")


def _objective(problem: Problem, labels: Tensor, **options: Any) -> TrajectoryMatching:
    return TrajectoryMatching(
        problem.net,
        problem.images,
        problem.syn_lr,
        labels,
        expert_start=problem.start,
        expert_target=problem.target,
        **{"syn_steps": 2, **options},
    )


def test_float_or_out_of_range_labels_are_refused_up_front_naming_the_argument() -> None:
    """Before: a float label reached ``cross_entropy`` inside the unroll, an index >= classes
    an IndexError there; now the constructor names the argument and the allowed values."""
    problem = Problem(0, dsa=False)
    hard = problem.labels
    with pytest.raises(ValueError, match=r"^labels must be integer class indices.*float64"):
        _objective(problem, hard.double())
    with pytest.raises(ValueError, match=r"^labels must be integer class indices.*torch\.bool"):
        _objective(problem, hard == 0)
    too_big = hard.clone()
    too_big[1] = CLASSES
    with pytest.raises(
        ValueError,
        match=rf"^labels must be class indices in \[0, num_classes="
        rf"{CLASSES}\), found values in \[0, {CLASSES}\]",
    ):
        _objective(problem, too_big)
    with pytest.raises(
        ValueError, match=rf"^labels must be class indices in \[0, num_classes={CLASSES - 1}\)"
    ):
        _objective(problem, hard, num_classes=CLASSES - 1)  # the user's count overrides the head's
    negative = hard.clone()
    negative[0] = -1
    with pytest.raises(ValueError, match=r"^labels must be class indices in \[0"):
        _objective(problem, negative)
    with pytest.raises(ValueError, match=r"^labels must be float label logits"):
        _objective(problem, torch.zeros(N_SYN, CLASSES, dtype=torch.long), soft_labels=True)
    with pytest.raises(ValueError, match=rf"^labels has {CLASSES + 1} logits.*num_classes="):
        _objective(problem, torch.zeros(N_SYN, CLASSES + 1), soft_labels=True)
    fixed = {"fixed_images": problem.images[:2].detach()}
    with pytest.raises(ValueError, match=r"^fixed_labels must be integer class indices"):
        _objective(problem, hard, **fixed, fixed_labels=torch.zeros(2))
    with pytest.raises(ValueError, match=r"^fixed_labels must be class indices"):
        _objective(problem, hard, **fixed, fixed_labels=torch.tensor([0, CLASSES]))
    # The accepted forms still build (int32 labels, and the exact range ends).
    _objective(problem, hard.to(torch.int32))
    edges = hard.clone()
    edges[0], edges[1] = 0, CLASSES - 1
    _objective(problem, edges)


def test_syn_steps_and_batch_syn_are_named_as_the_user_passed_them() -> None:
    """Before: ``syn_steps=0`` was reported as ``num_steps`` and a too-large ``batch_syn`` as
    ``batch_size`` (the step plan's names)."""
    problem = Problem(0, dsa=False)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"^syn_steps must be an integer >= 1.*{bad!r}"):
            _objective(problem, problem.labels, syn_steps=bad)
    for bad in (0, N_SYN + 1, 2.0):
        with pytest.raises(
            ValueError,
            match=rf"^batch_syn must be an integer in \[1, {N_SYN}\] \(the synthetic set has "
            rf"{N_SYN} samples\).*got {bad!r}",
        ):
            _objective(problem, problem.labels, batch_syn=bad)
    fixed = {"fixed_images": problem.images[:2].detach(), "fixed_labels": problem.labels[:2]}
    with pytest.raises(ValueError, match=rf"batch_syn must be an integer in \[1, {N_SYN + 2}\]"):
        _objective(problem, problem.labels, batch_syn=N_SYN + 3, **fixed)
    assert _objective(problem, problem.labels, batch_syn=N_SYN + 2, **fixed).plan.num_steps == 2


def test_experts_that_do_not_move_name_the_likely_cause() -> None:
    from sharp_bilevel.trajectory.unroll import matching_loss

    w = torch.randn(5)
    with pytest.raises(ValueError, match=r"buffer\.py on the CPU.*live tensor"):
        matching_loss(w + 1, w.clone(), w.clone())


def test_looksam_costs_one_unroll_between_its_k_steps() -> None:
    """With trajectory matching, LookSAM's steps between its k-steps run one unroll (no
    second pass, no TR record); k = 1 is SAM exactly."""
    from sharp_bilevel import SharpBilevelOptimizer, TrajectoryMatching, UnrollSettings, get_network

    net = get_network("ConvNet", 1, 3, (8, 8), width=4, seed=0)
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    target = w0 + 0.01 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(1))

    def run(rule: str, **kw: object) -> tuple[torch.Tensor, list[bool]]:
        images = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        images.requires_grad_(True)
        syn_lr = torch.tensor(0.01, requires_grad=True)
        opt = SharpBilevelOptimizer(
            [{"params": [images]}, {"params": [syn_lr], "perturb": False, "lr": 1e-5}],
            perturbation=rule, lr=10.0, momentum=0.5,
            closure_options={"unroll": UnrollSettings.satm(keep=2)}, **kw,
        )  # fmt: skip
        passes: list[bool] = []
        for step in range(6):
            inner = TrajectoryMatching(
                net, images, syn_lr, torch.arange(6) % 3, expert_start=w0,
                expert_target=target, syn_steps=4, seed=step,
            )  # fmt: skip

            def closure(ctx, inner=inner):  # type: ignore[no-untyped-def]
                passes.append(ctx.is_descent)
                return inner(ctx)

            opt.step(closure)
        return images.detach(), passes

    _, passes = run("looksam", rho=0.05, k=3)
    descents = [i for i, d in enumerate(passes) if d]
    assert len(passes) == 6 + 2  # two full steps (0 and 3), four single-pass steps
    assert len(descents) == 2
    sam, _ = run("sam", rho=0.05)
    look1, _ = run("looksam", rho=0.05, k=1)
    assert torch.equal(sam, look1)
