r"""How flat is the outer loss around a synthetic set? Perturbation sweeps and the Hessian's top
eigenvalue with respect to the images.

The outer loss of trajectory matching is random (expert, start epoch, minibatches, DSA draws).
`FixedOuterLoss` freezes that randomness into $K$ windows and plans drawn once, so

$$
\bar L(x) = \frac{1}{K} \sum_{k=1}^{K}
  \frac{\lVert w^{(k)}_N(x) - w^*_{k,t+M} \rVert^2}{\lVert w^*_{k,t} - w^*_{k,t+M} \rVert^2}
$$

is a deterministic, twice-differentiable function of the images $x$ (exact BPTT through all $N$
inner steps). On it:

* `loss_under_perturbation` evaluates $\bar L(x + r \lVert x \rVert d)$ for unit directions $d$
  (Gaussian, drawn from a seeded generator) and relative radii $r$ (the seed paper's Fig. 2);
* `dominant_eigenvalue` runs power iteration with exact Hessian-vector products
  $H v = \nabla_x \langle \nabla_x \bar L(x), v \rangle$ (double backward through the unroll)
  and returns the Rayleigh quotient $v^\top H v$ of the eigenvalue largest in magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..trajectory.step_plan import Augmentation, StepPlan
from ..trajectory.student import FunctionalStudent, Student
from ..trajectory.unroll import matching_loss, unroll
from .experts import Expert

LossFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Window:
    """One frozen outer-loss term: the expert's start and target (flat) and the step plan."""

    start: Tensor
    target: Tensor
    plan: StepPlan


class FixedOuterLoss:
    r"""$\bar L(x)$: the matching loss averaged over frozen windows, a function of the images.

    Call it with images ``[n, C, H, W]``: with ``images.requires_grad`` the whole unroll keeps
    its graph (so `torch.autograd.grad` with ``create_graph=True`` gives Hessian-vector
    products); otherwise the inner steps run without graph (a cheap evaluation).

    Args:
        network: the student architecture (never modified; its buffers are used as given).
        labels: hard labels ``[n]`` of the synthetic set.
        syn_lr: the inner learning rate (the set's learned ``syn_lr``), > 0.
        windows: the frozen terms (see `FixedOuterLoss.from_experts`).
        augmentation: applies the plans' draws (None: no augmentation).
    """

    def __init__(
        self,
        network: nn.Module | Student,
        labels: Tensor,
        syn_lr: float,
        windows: Sequence[Window],
        augmentation: Augmentation | None = None,
    ) -> None:
        if not (isinstance(syn_lr, (int, float)) and 0 < syn_lr < math.inf):
            raise ValueError(f"syn_lr must be a finite number > 0, got {syn_lr!r}")
        if not windows:
            raise ValueError("windows must hold at least one Window")
        self.student = network if not isinstance(network, nn.Module) else FunctionalStudent(network)
        self.labels = labels
        self.syn_lr = torch.tensor(float(syn_lr), dtype=self.student.dtype)
        self.windows = list(windows)
        self.augmentation = augmentation

    @classmethod
    def from_experts(
        cls,
        network: nn.Module,
        labels: Tensor,
        syn_lr: float,
        experts: Sequence[Expert],
        *,
        image_shape: Sequence[int],
        count: int,
        syn_steps: int,
        expert_epochs: int,
        max_start_epoch: int,
        batch_syn: int | None = None,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ) -> FixedOuterLoss:
        """Draw ``count`` windows as the pipeline does (expert uniformly, start epoch in
        ``[0, max_start_epoch)``, target ``expert_epochs`` later, one MTT step plan each) from a
        generator seeded with ``seed``; ``image_shape`` is one image's ``[C, H, W]``."""
        if not (isinstance(count, int) and count >= 1):
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        if not experts:
            raise ValueError("experts must hold at least one trajectory")
        for name, value in (("max_start_epoch", max_start_epoch), ("expert_epochs", expert_epochs)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        shortest = min(len(e) for e in experts)
        if max_start_epoch - 1 + expert_epochs >= shortest:
            raise ValueError(
                f"max_start_epoch - 1 + expert_epochs = {max_start_epoch - 1 + expert_epochs} "
                f"needs more snapshots than the shortest expert has ({shortest})"
            )
        student = FunctionalStudent(network)
        generator = torch.Generator().manual_seed(seed)
        windows = []
        for _ in range(count):
            expert = experts[int(torch.randint(len(experts), (1,), generator=generator))]
            t = int(torch.randint(max_start_epoch, (1,), generator=generator))
            plan = StepPlan.mtt(
                len(labels),
                syn_steps,
                batch_syn,
                generator=generator,
                sample_shape=tuple(image_shape),
                augmentation=augmentation,
            )
            windows.append(
                Window(
                    student.flatten(list(expert[t])).detach(),
                    student.flatten(list(expert[t + expert_epochs])).detach(),
                    plan,
                )
            )
        return cls(student, labels, syn_lr, windows, augmentation)

    def __call__(self, images: Tensor) -> Tensor:
        total = images.new_zeros(())
        for window in self.windows:
            total = total + self.term(window, images)
        return total / len(self.windows)

    def term(self, window: Window, images: Tensor, graph_from: int | None = None) -> Tensor:
        r"""One window's matching loss. ``graph_from`` ($\iota$) keeps the graph from that inner
        step on only (TUH: the image gradient is then the truncated one); None keeps all of it
        when ``images.requires_grad`` and none otherwise."""
        steps = window.plan.num_steps
        if graph_from is None:
            graph_from = 0 if images.requires_grad else steps
        elif not (isinstance(graph_from, int) and 0 <= graph_from <= steps):
            raise ValueError(f"graph_from must be an int in [0, {steps}], got {graph_from!r}")
        result = unroll(
            self.student,
            window.start,
            images,
            self.labels,
            self.syn_lr,
            window.plan,
            augmentation=self.augmentation,
            graph_from=graph_from,
        )
        return matching_loss(result.final, window.target, window.start)


def hessian_vector_product(loss_fn: LossFn, x: Tensor, v: Tensor) -> Tensor:
    r"""$H v = \nabla_x \langle \nabla_x \ell(x), v \rangle$ at ``x`` (exact, double backward)."""
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    point = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(point), point, create_graph=True)
    (hv,) = torch.autograd.grad((grad * v).sum(), point)
    return hv.detach()


