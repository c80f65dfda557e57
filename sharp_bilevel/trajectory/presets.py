"""One-call presets."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..optim.optimizer import SharpBilevelOptimizer
from .hypergradient import UnrollSettings


def satm_optimizer(
    params: Iterable[Any],
    *,
    lr: float,
    rho: float = 0.05,
    gamma: float = 0.01,
    keep: int | float = 1.0 / 3.0,
    momentum: float = 0.5,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
    **kwargs: Any,
) -> SharpBilevelOptimizer:
    """SATM in one call: smoothed SAM + TUH (keep ``N/3``) + TR (``tau = iota``) + first-order lr.

    The unroll settings travel to the objective as ``closure_options["unroll"]``
    (`TrajectoryMatching` reads them). Put the learnable
    inner rate (and soft labels) in groups with ``perturb=False``; MTT's outer optimizer is
    ``SGD(momentum=0.5)``. ``rho`` and ``gamma`` are this library's starting points, not values
    from the paper: tune them to the scale of your images.
    """
    return SharpBilevelOptimizer(
        params,
        base_optimizer,
        perturbation="ssam",
        rho=rho,
        gamma=gamma,
        closure_options={"unroll": UnrollSettings.satm(keep)},
        lr=lr,
        momentum=momentum,
        **kwargs,
    )
