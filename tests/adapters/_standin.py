"""Stand-ins for what an MTT/FTD/DATM fork imports from its ``utils`` (written here, in float64):
a clock-reseeding ``get_network``, expert files, a pool of "real" images and an evaluation that
draws from Python's ``random`` and numpy as upstream code may."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor, nn

CLASSES, IPC, SIZE = 3, 3, 6


def args(**overrides: object) -> SimpleNamespace:
    """The fork's argparse namespace (the fields the swap pages' lines read)."""
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
    values: dict[str, object] = dict(
        classes=CLASSES,
        ipc=IPC,
        Iteration=4,
        eval_it=2,
        num_eval=2,
        syn_steps=4,
        expert_epochs=2,
        max_start_epoch=3,
        min_start_epoch=0,
        batch_syn=4,
        dsa=True,
        dsa_strategy="color_crop_cutout_flip_scale_rotate",
        dsa_param=dsa_param,
        lr_img=100.0,
        lr_lr=1e-5,
        lr_teacher=0.05,
        lr_y=2.0,
        Momentum_y=0.9,
        threshold=1e9,
        ema_decay=0.9,
        device=[0, 1],
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def get_network() -> nn.Module:
    """Like upstream's: reseeds torch's global RNG from the wall clock, then builds a net."""
    torch.random.manual_seed(int(time.time() * 1000) % 100000)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.GroupNorm(3, 3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, CLASSES),
    ).double()


def load_buffer(name: str, experts: int = 3, epochs: int = 5) -> list[list[list[Tensor]]]:
    """One expert file: the same contents on every rank (as a file on a shared disk)."""
    gen = torch.Generator().manual_seed({"a": 1, "b": 2}[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed({"a": 1, "b": 2}[name])
        shapes = [p.shape for p in get_network().parameters()]
    buffer = []
    for _ in range(experts):
        snapshot = [0.3 * torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        trajectory = [snapshot]
        for _ in range(epochs):
            snapshot = [
                t + 0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in snapshot
            ]
            trajectory.append(snapshot)
        buffer.append(trajectory)
    return buffer


_REAL = torch.randn(CLASSES, 10, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(9))


def get_images(c: int, n: int) -> Tensor:
    """``n`` random "real" images of class ``c`` (numpy's global RNG picks them, as upstream)."""
    picks = np.random.permutation(_REAL.shape[1])[:n]  # noqa: NPY002 (as upstream)
    return _REAL[c, torch.as_tensor(picks)].double()


_EVALUATIONS = [0]


def evaluate(net: nn.Module, images: Tensor, labels: Tensor, lr: float) -> float:
    """A stand-in evaluation: it draws from ``random`` and numpy (as a fork's may) and returns
    an increasing score, so every evaluation counts as the best so far."""
    assert images.shape[0] == labels.shape[0] == CLASSES * IPC, "evaluation needs the whole set"
    random.random()
    np.random.rand()  # noqa: NPY002 (as upstream)
    with torch.no_grad():
        net(images.float().double())
    _EVALUATIONS[0] += 1
    return float(_EVALUATIONS[0])


class ModelEma:
    """FTD's ``ModelEmaV2`` over a list of tensors: ``e <- d e + (1 - d) m``."""

    def __init__(self, tensors: list[Tensor], decay: float) -> None:
        self.module = [t.detach().clone() for t in tensors]
        self.decay = decay

    @torch.no_grad()
    def update(self, tensors: list[Tensor]) -> None:
        for e, m in zip(self.module, tensors, strict=True):
            e.mul_(self.decay).add_(m.detach(), alpha=1 - self.decay)


def save(directory: str, name: str, it: int, tensor: Tensor) -> None:
    """Write ``tensor`` and record which rank wrote it."""
    import os

    torch.save(tensor.detach().cpu().clone(), os.path.join(directory, f"{name}_{it}.pt"))
    with open(os.path.join(directory, "writes.log"), "a") as log:
        log.write(f"{os.environ.get('RANK', '-')} {name}_{it} {tuple(tensor.shape)}\n")
