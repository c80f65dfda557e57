r"""The optimizer across ranks: whole-set quantities reduced over a process group.

When the synthetic set is sharded (each rank owns some images, see
`sharp_bilevel.trajectory.sharded`), a rule's whole-set quantities must be those of the
whole set, or the sharded step would not be the single-process step:

$$
\lVert g \rVert^2 = \sum_r \lVert g^{(r)} \rVert^2, \qquad
\langle g, g' \rangle = \sum_r \langle g^{(r)}, g'^{(r)} \rangle, \qquad
\lVert T g \rVert^2 = \sum_r \lVert T^{(r)} g^{(r)} \rVert^2 .
$$

`RankLayout` knows which perturbed tensors are sharded (param groups with
``"sharded": True``) and where each rank's rows sit in the whole set; inside
`RankLayout.scope`, `reduce_sum` sums over ranks
(replicated tensors counted once). Per-sample sums stay local. SATM's smoothing noise for sample
``j`` is drawn for the whole set from the optimizer's generator and sliced, so it is the same
whichever rank owns ``j``. `RankLayout.agree` makes every rank take the same decision
(non-finite value, gate) in one all-reduce.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

_SCOPE: ContextVar[RankLayout | None] = ContextVar("sharp_bilevel_rank_layout", default=None)


class DistributedStepError(RuntimeError):
    """A step failed on this rank or another; every rank restored its pre-step values.

    The process group was shut down so that no rank waits forever in a collective: build a new
    one (and a new optimizer) to go on.
    """


def current_layout() -> RankLayout | None:
    """The layout whose `RankLayout.scope` is active (None outside any)."""
    return _SCOPE.get()


@dataclass(frozen=True)
class RankLayout:
    """How the perturbed tensors of one optimizer are spread over the ranks of ``group``.

    Attributes:
        group: the process group.
        rank: this process's rank in it.
        world_size: its size.
        sharded: per perturbed tensor, whether its rows are split over the ranks.
        offsets: per perturbed tensor, the global index of this rank's first row (0 if
            replicated).
        totals: per perturbed tensor, its number of rows over all ranks.
    """

    group: Any
    rank: int
    world_size: int
    sharded: tuple[bool, ...]
    offsets: tuple[int, ...]
    totals: tuple[int, ...]

    @classmethod
    def build(cls, group: Any, perturbed: Sequence[Tensor], sharded: Sequence[bool]) -> RankLayout:
        """Gather every rank's row counts (one all-gather) and lay the shards out in rank order."""
        if not dist.is_initialized():
            raise RuntimeError("process_group given but torch.distributed is not initialised")
        rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
        for t, shard in zip(perturbed, sharded, strict=True):
            if shard and t.dim() == 0:
                raise ValueError("a sharded parameter needs a leading (sample) dimension")
        device = perturbed[0].device if perturbed else torch.device("cpu")
        counts = torch.tensor(
            [t.shape[0] if s else 0 for t, s in zip(perturbed, sharded, strict=True)] + [0],
            dtype=torch.int64,
            device=device,
        )
        every = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(every, counts, group=group)
        table = torch.stack(every).cpu()  # [world, tensors + 1]
        offsets = tuple(int(v) for v in table[:rank].sum(dim=0)[:-1])
        totals = tuple(int(v) for v in table.sum(dim=0)[:-1])
        return cls(group, rank, world, tuple(bool(s) for s in sharded), offsets, totals)

    @classmethod
    def for_groups(cls, group: Any, param_groups: Sequence[dict[str, Any]]) -> RankLayout:
        """The layout of the perturbed tensors of ``param_groups`` (``"sharded"`` defaults to
        False in each group; it must be a bool)."""
        perturbed, flags = [], []
        for i, param_group in enumerate(param_groups):
            param_group.setdefault("sharded", False)
            sharded = param_group["sharded"]
            if not isinstance(sharded, bool):
                raise ValueError(
                    f"param group {i}'s sharded must be True or False, got {sharded!r}"
                )
            if param_group["perturb"]:
                perturbed += list(param_group["params"])
                flags += [sharded] * len(param_group["params"])
        return cls.build(group, perturbed, flags)

    def weight(self, position: int) -> float:
        """Share of tensor ``position``'s local sum in the global sum (replicated: rank 0 only)."""
        return 1.0 if self.sharded[position] or self.rank == 0 else 0.0

    def all_reduce_sum(self, local: Tensor) -> Tensor:
        """``sum_r local_r`` (a new tensor)."""
        out = local.clone()
        dist.all_reduce(out, group=self.group)
        return out

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Inside, whole-set reductions of `reductions` span ranks."""
        token = _SCOPE.set(self)
        try:
            yield
        finally:
            _SCOPE.reset(token)

    def agree(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Sum ``values`` (flags and partial sums) over the ranks, in one all-reduce."""
        local = torch.tensor(list(values), dtype=torch.float64, device=device)
        return [float(v) for v in self.all_reduce_sum(local).cpu()]

    def noise_rows(self, position: int) -> tuple[int, int] | None:
        """``(offset, total)`` of a sharded tensor (its noise is drawn for all rows), else None."""
        if not self.sharded[position]:
            return None
        return self.offsets[position], self.totals[position]

    def abort(self) -> None:
        """Shut the group down so the other ranks' pending collectives fail instead of waiting."""
        try:
            if self.group is None or self.group is dist.group.WORLD:
                dist.destroy_process_group()
            else:
                dist.destroy_process_group(self.group)
        except (RuntimeError, ValueError, AssertionError):
            pass  # already gone