@dataclass(frozen=True)
class Eigen:
    """Power iteration's answer: the Rayleigh quotient ``value``, its unit ``vector`` and the
    quotient after every iteration (``history``)."""

    value: float
    vector: Tensor
    history: list[float] = field(default_factory=list)


def dominant_eigenvalue(
    loss_fn: LossFn,
    x: Tensor,
    *,
    iterations: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> Eigen:
    r"""The Hessian eigenvalue of ``loss_fn`` at ``x`` largest in magnitude, by power iteration:
    $v \leftarrow H v / \lVert H v \rVert$ from a Gaussian start, stopping after ``iterations``
    products or when the Rayleigh quotient $\lambda = v^\top H v$ changes by less than
    ``tol * |lambda|``. One product costs about three backward passes through the unroll.
    """
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    v = v / v.norm()
    history: list[float] = []
    for _ in range(iterations):
        hv = hessian_vector_product(loss_fn, x, v)
        value = float((v * hv).sum())
        history.append(value)
        norm = hv.norm()
        if not bool(norm > 0):
            break
        v = hv / norm
        if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
            break
    return Eigen(history[-1], v, history)


def random_directions(x: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` Gaussian directions of unit norm, shape ``[count, *x.shape]``."""
    if not (isinstance(count, int) and count >= 1):
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    d = torch.randn((count, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
    unit: Tensor = d / d.flatten(1).norm(dim=1).view(count, *([1] * x.dim()))
    return unit


def perturb(x: Tensor, radius: float, direction: Tensor) -> Tensor:
    r"""$x + r \lVert x \rVert d / \lVert d \rVert$: a point at relative distance ``radius``."""
    if not (isinstance(radius, (int, float)) and radius >= 0):
        raise ValueError(f"radius must be a number >= 0, got {radius!r}")
    moved: Tensor = x + radius * x.norm() * direction / direction.norm()
    return moved


def loss_under_perturbation(
    loss_fn: LossFn, x: Tensor, radii: Sequence[float], directions: Tensor
) -> list[list[float]]:
    r"""``out[i][j] = loss_fn(x + r_i ||x|| d_j)`` (no graph) for the radii and unit directions."""
    if directions.shape[1:] != x.shape:
        raise ValueError(
            f"directions must be [count, {', '.join(map(str, x.shape))}], "
            f"got {tuple(directions.shape)}"
        )
    base = x.detach()
    return [[float(loss_fn(perturb(base, r, d))) for d in directions] for r in radii]
