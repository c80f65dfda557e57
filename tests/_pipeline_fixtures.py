"""Tiny data, experts and configs shared by the pipeline and CLI tests."""

from __future__ import annotations

import torch
from torch import Tensor

from sharp_bilevel.distill.networks import get_network
from sharp_bilevel.distill.pipeline import DistillConfig

CLASSES = 3


def tiny_data(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat(6)
    images = torch.randn(len(labels), 1, 8, 8, generator=gen) + labels.view(-1, 1, 1, 1)
    return images, labels


def tiny_experts(width: int = 4, epochs: int = 4, count: int = 2) -> list[list[list[Tensor]]]:
    net = get_network("ConvNet", 1, CLASSES, (8, 8), width=width, seed=0)
    gen = torch.Generator().manual_seed(1)
    experts = []
    for _ in range(count):
        snap = [p.detach().clone() for p in net.parameters()]
        traj = [snap]
        for _ in range(epochs):
            snap = [t + 0.02 * torch.randn(t.shape, generator=gen) for t in snap]
            traj.append(snap)
        experts.append(traj)
    return experts


def config(**overrides: object) -> DistillConfig:
    values: dict[str, object] = dict(
        width=4,
        ipc=2,
        syn_steps=3,
        expert_epochs=1,
        max_start_epoch=3,
        iterations=4,
        checkpoint_every=2,
        lr_img=10.0,
        current_max_start_epoch=1,
        expansion_end_epoch=4,
        threshold=10.0,
    )
    values.update(overrides)
    return DistillConfig(**values)  # type: ignore[arg-type]
