r"""The synthetic set sharded over ranks: exact inner gradients with a conjugate pair of
collectives (DESIGN.md section 11).

With ``W`` ranks, rank ``r`` owns the samples ``S_r = [offset, offset + count)`` of a set of
``total``. Inner step ``i`` has one global minibatch ``B_i`` (the same step plan everywhere), and
its gradient is a sum of per-rank parts,

$$
g_i = \sum_r g_i^{(r)}, \qquad
g_i^{(r)} = \frac{1}{|B_i|} \sum_{j \in B_i \cap S_r}
    \nabla_w \mathrm{CE}(f(A_i(x_j); w_i), y_j),
$$

so every rank holds the same ``w_{i+1} = w_i - \alpha g_i``, the same ``w_N`` and the same outer
loss. Two autograd functions make the backward exact (Megatron-LM's ``f`` and ``g``):

* `reduce_from_ranks` (``g``): sum-all-reduce forward, identity backward, applied to the
  rank's part ``g_i^{(r)}``. Every rank holds the same ``L``, so summing cotangents here would
  count ``L`` ``W`` times.
* `copy_to_ranks` (``f``): identity forward, sum-all-reduce backward, applied to ``w_i``
  where it enters the rank's local forward. Then ``dL/dw_i = dL/dw_{i+1} + \sum_r
  \mathrm{VJP}_r`` is the same full sum on every rank; without it each rank would back-propagate
  only its own part and the ranks' ``w``-cotangents would drift apart.

Each one's backward is the other, so the pair also holds for higher derivatives. A rank's image
(and soft-label) gradient is then exact for its own shard; the lr gradient, built from
replicated quantities, is the same everywhere. Communication: one all-reduce of ``P`` floats per
inner step forward, one per step with graph backward, whatever the set size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx

Group = Any  # torch.distributed.ProcessGroup (None: the default group)


def _all_reduce(x: Tensor, group: Group) -> Tensor:
    out = x.detach().clone()
    dist.all_reduce(out, group=group)
    return out


class _CopyToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: Group) -> Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return reduce_from_ranks(grad, ctx.group), None  # type: ignore[attr-defined]


class _ReduceFromRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: Group) -> Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return copy_to_ranks(grad, ctx.group), None  # type: ignore[attr-defined]


def copy_to_ranks(x: Tensor, group: Group = None) -> Tensor:
    """``f``: identity forward, sum-all-reduce of the cotangent backward (a replicated input)."""
    out: Tensor = _CopyToRanks.apply(x, group)  # type: ignore[no-untyped-call]
    return out


def reduce_from_ranks(x: Tensor, group: Group = None) -> Tensor:
    """``g``: sum-all-reduce forward, identity backward (a rank's part of a replicated sum)."""
    out: Tensor = _ReduceFromRanks.apply(x, group)  # type: ignore[no-untyped-call]
    return out


@dataclass(frozen=True)
class Shard:
    r"""This rank's samples ``[offset, offset + count)`` of a synthetic set of ``total``.

    Rank $r$'s part of inner step $i$'s gradient is
    $g_i^{(r)} = \frac{1}{|B_i|} \sum_{j \in B_i \cap S_r} \nabla_w \mathrm{CE}_j$, and
    $g_i = \sum_r g_i^{(r)}$ on every rank.

    Args:
        offset: global index of the rank's first sample.
        count: samples the rank owns (may be 0).
        total: samples in the whole set (the step plan draws indices in ``[0, total)``).
        group: the process group the ranks share (None: the default group).
    """

    offset: int
    count: int
    total: int
    group: Group = None

    def __post_init__(self) -> None:
        for name in ("offset", "count", "total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Shard.{name} must be an int >= 0, got {value!r}")
        if self.offset + self.count > self.total:
            raise ValueError(
                f"Shard [{self.offset}, {self.offset + self.count}) lies outside a set of "
                f"{self.total} samples"
            )

    @classmethod
    def even(cls, total: int, rank: int, world_size: int, group: Group = None) -> Shard:
        """Contiguous near-even split: the first ``total % world_size`` ranks take one more."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        base, extra = divmod(total, world_size)
        count = base + (rank < extra)
        offset = rank * base + min(rank, extra)
        return cls(offset, count, total, group)

    @classmethod
    def current(cls, total: int, group: Group = None) -> Shard:
        """`even` for this process's rank in ``group`` (initialised torch.distributed)."""
        return cls.even(total, dist.get_rank(group=group), dist.get_world_size(group=group), group)

    def members(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """For a global minibatch ``indices``: the positions in it of this rank's samples and
        their local rows (``index - offset``)."""
        mine = (indices >= self.offset) & (indices < self.offset + self.count)
        positions = mine.nonzero().flatten()
        return positions, indices[positions] - self.offset

    def rows(self, tensor: Tensor) -> Tensor:
        """This rank's rows of a full ``[total, ...]`` tensor."""
        if tensor.shape[0] != self.total:
            raise ValueError(
                f"expected a tensor of {self.total} rows to shard, got shape {tuple(tensor.shape)}"
            )
        return tensor[self.offset : self.offset + self.count]


def check_shardable(buffers: dict[str, Tensor]) -> None:
    """Refuse students with batch statistics: a shard's batch-norm statistics would differ from
    the whole minibatch's, so the sharded step would not be the single-process step."""
    stats = sorted(k for k in buffers if k.endswith(("running_mean", "running_var")))
    if stats:
        raise ValueError(
            "a sharded synthetic set needs a student without batch statistics (batch norm "
            f"normalises each rank's part on its own); found {stats[:3]}. Use instance norm "
            "(MTT's default) or run on one rank"
        )
