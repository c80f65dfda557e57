"""Expert trajectories: train them, check them, and give the student their flat vectors.

An *expert* is the list of its parameter snapshots, ``expert[e]`` after ``e`` epochs
(``expert[0]`` is the initialisation), each snapshot a list of CPU tensors in
``net.parameters()`` order. The buffer files (MTT's ``replay_buffer_{n}.pt``) live in
`sharp_bilevel.distill.expert_buffers`; their names are re-exported here.

* `train_expert`: one expert with SGD (MTT) or GSAM (FTD), seeded and reproducible.
* `validate_expert`, `expert_params`, `expert_window`: checks and the flat
  ``[P]`` vectors the student consumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim.context import StepContext
from ..optim.errors import NonFiniteError
from ..optim.optimizer import SharpBilevelOptimizer
from ..trajectory.augment import DSAParams
from ..trajectory.augment import dsa as _apply_dsa
from ..trajectory.matching import check_window
from ..trajectory.student import FunctionalStudent
from .data import ImageDataset
from .expert_buffers import (
    Expert,
    experts_fingerprint,
    load_buffer_file,
    load_buffers,
    mtt_buffer_dir,
    save_buffers,
)
from .networks import get_network

__all__ = [
    "DEFAULT_DSA",
    "Expert",
    "expert_params",
    "expert_window",
    "experts_fingerprint",
    "load_buffer_file",
    "load_buffers",
    "mtt_buffer_dir",
    "save_buffers",
    "train_expert",
    "validate_expert",
]

#: MTT's augmentation defaults, the default of `train_expert`.
DEFAULT_DSA = DSAParams()

# --------------------------------------------------------------------------------------------
# training


def _build(
    network: str | Callable[[], nn.Module],
    data: ImageDataset,
    seed: int,
    network_kwargs: dict[str, Any] | None,
) -> nn.Module:
    if isinstance(network, str):
        return get_network(
            network,
            data.channels,
            data.num_classes,
            data.image_size,
            seed=seed,
            **(network_kwargs or {}),
        )
    if isinstance(network, nn.Module):
        raise TypeError(
            "network must be a name or a zero-argument factory returning a new nn.Module "
            "(e.g. lambda: MyNet()), not a module instance"
        )
    if not callable(network):
        raise TypeError(f"network must be a name or a factory, got {type(network).__name__}")
    if network_kwargs:
        raise ValueError("network_kwargs apply to a network given by name only")
    # Seed the initialisation without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        net = network()
    if not isinstance(net, nn.Module):
        raise TypeError(f"the network factory must return an nn.Module, got {type(net).__name__}")
    return net


@contextmanager
def _frozen_running_stats(net: nn.Module, frozen: bool) -> Iterator[None]:
    """Batch-norm running statistics left unchanged inside (GSAM's second pass, as in FTD)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not frozen or not norms:
        yield
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


def _gsam_closure(net: nn.Module, x: Tensor, y: Tensor) -> Callable[[StepContext], Tensor]:
    def closure(ctx: StepContext) -> Tensor:
        with _frozen_running_stats(net, ctx.is_descent):
            loss = F.cross_entropy(net(x), y)
        torch.autograd.backward(loss)
        return loss

    return closure


def _snapshot(net: nn.Module) -> list[Tensor]:
    # copy=True: on CPU, ``p.detach().cpu()`` would alias the live parameter.
    return [p.detach().to("cpu", copy=True) for p in net.parameters()]


def train_expert(
    network: str | Callable[[], nn.Module],
    data: ImageDataset,
    *,
    epochs: int,
    seed: int,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    dsa: DSAParams | None = DEFAULT_DSA,
    optimizer: Literal["sgd", "gsam"] = "sgd",
    rho: float = 0.01,
    alpha: float = 0.4,
    adaptive: bool = False,
    device: torch.device | str = "cpu",
    network_kwargs: dict[str, Any] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Expert:
    """Train one expert the way MTT's ``buffer.py`` does and return its trajectory.

    Each epoch visits the training images once in a fresh random order, in mini-batches of
    ``batch_size`` (the last one smaller), applies DSA to each batch (unless ``dsa=None``) and
    takes one optimizer step on the mean cross-entropy. The learning rate is constant.

    Args:
        network: a name for `get_network` (built for
            ``data``'s shape and classes with ``seed``), or a zero-argument factory (called with
            the CPU RNG seeded by ``seed`` inside ``fork_rng``).
        data: the (normalised, possibly ZCA-whitened) training images.
        epochs: ``E >= 1`` epochs.
        seed: seeds the initialisation, the shuffling and DSA. Only private generators are
            used: the global RNG is untouched, and the same seed gives a bit-identical
            trajectory on the same device.
        lr: learning rate (MTT's ``lr_teacher``).
        momentum: SGD momentum (MTT's ``--mom``, default 0).
        weight_decay: SGD weight decay (MTT's ``--l2``, default 0).
        batch_size: MTT's ``batch_train`` (256).
        dsa: augmentation strengths, None for none.
        optimizer: ``"sgd"`` (MTT) or ``"gsam"`` (FTD's experts: `SharpBilevelOptimizer`
            with ``perturbation="gsam"`` over SGD; batch norm statistics are not updated in its
            second pass).
        rho: GSAM radius (FTD's scripts: 0.01).
        alpha: GSAM's surrogate-gap weight (FTD: 0.4; DATM's README: 0.3).
        adaptive: GSAM with ASAM's ascent (FTD's buffer script runs with ``adaptive=True``).
        device: where to train; snapshots are always CPU copies.
        network_kwargs: extra arguments to ``get_network`` (``width``, ``depth``, ``norm``).
        on_epoch: called as ``on_epoch(epoch, mean_train_loss)`` after epochs ``1..E``.

    Returns:
        ``E + 1`` snapshots: ``expert[0]`` the initial parameters, ``expert[e]`` after epoch
        ``e``; each a list of CPU tensors in ``net.parameters()`` order.

    Raises:
        NonFiniteError: the loss became NaN or infinite (try a smaller ``lr``).
        ValueError: a bad argument.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if optimizer not in ("sgd", "gsam"):
        raise ValueError(f"optimizer must be 'sgd' or 'gsam', got {optimizer!r}")
    if not isinstance(data, ImageDataset) or len(data) == 0:
        raise ValueError("data must be a non-empty ImageDataset")
    if dsa is not None and not isinstance(dsa, DSAParams):
        raise TypeError(f"dsa must be a DSAParams or None, got {type(dsa).__name__}")

    net = _build(network, data, seed, network_kwargs).to(device)
    net.train()
    params = list(net.parameters())
    if not params:
        raise ValueError("the network has no parameters")
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = SharpBilevelOptimizer(
            params,
            base_optimizer=torch.optim.SGD,
            perturbation="gsam",
            rho=rho,
            alpha=alpha,
            adaptive=adaptive,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
        )

    # Two private streams, so turning DSA on or off does not change the batch order.
    seeds = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(seed))
    shuffle_gen = torch.Generator().manual_seed(int(seeds[0]))
    aug_gen = torch.Generator().manual_seed(int(seeds[1]))
    images = data.images.to(device)
    labels = data.labels.to(device)
    n = len(data)

    trajectory: Expert = [_snapshot(net)]
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=shuffle_gen).to(device)
        total, count = 0.0, 0
        for batch, start in enumerate(range(0, n, batch_size)):
            idx = order[start : start + batch_size]
            x, y = images[idx], labels[idx]
            if dsa is not None:
                x = _apply_dsa(x, dsa, aug_gen)
            if isinstance(opt, SharpBilevelOptimizer):
                try:
                    loss = opt.step(_gsam_closure(net, x, y))
                except NonFiniteError as exc:
                    raise NonFiniteError(
                        f"expert training diverged at epoch {epoch}, batch {batch} (lr={lr}): "
                        f"{exc}; try a smaller lr"
                    ) from exc
                report = opt.last_step
                if report is not None and report.skipped == "nonfinite":
                    loss = torch.tensor(float("nan"))
            else:
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(x), y)
                if torch.isfinite(loss):
                    torch.autograd.backward(loss)
                    opt.step()
            value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"expert training diverged at epoch {epoch}, batch {batch} (lr={lr}): "
                    "non-finite loss; try a smaller lr"
                )
            total += value * int(idx.numel())
            count += int(idx.numel())
        trajectory.append(_snapshot(net))
        if on_epoch is not None:
            on_epoch(epoch, total / count)
    return trajectory


# --------------------------------------------------------------------------------------------
# checks and flat vectors


def _layout(network: nn.Module | FunctionalStudent) -> list[tuple[str, torch.Size]]:
    if isinstance(network, FunctionalStudent):
        return list(zip(network.names, network.shapes, strict=True))
    if isinstance(network, nn.Module):
        return [(name, p.shape) for name, p in network.named_parameters()]
    raise TypeError(
        f"network must be an nn.Module or a FunctionalStudent, got {type(network).__name__}"
    )


def validate_expert(
    expert: Sequence[Sequence[Tensor]], network: nn.Module | FunctionalStudent
) -> None:
    """Check that every snapshot of ``expert`` matches ``network``'s parameters.

    Raises:
        ValueError: an empty expert, a snapshot with the wrong number of tensors, a non-tensor,
            or a shape mismatch; the message gives the epoch, the parameter index and name,
            and the expected and found shapes.
    """
    layout = _layout(network)
    if not isinstance(expert, (list, tuple)) or not expert:
        raise ValueError("the expert has no snapshots (expected a non-empty list of epochs)")
    for e, snap in enumerate(expert):
        if not isinstance(snap, (list, tuple)):
            raise ValueError(f"epoch {e}: expected a list of tensors, got {type(snap).__name__}")
        if len(snap) != len(layout):
            raise ValueError(
                f"epoch {e} has {len(snap)} tensors but the network has {len(layout)} "
                "parameters: the buffer was made for a different network"
            )
        for k, (t, (name, shape)) in enumerate(zip(snap, layout, strict=True)):
            if not isinstance(t, Tensor):
                raise ValueError(
                    f"epoch {e}, parameter {k} ({name}) is a {type(t).__name__}, not a Tensor"
                )
            if t.shape != shape:
                raise ValueError(
                    f"epoch {e}, parameter {k} ({name}): expected shape {tuple(shape)}, got "
                    f"{tuple(t.shape)}: the buffer was made for a different network"
                )


def expert_params(
    expert: Sequence[Sequence[Tensor]],
    epoch: int,
    student: nn.Module | FunctionalStudent | None = None,
) -> Tensor:
    """``expert[epoch]`` flattened in parameter order: ``[P]``, the student's flat vector.

    With ``student`` given, the snapshot is first checked against its parameters.

    Raises:
        ValueError: ``epoch`` outside ``0..len(expert)-1`` (the message gives the range), or
            the snapshot does not match ``student``.
    """
    last = len(expert) - 1
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= last:
        hint = (
            " (when epoch is start_epoch + expert_epochs, that sum exceeds the trajectory "
            "length: lower max_start_epoch or expert_epochs, or train longer experts)"
            if isinstance(epoch, int) and epoch > last
            else ""
        )
        raise ValueError(
            f"epoch {epoch!r} is out of range: the expert has {len(expert)} snapshots "
            f"(epochs 0..{last}){hint}"
        )
    snap = expert[epoch]
    if student is not None:
        validate_expert([snap], student)
    return torch.cat([t.detach().reshape(-1) for t in snap])


def expert_window(
    expert: Sequence[Sequence[Tensor]],
    start_epoch: int,
    expert_epochs: int,
    student: nn.Module | FunctionalStudent | None = None,
) -> tuple[Tensor, Tensor]:
    """MTT's pair ``(w*_t, w*_{t+M})`` with ``t = start_epoch``, ``M = expert_epochs``, flat.

    Raises:
        ValueError: ``start_epoch + expert_epochs`` exceeds the trajectory (the message says
            the largest usable ``start_epoch``, i.e. MTT's ``max_start_epoch`` bound), a
            negative ``start_epoch`` or ``expert_epochs < 1``, or a snapshot that does not
            match ``student``.
    """
    check_window(len(expert), start_epoch, expert_epochs)
    return (
        expert_params(expert, start_epoch, student),
        expert_params(expert, start_epoch + expert_epochs, student),
    )
