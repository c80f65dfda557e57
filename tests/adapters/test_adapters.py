"""The MTT, FTD and DATM adapters, driven in the shape of those repositories' loops."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from sharp_bilevel.adapters import datm, ftd, mtt
from torch import Tensor, nn

from sharp_bilevel import SharpBilevelOptimizer, StepContext, TrajectoryMatching
from sharp_bilevel.trajectory.augment import DSAParams

CLASSES, IPC, SIZE = 3, 2, 6


def tiny_net(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.GroupNorm(3, 3),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 3 * 3, CLASSES),
        ).double()


class FlatParamStudent(nn.Module):
    """The interface of MTT's ReparamModule (written here): ``net(x, flat_param=w)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.layout = [(n, p.shape) for n, p in module.named_parameters()]
        self.flat_param = nn.Parameter(
            torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        )

    def forward(self, x: Tensor, flat_param: Tensor) -> Tensor:
        params, offset = {}, 0
        for name, shape in self.layout:
            params[name] = flat_param[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        out: Tensor = torch.func.functional_call(self.module, params, (x,))
        return out


def expert_buffer(net: nn.Module, epochs: int = 6, seed: int = 0) -> list[list[list[Tensor]]]:
    """One expert in MTT's format: epochs of per-parameter CPU tensors (a random walk)."""
    gen = torch.Generator().manual_seed(seed)
    snapshot = [p.detach().clone() for p in net.parameters()]
    trajectory = [snapshot]
    for _ in range(epochs):
        snapshot = [t + 0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in snapshot]
        trajectory.append(snapshot)
    return [trajectory]


def mtt_args(**overrides: object) -> SimpleNamespace:
    dsa_param = SimpleNamespace(
        prob_flip=0.5,
        ratio_scale=1.2,
        ratio_rotate=15.0,
        ratio_crop_pad=0.125,
        ratio_cutout=0.5,
        brightness=1.0,
        saturation=2.0,
        contrast=0.5,
    )
    values = dict(
        syn_steps=5,
        expert_epochs=2,
        batch_syn=4,
        dsa=True,
        dsa_strategy="color_crop_cutout_flip_scale_rotate",
        dsa_param=dsa_param,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def outer_variables(seed: int = 1, soft: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image_syn = torch.randn(CLASSES * IPC, 1, SIZE, SIZE, generator=gen, dtype=torch.float64)
    syn_lr = torch.tensor(0.2, dtype=torch.float64)
    labels = torch.arange(CLASSES).repeat_interleave(IPC)
    if soft:
        labels = torch.randn(CLASSES * IPC, CLASSES, generator=gen, dtype=torch.float64)
        labels.requires_grad_(True)
    return image_syn.requires_grad_(True), syn_lr.requires_grad_(True), labels


def grads_after(closure: TrajectoryMatching, leaves: list[Tensor]) -> list[Tensor]:
    for t in leaves:
        t.grad = None
    closure()
    return [t.grad.clone() for t in leaves if t.grad is not None]


def test_mtt_closure_from_a_forks_objects_equals_the_objective_built_directly() -> None:
    net = tiny_net()
    buffer = expert_buffer(net)
    image_syn, syn_lr, label_syn = outer_variables()
    args = mtt_args()
    start_epoch = 1  # the fork samples it: np.random.randint(0, args.max_start_epoch)
    from_reparam = mtt.make_closure(
        FlatParamStudent(net),
        buffer[0],
        start_epoch,
        image_syn,
        syn_lr,
        label_syn,
        args=args,
        seed=3,
    )
    from_module = mtt.make_closure(
        net, buffer[0], start_epoch, image_syn, syn_lr, label_syn, args=args, seed=3
    )
    direct = TrajectoryMatching(
        net,
        image_syn,
        syn_lr,
        label_syn,
        expert_start=buffer[0][1],
        expert_target=buffer[0][3],
        syn_steps=5,
        batch_syn=4,
        augmentation=from_module.augmentation,
        seed=3,
    )
    assert from_module.augmentation is not None
    assert from_module.augmentation.params == DSAParams()  # MTT's ParamDiffAug defaults mapped
    reference = grads_after(direct, [image_syn, syn_lr])
    for closure in (from_reparam, from_module):
        ours = grads_after(closure, [image_syn, syn_lr])
        for a, b in zip(ours, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_mtt_loop_shape_with_sam_restores_before_evaluation_reads_the_images() -> None:
    net = tiny_net()
    buffer = expert_buffer(net)
    image_syn, syn_lr, label_syn = outer_variables()
    optimizer = SharpBilevelOptimizer(
        [{"params": [image_syn]}, {"params": [syn_lr], "perturb": False, "lr": 1e-4}],
        perturbation="asam",
        rho=0.5,
        lr=10.0,
        momentum=0.5,
    )
    gen = torch.Generator().manual_seed(0)
    seen: list[Tensor] = []
    for it in range(3):
        start_epoch = int(torch.randint(0, 3, (1,), generator=gen))
        closure = mtt.make_closure(
            net, buffer[0], start_epoch, image_syn, syn_lr, label_syn, args=mtt_args(), seed=it
        )

        def recording(ctx: StepContext, closure: TrajectoryMatching = closure) -> Tensor:
            seen.append(image_syn.detach().clone())
            return closure(ctx)

        before = image_syn.detach().clone()
        grand_loss = optimizer.step(recording)
        assert math.isfinite(float(grand_loss))
        assert torch.equal(seen[-2], before)  # the ascent pass ran at phi
        assert not torch.equal(seen[-1], before)  # the descent pass at phi + eps
        assert not torch.equal(image_syn.detach(), seen[-1])  # ...and it was not left there


def test_expert_window_errors_name_the_problem() -> None:
    net = tiny_net()
    buffer = expert_buffer(net, epochs=3)
    image_syn, syn_lr, label_syn = outer_variables()
    with pytest.raises(ValueError, match=r"start_epoch \+ expert_epochs = 2 \+ 2 = 4 exceeds"):
        mtt.make_closure(net, buffer[0], 2, image_syn, syn_lr, label_syn, args=mtt_args())
    with pytest.raises(ValueError, match="syn_steps"):
        mtt.make_closure(net, buffer[0], 0, image_syn, syn_lr, label_syn, expert_epochs=1)
    bad = [[t[:1] for t in epoch] for epoch in buffer[0]]
    with pytest.raises(ValueError, match="expert_start"):
        mtt.make_closure(net, bad, 0, image_syn, syn_lr, label_syn, args=mtt_args())


def test_ftd_average_follows_the_restored_post_step_images() -> None:
    net = tiny_net()
    buffer = expert_buffer(net)
    image_syn, syn_lr, label_syn = outer_variables()
    optimizer = SharpBilevelOptimizer(
        [{"params": [image_syn]}, {"params": [syn_lr], "perturb": False, "lr": 1e-4}],
        perturbation="sam",
        rho=0.05,
        lr=10.0,
        momentum=0.5,
    )
    decay = 0.9
    ema = ftd.ImageEMA(image_syn, decay=decay).attach(optimizer)
    expected = image_syn.detach().clone()
    for it in range(3):
        closure = ftd.make_closure(
            net, buffer[0], 0, image_syn, syn_lr, label_syn, args=mtt_args(), seed=it
        )
        optimizer.step(closure, skip_if=(lambda loss: True) if it == 1 else None)
        expected = decay * expected + (1 - decay) * image_syn.detach()
        torch.testing.assert_close(ema.average, expected, rtol=1e-14, atol=0)
    assert ema.updates == 3
    with pytest.raises(ValueError, match="decay"):
        ftd.ImageEMA(image_syn, decay=1.0)


def test_datm_window_ramps_linearly_and_samples_inside_it() -> None:
    window = datm.StartEpochWindow(
        min_start_epoch=0, current_max_start_epoch=10, max_start_epoch=20, expansion_end_epoch=1000
    )
    for it in (0, 1, 99, 100, 500, 999, 1000, 5000):
        assert window.upper(it) == min(20, 10 + (10 * it) // 1000)
    gen = torch.Generator().manual_seed(0)
    draws = [window.sample(500, gen) for _ in range(300)]
    assert min(draws) == 0
    assert max(draws) == 14
    fixed = datm.StartEpochWindow(0, 10, 20, 1000, sequential=False)
    assert fixed.upper(0) == 20
    with pytest.raises(ValueError, match="min_start_epoch"):
        datm.StartEpochWindow(min_start_epoch=5, current_max_start_epoch=5)


def test_datm_gate_skips_with_nothing_perturbed_and_labels_are_stepped_unperturbed() -> None:
    net = tiny_net()
    buffer = expert_buffer(net)
    image_syn, syn_lr, logits = outer_variables(soft=True)
    optimizer = SharpBilevelOptimizer(
        [
            {"params": [image_syn]},
            {"params": [syn_lr], "perturb": False, "lr": 1e-5},
            {"params": [logits], "perturb": False, "lr": 2.0, "momentum": 0.9},
        ],
        perturbation="sam",
        rho=0.05,
        lr=10.0,
        momentum=0.5,
    )
    seen_labels: list[Tensor] = []
    closure = datm.make_closure(
        net, buffer[0], 0, image_syn, syn_lr, logits, args=mtt_args(), seed=0
    )

    def recording(ctx: StepContext) -> Tensor:
        seen_labels.append(logits.detach().clone())
        return closure(ctx)

    state = [t.detach().clone() for t in (image_syn, syn_lr, logits)]
    loss = optimizer.step(recording, skip_if=datm.gate(threshold=-1.0))  # any loss exceeds it
    assert optimizer.skipped_steps["gate"] == 1
    assert len(seen_labels) == 1
    for t, s in zip((image_syn, syn_lr, logits), state, strict=True):
        assert torch.equal(t.detach(), s)
    optimizer.step(recording, skip_if=datm.gate(threshold=float(loss) + 1.0))
    assert torch.equal(seen_labels[1], seen_labels[2])  # labels never perturbed
    assert not torch.equal(logits.detach(), state[2])  # but stepped by their own group


def test_datm_soft_labels_average_the_experts_that_classify_correctly() -> None:
    net = tiny_net()
    image_syn, _, label_syn = outer_variables()
    gen = torch.Generator().manual_seed(5)
    experts = [
        [
            p.detach() + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            for p in net.parameters()
        ]
        for _ in range(4)
    ]
    logits = datm.soft_label_logits(net, experts, image_syn, label_syn)
    outs = []
    for params in experts:
        copy = tiny_net()
        torch.nn.utils.vector_to_parameters(
            torch.cat([t.reshape(-1) for t in params]), copy.parameters()
        )
        outs.append(copy(image_syn).detach())
    for j in range(len(label_syn)):
        right = [o[j] for o in outs if o[j].argmax() == label_syn[j]]
        expected = torch.stack(right or [o[j] for o in outs]).mean(0)
        torch.testing.assert_close(logits[j], expected, rtol=1e-12, atol=1e-12)


def test_fork_settings_that_change_the_closure() -> None:
    net = tiny_net()
    buffer = expert_buffer(net)
    image_syn, syn_lr, label_syn = outer_variables()
    no_aug = mtt.make_closure(
        net, buffer[0], 0, image_syn, syn_lr, label_syn, args=mtt_args(no_aug=True)
    )
    assert no_aug.augmentation is None
    with pytest.raises(NotImplementedError, match="texture"):
        mtt.make_closure(
            net, buffer[0], 0, image_syn, syn_lr, label_syn, args=mtt_args(texture=True)
        )
    wrapped = mtt.make_closure(
        nn.DataParallel(net), buffer[0], 0, image_syn, syn_lr, label_syn, args=mtt_args(), seed=1
    )
    plain = mtt.make_closure(
        net, buffer[0], 0, image_syn, syn_lr, label_syn, args=mtt_args(), seed=1
    )
    for a, b in zip(
        grads_after(wrapped, [image_syn]), grads_after(plain, [image_syn]), strict=True
    ):
        assert torch.equal(a, b)
    # DATM's non-sequential configs (e.g. CIFAR-10 IPC1: min 0, current 20, max 4) are valid.
    window = datm.StartEpochWindow(0, 20, 4, 1000, sequential=False)
    assert window.upper(10) == 4
    assert ftd.ImageEMA(image_syn).module[0].shape == image_syn.shape


def test_a_non_positive_syn_lr_is_refused_and_nothing_is_left_perturbed() -> None:
    net = tiny_net()
    buffer = expert_buffer(net)
    image_syn, syn_lr, label_syn = outer_variables()
    with torch.no_grad():
        syn_lr.fill_(-0.01)
    opt = SharpBilevelOptimizer([image_syn], perturbation="sam", lr=1.0)
    before = image_syn.detach().clone()
    closure = mtt.make_closure(
        net, buffer[0], 0, image_syn, syn_lr, label_syn, args=mtt_args(), seed=0
    )
    with pytest.raises(ValueError, match=r"syn_lr is -0\.01"):
        opt.step(closure)
    assert torch.equal(image_syn.detach(), before)


def test_experts_as_flat_vectors_give_the_same_objective() -> None:
    net = tiny_net()
    buffer = expert_buffer(net)
    flat_trajectory = [torch.cat([t.reshape(-1) for t in epoch]) for epoch in buffer[0]]
    image_syn, syn_lr, label_syn = outer_variables()
    as_lists = mtt.make_closure(
        net, buffer[0], 1, image_syn, syn_lr, label_syn, args=mtt_args(), seed=2
    )
    as_flat = mtt.make_closure(
        net, flat_trajectory, 1, image_syn, syn_lr, label_syn, args=mtt_args(), seed=2
    )
    for a, b in zip(
        grads_after(as_lists, [image_syn, syn_lr]),
        grads_after(as_flat, [image_syn, syn_lr]),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_floor_syn_lr_keeps_the_inner_lr_positive_after_every_step() -> None:
    from sharp_bilevel.adapters import datm, ftd, mtt

    from sharp_bilevel import SharpBilevelOptimizer

    assert ftd.floor_syn_lr is mtt.floor_syn_lr is datm.floor_syn_lr
    syn_lr = torch.tensor(0.01, requires_grad=True)
    phi = torch.zeros(3, requires_grad=True)
    opt = SharpBilevelOptimizer(
        [{"params": [phi]}, {"params": [syn_lr], "perturb": False, "lr": 1.0}],
        perturbation="none",
        lr=0.1,
    )
    handle = mtt.floor_syn_lr(opt, syn_lr, floor=1e-6)

    def closure():
        loss = (phi - 1).square().sum() + 5.0 * syn_lr  # d/d syn_lr = 5: one step -> 0.01 - 5
        loss.backward()
        return loss

    opt.step(closure)
    assert float(syn_lr.detach()) == pytest.approx(1e-6)
    handle.remove()
    opt.step(closure)
    assert float(syn_lr.detach()) < 0  # without the hook the step goes below zero
    with pytest.raises(ValueError, match="finite number > 0"):
        mtt.floor_syn_lr(opt, syn_lr, floor=0.0)


@pytest.mark.parametrize("adapter", ["mtt", "ftd", "datm"])
def test_every_variant_passes_through_each_adapter(adapter: str) -> None:
    """PAD, ATT, fixed samples and TESLA through ``make_closure`` equal the objective built
    with the same options directly (and each changes the gradient)."""
    from sharp_bilevel.trajectory.hypergradient import UnrollSettings
    from sharp_bilevel.trajectory.selection import ParameterSelection

    module = {"mtt": mtt, "ftd": ftd, "datm": datm}[adapter]
    soft = adapter == "datm"
    net = tiny_net()
    buffer = expert_buffer(net)
    image_syn, syn_lr, label_syn = outer_variables(soft=soft)
    gen = torch.Generator().manual_seed(8)
    fixed = torch.randn(3, 1, SIZE, SIZE, generator=gen, dtype=torch.float64)
    fixed_labels = (
        torch.randn(3, CLASSES, generator=gen, dtype=torch.float64) if soft else torch.arange(3)
    )
    leaves = [image_syn, syn_lr, *([label_syn] if soft else [])]
    variants: list[dict[str, object]] = [
        {"selection": ParameterSelection("depth", 0.5)},
        {"match_step": "closest"},
        {"fixed_images": fixed, "fixed_labels": fixed_labels},
        {"settings": UnrollSettings.tesla()},
        {"settings": UnrollSettings(keep=(1, 4))},
    ]
    plain = grads_after(
        module.make_closure(
            net, buffer[0], 1, image_syn, syn_lr, label_syn, args=mtt_args(), seed=3
        ),
        leaves,
    )
    for options in variants:
        closure = module.make_closure(
            net, buffer[0], 1, image_syn, syn_lr, label_syn, args=mtt_args(), seed=3, **options
        )
        direct = TrajectoryMatching(
            net,
            image_syn,
            syn_lr,
            label_syn,
            expert_start=buffer[0][1],
            expert_target=buffer[0][3],
            syn_steps=5,
            batch_syn=4,
            soft_labels=soft,
            augmentation=closure.augmentation,
            seed=3,
            **options,  # type: ignore[arg-type]
        )
        ours = grads_after(closure, leaves)
        for a, b in zip(ours, grads_after(direct, leaves), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
        assert not torch.allclose(ours[0], plain[0]), options
