"""Flatness measures: HVPs, power iteration and perturbation sweeps against closed forms, finite
differences and the trajectory-matching closure (a second implementation of the outer loss)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from sharp_bilevel.distill.flatness import (
    FixedOuterLoss,
    Window,
    dominant_eigenvalue,
    hessian_vector_product,
    loss_under_perturbation,
    perturb,
    random_directions,
)
from sharp_bilevel.distill.networks import get_network
from sharp_bilevel.trajectory.augment import DSA
from sharp_bilevel.trajectory.hypergradient import UnrollSettings
from sharp_bilevel.trajectory.matching import TrajectoryMatching
from sharp_bilevel.trajectory.student import FunctionalStudent

D = torch.float64


def _symmetric(eigenvalues: list[float], seed: int = 0) -> Tensor:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=D))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=D)) @ q.T


def test_hvp_of_a_quadratic_is_a_times_v() -> None:
    a = _symmetric([3.0, -1.0, 0.5, 2.0, 0.1])
    x = torch.randn(5, dtype=D)
    v = torch.randn(5, dtype=D)
    hv = hessian_vector_product(lambda z: 0.5 * z @ a @ z + z.sin().sum(), x, v)
    torch.testing.assert_close(hv, a @ v - x.sin() * v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top", [7.0, -7.0])
def test_power_iteration_finds_the_eigenvalue_largest_in_magnitude(top: float) -> None:
    a = _symmetric([top, 3.0, -2.0, 1.0, 0.5, 0.2])
    eig = dominant_eigenvalue(
        lambda z: 0.5 * z @ a @ z, torch.randn(6, dtype=D), iterations=200, tol=1e-14
    )
    assert eig.value == pytest.approx(top, rel=1e-9)
    torch.testing.assert_close(a @ eig.vector, top * eig.vector, rtol=0, atol=1e-5)
    assert len(eig.history) < 200  # stopped on the tolerance


def _problem(seed: int = 0, batch_syn: int | None = None) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    network = get_network("ConvNet", 1, 4, (8, 8), seed=seed, width=4).to(D)
    student = FunctionalStudent(network)
    p = student.num_params
    expert = [
        [t.detach().clone() for t in student.unflatten(w).values()]
        for w in (torch.randn(p, generator=g, dtype=D) * 0.1 + 0.01 * k for k in range(4))
    ]
    images = torch.randn(8, 1, 8, 8, generator=g, dtype=D)
    labels = torch.arange(4).repeat(2)
    return {
        "network": network,
        "student": student,
        "expert": expert,
        "images": images,
        "labels": labels,
        "batch_syn": batch_syn,
    }


def _fixed(prob: dict[str, object], count: int, seed: int) -> FixedOuterLoss:
    return FixedOuterLoss.from_experts(
        prob["network"],  # type: ignore[arg-type]
        prob["labels"],  # type: ignore[arg-type]
        0.02,
        [prob["expert"]],  # type: ignore[list-item]
        image_shape=(1, 8, 8),
        count=count,
        syn_steps=3,
        expert_epochs=2,
        max_start_epoch=2,
        batch_syn=prob["batch_syn"],  # type: ignore[arg-type]
        augmentation=DSA(),
        seed=seed,
    )


def _closure(
    prob: dict[str, object], window: Window, images: Tensor, settings: UnrollSettings | None = None
) -> TrajectoryMatching:
    """The library's closure on ``window``'s expert snapshots and step plan (the same minibatches
    and DSA draws)."""
    closure = TrajectoryMatching(
        prob["student"],  # type: ignore[arg-type]
        images,
        torch.tensor(0.02, dtype=D),
        prob["labels"],  # type: ignore[arg-type]
        expert_start=window.start,
        expert_target=window.target,
        syn_steps=3,
        batch_syn=prob["batch_syn"],  # type: ignore[arg-type]
        augmentation=DSA(),
        settings=settings,
    )
    closure.plan = window.plan
    return closure


@pytest.mark.parametrize("batch_syn", [None, 3])
def test_fixed_loss_equals_the_closure_on_the_same_window(batch_syn: int | None) -> None:
    prob = _problem(batch_syn=batch_syn)
    loss = _fixed(prob, count=1, seed=5)
    window = loss.windows[0]
    images = prob["images"].clone().requires_grad_()  # type: ignore[attr-defined]
    reference = _closure(prob, window, images)()
    value = loss(images)
    assert float(value.detach()) == pytest.approx(float(reference), rel=1e-12)
    (grad,) = torch.autograd.grad(value, images)
    torch.testing.assert_close(grad, images.grad, rtol=1e-10, atol=1e-14)
    # without graph: the same value
    assert float(loss(images.detach())) == pytest.approx(float(reference), rel=1e-12)


def test_a_window_term_from_step_iota_has_the_tuh_image_gradient() -> None:
    prob = _problem(batch_syn=3)
    loss = _fixed(prob, count=1, seed=5)
    window = loss.windows[0]
    settings = UnrollSettings(keep=1 / 3)
    iota, _ = settings.resolve(3, None)
    assert iota == 2  # one kept step of three: the truncation matters
    images = prob["images"].clone().requires_grad_()  # type: ignore[attr-defined]
    reference = _closure(prob, window, images, settings)()
    x = prob["images"].clone().requires_grad_()  # type: ignore[attr-defined]
    value = loss.term(window, x, graph_from=iota)
    assert float(value.detach()) == pytest.approx(float(reference), rel=1e-12)
    (grad,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(grad, images.grad, rtol=1e-10, atol=1e-14)
    (exact,) = torch.autograd.grad(loss.term(window, x, graph_from=0), x)
    assert not torch.allclose(grad, exact)  # the truncated gradient is another one
    with pytest.raises(ValueError, match="graph_from must be an int in"):
        loss.term(window, x, graph_from=4)


def test_fixed_loss_is_the_mean_over_its_windows_and_deterministic() -> None:
    prob = _problem()
    loss = _fixed(prob, count=3, seed=1)
    x = prob["images"]  # type: ignore[assignment]
    singles = [
        FixedOuterLoss(prob["network"], prob["labels"], 0.02, [w], DSA())(x)  # type: ignore[arg-type]
        for w in loss.windows
    ]
    assert float(loss(x)) == pytest.approx(sum(map(float, singles)) / 3, rel=1e-12)
    assert float(loss(x)) == float(_fixed(prob, count=3, seed=1)(x))
    assert float(loss(x)) != float(_fixed(prob, count=3, seed=2)(x))


def test_hvp_through_the_unroll_matches_finite_differences() -> None:
    prob = _problem()
    loss = _fixed(prob, count=2, seed=3)
    x: Tensor = prob["images"]  # type: ignore[assignment]
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=D)

    def grad(z: Tensor) -> Tensor:
        z = z.detach().requires_grad_()
        return torch.autograd.grad(loss(z), z)[0]

    h = 1e-5
    fd = (grad(x + h * v) - grad(x - h * v)) / (2 * h)
    hv = hessian_vector_product(loss, x, v)
    assert float((hv - fd).norm() / fd.norm()) < 1e-7


def test_perturbations_lie_at_the_relative_radius() -> None:
    x = torch.randn(3, 1, 4, 4, dtype=D)
    d = random_directions(x, 4, torch.Generator().manual_seed(0))
    assert d.shape == (4, *x.shape)
    torch.testing.assert_close(d.flatten(1).norm(dim=1), torch.ones(4, dtype=D))
    radii = [0.0, 0.05, 0.3]
    out = loss_under_perturbation(lambda z: (z - x).norm(), x, radii, d)
    for r, row in zip(radii, out, strict=True):
        assert row == pytest.approx([r * float(x.norm())] * 4, rel=1e-12, abs=1e-15)
    # the directions are independent draws, not one direction repeated
    assert not torch.allclose(perturb(x, 0.1, d[0]), perturb(x, 0.1, d[1]))


def test_bad_arguments_are_named() -> None:
    prob = _problem()
    x = torch.zeros(2, dtype=D)
    with pytest.raises(ValueError, match="iterations"):
        dominant_eigenvalue(lambda z: z.square().sum(), x, iterations=0)
    with pytest.raises(ValueError, match="tol"):
        dominant_eigenvalue(lambda z: z.square().sum(), x, tol=-1)
    with pytest.raises(ValueError, match="radius"):
        perturb(x, -0.1, x + 1)
    with pytest.raises(ValueError, match="count"):
        random_directions(x, 0, torch.Generator())
    with pytest.raises(ValueError, match="directions"):
        loss_under_perturbation(lambda z: z.sum(), x, [0.1], torch.zeros(2, 3, dtype=D))
    with pytest.raises(ValueError, match="v must have the shape"):
        hessian_vector_product(lambda z: z.sum(), x, torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="syn_lr"):
        FixedOuterLoss(prob["network"], prob["labels"], -1.0, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="windows"):
        FixedOuterLoss(prob["network"], prob["labels"], 0.1, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_start_epoch - 1 \\+ expert_epochs"):
        FixedOuterLoss.from_experts(
            prob["network"],  # type: ignore[arg-type]
            prob["labels"],  # type: ignore[arg-type]
            0.1,
            [prob["expert"]],  # type: ignore[list-item]
            image_shape=(1, 8, 8),
            count=1,
            syn_steps=2,
            expert_epochs=3,
            max_start_epoch=2,
        )
