"""The pipeline over several processes: launch, and whole tensors from every rank's rows.

Under ``torchrun`` each rank owns the rows that
`Shard.even <sharp_bilevel.trajectory.sharded.Shard.even>` gives it of the synthetic set
(and of everything aligned with it: labels, momentum buffers, VaSSO's average, FTD's image
average). Checkpoints hold the *whole* tensors, gathered here, so
a run written under ``W`` ranks resumes under any number of ranks (each slices its rows back).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..trajectory.sharded import Shard

#: How long a rank waits in a collective (rank 0 training experts, say) before giving up.
DEFAULT_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class Launch:
    """This process's place in a launch: rank, world size, backend (None when single)."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, prints and evaluates."""
        return self.rank == 0

    @property
    def mode(self) -> str:
        """``"single"`` or ``"sharded"`` (the synthetic set split over the ranks)."""
        return "sharded" if self.world_size > 1 else "single"


def launch_from_environment(device: str) -> Launch:
    """Initialise ``torch.distributed`` when started by ``torchrun`` (``WORLD_SIZE > 1``).

    The backend is ``nccl`` for a CUDA ``device`` and ``gloo`` otherwise; each rank then uses
    ``cuda:<LOCAL_RANK>``. Without ``torchrun`` nothing is initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Launch()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=DEFAULT_TIMEOUT)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    return Launch(dist.get_rank(), dist.get_world_size(), backend, local_rank)


def _counts(shard: Shard, world_size: int) -> list[int]:
    return [Shard.even(shard.total, r, world_size).count for r in range(world_size)]


def gather_rows(local: Tensor, shard: Shard) -> Tensor:
    """The whole ``[total, ...]`` tensor from every rank's rows (on every rank)."""
    world = dist.get_world_size(group=shard.group)
    counts = _counts(shard, world)
    widest = max(counts)
    padded = local.new_zeros((widest, *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=shard.group)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def map_rows(value: Any, rows: int, convert: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``convert`` to every tensor in ``value`` (nested dicts/lists) whose first dimension
    is ``rows``; leave everything else as it is."""
    if isinstance(value, Tensor):
        return convert(value) if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {k: map_rows(v, rows, convert) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_rows(v, rows, convert) for v in value)
    return value


def gather_optimizer_state(
    state: dict[str, Any], sharded: set[int], shard: Shard
) -> dict[str, Any]:
    """An optimizer ``state_dict`` with the per-parameter state of the ``sharded`` parameter
    indices (and the rule state aligned with them) gathered to whole tensors."""
    out = dict(state)
    out["state"] = {
        k: map_rows(v, shard.count, lambda t: gather_rows(t, shard)) if k in sharded else v
        for k, v in state["state"].items()
    }
    if "sharp_bilevel" in state:
        extra = dict(state["sharp_bilevel"])
        extra["rule_state"] = map_rows(
            extra["rule_state"], shard.count, lambda t: gather_rows(t, shard)
        )
        out["sharp_bilevel"] = extra
    return out


def slice_optimizer_state(state: dict[str, Any], sharded: set[int], shard: Shard) -> dict[str, Any]:
    """The inverse of `gather_optimizer_state`: this rank's rows of a whole state."""
    out = dict(state)
    out["state"] = {
        k: map_rows(v, shard.total, shard.rows) if k in sharded else v
        for k, v in state["state"].items()
    }
    if "sharp_bilevel" in state:
        extra = dict(state["sharp_bilevel"])
        extra["rule_state"] = map_rows(extra["rule_state"], shard.total, shard.rows)
        out["sharp_bilevel"] = extra
    return out
