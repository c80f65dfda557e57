"""SATM's landscape smoothing: norm-matched Gaussian noise on each synthetic sample."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .reductions import norm


def smoothing_noise(
    params: Sequence[Tensor], gamma: float, generator: torch.Generator
) -> list[Tensor]:
    r"""Draw ``Delta`` for each tensor, independently per sample (leading dimension).

    .. math::
        \Delta_j = \gamma \frac{\lVert \phi_j \rVert_2}{\sqrt{d_j}} z, \qquad z \sim N(0, I),
        \qquad \mathbb{E}\lVert \Delta_j \rVert_2^2 = \gamma^2 \lVert \phi_j \rVert_2^2

    with ``d_j`` the number of elements of one sample, so ``gamma`` is the noise size relative to
    the sample's own norm whatever the image size (the paper writes the covariance as
    ``gamma ||phi_j|| I``; this is the same family with ``gamma`` made relative). A zero sample
    gets no noise. ``z`` comes from ``generator`` (a CPU generator, so a seed gives the same noise
    on every device) and is cast to each tensor's dtype and device.
    """
    norms = norm([p.detach() for p in params], per_sample=True)
    noise = []
    for p, n in zip(params, norms, strict=True):
        per_sample = p.numel() // p.shape[0] if p.dim() > 0 else 1
        draw_dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        z = torch.randn(p.shape, generator=generator, dtype=draw_dtype).to(p.device, p.dtype)
        noise.append((gamma / math.sqrt(per_sample)) * n * z)
    return noise
