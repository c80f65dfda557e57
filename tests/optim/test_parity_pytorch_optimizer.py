"""Parity with pytorch_optimizer 4.1.0's SAM-family classes on identical float64 problems.

pytorch_optimizer sums its global gradient norm in float32 (``get_global_gradient_norm``),
so agreement is to about 1e-7 relative, not to float64 precision; the float64 references in
``_helpers`` check our rules to 1e-12 elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from sharp_bilevel import SharpBilevelOptimizer

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

F64 = torch.float64
TOLERANCE = 1e-7  # float32 norm accumulation in the reference (see the module docstring)
STEPS, LR, MOMENTUM = 5, 0.05, 0.9


def _problem(
    shapes: tuple[tuple[int, ...], ...] = ((3, 2), (4,)),
) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in shapes]
    targets = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    return params, targets


def _loss(params: list[torch.nn.Parameter], targets: list[torch.Tensor]) -> torch.Tensor:
    return sum(
        ((p - t) ** 4).sum() / 4 + (torch.sin(p) * t).sum()
        for p, t in zip(params, targets, strict=True)
    )


def _ours(
    rule: str, shapes: tuple[tuple[int, ...], ...] = ((3, 2), (4,)), **kwargs: object
) -> list[torch.Tensor]:
    params, targets = _problem(shapes)
    opt = SharpBilevelOptimizer(params, perturbation=rule, lr=LR, momentum=MOMENTUM, **kwargs)

    def closure() -> torch.Tensor:
        loss = _loss(params, targets)
        loss.backward()
        return loss

    for _ in range(STEPS):
        opt.step(closure)
    return [p.detach() for p in params]


def _theirs(
    make: object, two_closures: bool, shapes: tuple[tuple[int, ...], ...] = ((3, 2), (4,))
) -> list[torch.Tensor]:
    params, targets = _problem(shapes)
    opt = make(params)  # type: ignore[operator]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(params, targets)
        loss.backward()
        return loss

    for _ in range(STEPS):
        if not two_closures:
            closure()  # their SAM.step expects the gradient at phi already computed
        opt.step(closure)
    return [p.detach() for p in params]


def _assert_close(
    ours: list[torch.Tensor],
    theirs: list[torch.Tensor],
    shapes: tuple[tuple[int, ...], ...] = ((3, 2), (4,)),
) -> None:
    start, _ = _problem(shapes)
    moved = max(float((a - b.detach()).abs().max()) for a, b in zip(ours, start, strict=True))
    assert moved > 1e-2  # the steps did something
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_sam_matches_pytorch_optimizer(rho: float) -> None:
    ours = _ours("sam", rho=rho, xi=1e-12)
    theirs = _theirs(
        lambda ps: pytorch_optimizer.SAM(
            ps, torch.optim.SGD, rho=rho, perturb_eps=1e-12, lr=LR, momentum=MOMENTUM
        ),
        two_closures=False,
    )
    _assert_close(ours, theirs)


@pytest.mark.parametrize(("gamma", "adaptive"), [(0.9, False), (0.5, False), (0.8, True)])
def test_wsam_matches_pytorch_optimizers_coupled_form(gamma: float, adaptive: bool) -> None:
    ours = _ours("wsam", rho=0.05, gamma=gamma, adaptive=adaptive, xi=1e-12)
    theirs = _theirs(
        lambda ps: pytorch_optimizer.WSAM(
            torch.nn.Module(),
            ps,
            torch.optim.SGD,
            rho=0.05,
            gamma=gamma,
            adaptive=adaptive,
            decouple=False,
            eps=1e-12,
            lr=LR,
            momentum=MOMENTUM,
        ),
        two_closures=True,
    )
    _assert_close(ours, theirs)


@pytest.mark.parametrize(("sigma", "lmbda", "adaptive"), [(1.0, 0.9, False), (0.5, 0.6, True)])
def test_friendly_sam_matches_pytorch_optimizer(sigma: float, lmbda: float, adaptive: bool) -> None:
    ours = _ours("fsam", rho=0.05, sigma=sigma, lmbda=lmbda, adaptive=adaptive, xi=1e-12)
    theirs = _theirs(
        lambda ps: pytorch_optimizer.FriendlySAM(
            ps,
            torch.optim.SGD,
            rho=0.05,
            sigma=sigma,
            lmbda=lmbda,
            adaptive=adaptive,
            perturb_eps=1e-12,
            lr=LR,
            momentum=MOMENTUM,
        ),
        two_closures=False,
    )
    _assert_close(ours, theirs)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_looksam_matches_pytorch_optimizer_on_one_tensor(k: int) -> None:
    """pytorch_optimizer projects per tensor and we over the whole set: one tensor makes them
    the same quantity. Its reuse step adds 1e-8 to ||g_v|| (we add xi): within the tolerance."""
    shapes = ((4, 3),)
    ours = _ours("looksam", shapes, rho=0.1, k=k, alpha=0.7, xi=1e-12)
    theirs = _theirs(
        lambda ps: pytorch_optimizer.LookSAM(
            ps,
            torch.optim.SGD,
            rho=0.1,
            k=k,
            alpha=0.7,
            perturb_eps=1e-12,
            lr=LR,
            momentum=MOMENTUM,
        ),
        two_closures=False,
        shapes=shapes,
    )
    _assert_close(ours, theirs, shapes)


def test_gcsam_ascent_matches_pytorch_optimizers_use_gc_direction() -> None:
    """pytorch_optimizer's ``SAM(use_gc=True)`` centralises the ascent gradient but divides by
    the raw gradient's norm, ``rho gc(g) / ||g||``; GCSAM's paper (and we) divide by
    ``||gc(g)||``. Same direction: their ascent point equals ours at ``rho ||gc(g)|| / ||g||``."""
    shapes = ((3, 4), (5,), (2, 3, 2))
    rho = 0.2
    params, targets = _problem(shapes)
    loss = _loss(params, targets)
    grads = torch.autograd.grad(loss, params)
    gc = [
        g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True) if g.dim() > 1 else g for g in grads
    ]
    ratio = float(
        torch.sqrt(sum((g**2).sum() for g in gc)) / torch.sqrt(sum((g**2).sum() for g in grads))
    )
    assert ratio < 0.99  # the centralisation changed the norm: the test can tell the two apart

    def ascent_point(opt_and_step: object) -> list[torch.Tensor]:
        ps, ts = _problem(shapes)
        seen: list[list[torch.Tensor]] = []

        def closure() -> torch.Tensor:
            for p in ps:
                p.grad = None
            seen.append([p.detach().clone() for p in ps])
            value = _loss(ps, ts)
            value.backward()
            return value

        opt_and_step(ps, closure)  # type: ignore[operator]
        return seen[-1]  # the second pass: phi + eps

    def theirs(ps: list[torch.nn.Parameter], closure: object) -> None:
        opt = pytorch_optimizer.SAM(
            ps, torch.optim.SGD, rho=rho, use_gc=True, perturb_eps=1e-12, lr=LR
        )
        closure()  # type: ignore[operator]
        opt.step(closure)

    def ours(ps: list[torch.nn.Parameter], closure: object) -> None:
        opt = SharpBilevelOptimizer(ps, perturbation="gcsam", rho=rho * ratio, xi=1e-12, lr=LR)
        opt.step(closure)

    for a, b in zip(ascent_point(ours), ascent_point(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=TOLERANCE, atol=TOLERANCE)
