"""FTD (Du et al., CVPR 2023) adapter: MTT's closure plus an EMA of the synthetic images.

FTD's outer loop is MTT's with ``e <- d e + (1 - d) phi`` after every step (decay 0.999 by
default, 0.9995 in its scripts); its flatness comes from experts trained with GSAM
(`sharp_bilevel.distill.experts.train_expert` with ``optimizer="gsam"``). Attach the
average to the optimizer so it always sees the restored, post-step images::

    ema = ftd.ImageEMA(image_syn, decay=args.ema_decay).attach(optimizer)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .mtt import floor_syn_lr, make_closure

__all__ = ["ImageEMA", "floor_syn_lr", "make_closure"]


class ImageEMA:
    r"""Exponential moving average of a tensor: ``e <- decay * e + (1 - decay) * phi``.

    Args:
        images: the tensor to follow (e.g. ``image_syn``); the average starts as its copy.
        decay: in ``[0, 1)`` (default 0.999).
    """

    def __init__(self, images: Tensor, decay: float = 0.999) -> None:
        if not (isinstance(decay, float | int) and 0.0 <= decay < 1.0):
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.images = images
        self.decay = float(decay)
        self.average = images.detach().clone()
        self.updates = 0

    @property
    def module(self) -> list[Tensor]:
        """``[average]``: where FTD's ``ModelEmaV2`` keeps it (``ema.module[0]``)."""
        return [self.average]

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step with the current values of ``images``."""
        self.average.mul_(self.decay).add_(self.images.detach(), alpha=1.0 - self.decay)
        self.updates += 1

    def attach(self, optimizer: torch.optim.Optimizer) -> ImageEMA:
        """Update after every ``optimizer.step()`` (a post-step hook: the images are restored)."""

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.update()

        self.handle = optimizer.register_step_post_hook(hook)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The average, decay and update count (for checkpoints)."""
        return {"average": self.average.clone(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`."""
        self.average.copy_(state["average"])
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
