r"""Which parameters the matching loss compares (PAD, Li et al., 2024).

With $S$ the kept entries of the flattened student vector,

$$
L_S = \frac{\sum_{k \in S} (w_{N,k} - w^*_{t+M,k})^2}{\sum_{k \in S} (w^*_{t,k} - w^*_{t+M,k})^2} .
$$

Two selections, both from NUS-HPC-AI-Lab/PAD:

* ``"depth"`` drops the first ``ratio`` share of the flattened parameters, which (in the
  network's parameter order, shallow to deep) are the shallow layers'. This is the selection of
  the paper's best results (its ``PAD_depth.py``).
* ``"loss_rank"`` drops the ``ratio`` share of entries with the *smallest* squared error
  $(w_{N,k} - w^*_{t+M,k})^2$, keeping the worst-matched ones. This is what the released
  ``PAD.py`` does. The set is chosen anew at every evaluation (each pass of a two-pass step), so
  $L_S$ is the sum of the largest errors, a function of $\phi$ whose gradient this is (almost
  everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_MODES = ("depth", "loss_rank")


@dataclass(frozen=True)
class ParameterSelection:
    """PAD's parameter selection for the matching loss.

    Args:
        mode: ``"depth"`` (drop the first ``ratio`` share of the flattened parameters: the
            shallow layers) or ``"loss_rank"`` (drop the ``ratio`` share with the smallest
            squared error).
        ratio: the dropped share, in [0, 1) (0 keeps everything: MTT's loss).

    Examples:
        >>> ParameterSelection("depth", 0.25).kept(torch.zeros(8), torch.zeros(8)).tolist()
        [2, 3, 4, 5, 6, 7]
    """

    mode: str = "depth"
    ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float):
            raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
        if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
            raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")

    def dropped(self, num_params: int) -> int:
        """How many entries are dropped: ``floor(ratio * P)`` (PAD's ``int(ratio * P)``)."""
        return int(self.ratio * num_params)

    def kept(self, final: Tensor, target: Tensor) -> Tensor:
        """Indices of the kept entries of the flattened vector (``final`` is ``w_N``)."""
        num = final.numel()
        drop = self.dropped(num)
        if self.mode == "depth":
            return torch.arange(drop, num, device=final.device)
        errors = (final.detach() - target.detach()).square()
        order = torch.sort(errors, stable=True).indices
        return order[drop:]
