"""SATM's landscape smoothing: norm-matched Gaussian noise on each synthetic sample."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .reductions import norm


def smoothing_noise(
    params: Sequence[Tensor],
    gamma: float,
    generator: torch.Generator,
    rows: Sequence[tuple[int, int] | None] | None = None,
    *,
    per_element: bool = False,
) -> list[Tensor]:
    r"""Draw ``Delta`` for each tensor, independently per sample (leading dimension).

    $$
    \Delta_j = \gamma \frac{\lVert \phi_j \rVert_2}{\sqrt{d_j}} z, \qquad z \sim N(0, I),
    \qquad \mathbb{E}\lVert \Delta_j \rVert_2^2 = \gamma^2 \lVert \phi_j \rVert_2^2
    $$

    with ``d_j`` the number of elements of one sample, so ``gamma`` is the noise size relative to
    the sample's own norm whatever the image size (the paper writes the covariance as
    ``gamma ||phi_j|| I``; this is the same family with ``gamma`` made relative). A zero sample
    gets no noise. ``z`` comes from ``generator`` (a CPU generator, so a seed gives the same noise
    on every device) and is cast to each tensor's dtype and device.

    ``per_element=True`` reads ``gamma`` as SATM's per-element convention,
    $\Delta_j = \gamma \lVert \phi_j \rVert_2 z$ (the same family with
    $\gamma_{\text{relative}} = \sqrt{d_j} \, \gamma$).

    ``rows[k] = (offset, total)`` marks tensor ``k`` as this rank's rows
    ``[offset, offset + n)`` of a set of ``total`` sharded over ranks: ``z`` is drawn for all
    ``total`` rows and sliced, so sample ``j`` gets the same noise whichever rank owns it (and as
    in one process).
    """
    norms = norm([p.detach() for p in params], per_sample=True)
    noise = []
    for p, n, z in zip(params, norms, standard_normal(params, generator, rows), strict=True):
        per_sample = p.numel() // p.shape[0] if p.dim() > 0 else 1
        scale = gamma if per_element else gamma / math.sqrt(per_sample)
        noise.append(scale * n * z)
    return noise


def standard_normal(
    params: Sequence[Tensor],
    generator: torch.Generator,
    rows: Sequence[tuple[int, int] | None] | None = None,
) -> list[Tensor]:
    """One ``N(0, I)`` draw shaped like each tensor, in its dtype and on its device.

    ``z`` is drawn on the CPU ``generator`` with one ``randn`` per tensor, in order, in the
    tensor's dtype (float32 for other than float32/float64), so a seed gives the same draws on
    every device; ``rows`` as in `smoothing_noise` (sharded tensors get their slice of a draw
    for the whole set).
    """
    where = list(rows) if rows is not None else [None] * len(params)
    draws = []
    for p, shard in zip(params, where, strict=True):
        draw_dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        shape = p.shape if shard is None else (shard[1], *p.shape[1:])
        z = torch.randn(shape, generator=generator, dtype=draw_dtype)
        if shard is not None:
            z = z[shard[0] : shard[0] + p.shape[0]]
        draws.append(z.to(p.device, p.dtype))
    return draws
