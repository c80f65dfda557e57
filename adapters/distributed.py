r"""An MTT, FTD or DATM fork on several GPUs: one process per GPU under ``torchrun``, the
synthetic set split over the ranks (`sharp_bilevel.trajectory.sharded.Shard`).

The sharded step equals the one-process step only if every rank matches the *same* expert
window: the same expert, start epoch ``t``, target ``t + M`` and step-plan seed. The forks draw
the expert and ``t`` from Python's ``random`` and numpy, which MTT and FTD never seed, so:

* `use_local_gpu` (first in ``main``): this rank sees only its own GPU, so the forks'
  ``'cuda'``, ``'cuda:0'`` and ``DataParallel`` all mean that GPU;
* `seed_everything`: ``random``, numpy and torch seeded alike on every rank;
* `take_shard`: rank 0's whole initial set, broadcast, then this rank's rows;
* `gather_shards`: the whole set back on every rank (for evaluation and saving);
* `check_same_window` (called by every adapter's ``make_closure`` given a ``shard``): one
  all-gather of six integers per step; ranks that disagree all raise `RankMismatchError`
  together, naming the ranks and what differs, instead of silently drifting apart.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from sharp_bilevel.trajectory.sharded import Shard

__all__ = [
    "RankMismatchError",
    "check_same_window",
    "gather_shards",
    "seed_everything",
    "take_shard",
    "use_local_gpu",
]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class RankMismatchError(ValueError):
    """Ranks of one sharded step disagree on its expert window (expert, start epoch, seed)."""


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every GPU).

    Call it with the same ``seed`` on every rank before the fork draws anything: its image
    initialisation, expert shuffle and start epochs then repeat on every rank.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the forks draw from numpy's global generator)
    torch.manual_seed(seed)  # also seeds every CUDA device


def use_local_gpu() -> str | None:
    """Restrict this process to its own GPU: ``CUDA_VISIBLE_DEVICES`` becomes the
    ``LOCAL_RANK``-th of the GPUs visible so far (of all GPUs when unset).

    The forks write ``device='cuda'``, ``torch.device('cuda:0')`` and wrap nets in
    ``DataParallel`` when several GPUs are visible; with one visible GPU per rank all of these
    mean the rank's own GPU. Call it first in ``main``, before anything touches CUDA (a
    fork's ``torch.cuda.is_available()`` included). Returns the value set (None outside
    ``torchrun``, where ``LOCAL_RANK`` is unset and nothing changes).

    Raises:
        RuntimeError: CUDA is already initialised (the change would have no effect), or
            ``LOCAL_RANK`` is past the visible GPUs.
    """
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return None
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        raise RuntimeError(
            "use_local_gpu() must run before anything touches CUDA (call it first in main)"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        chosen = local
    else:
        devices = [d for d in visible.split(",") if d.strip()]
        if int(local) >= len(devices):
            raise RuntimeError(
                f"LOCAL_RANK={local} but CUDA_VISIBLE_DEVICES={visible!r} lists only "
                f"{len(devices)} GPU(s): start at most {len(devices)} processes per machine"
            )
        chosen = devices[int(local)].strip()
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


def _world(group: Any) -> int:
    """Ranks in ``group``; 1 when torch.distributed is not initialised (one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def _comm_device(group: Any, like: Tensor) -> torch.device:
    """Where a collective's tensors must live: the GPU for NCCL, the CPU otherwise."""
    return like.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def take_shard(whole: Tensor, shard: Shard) -> Tensor:
    """This rank's rows of rank 0's ``whole`` ``[total, ...]`` tensor, detached (call
    ``.requires_grad_(True)`` on it for a learned tensor).

    ``whole`` is first broadcast from the group's first rank, so every rank starts from one
    set even where the fork drew it from a clock-seeded generator.
    """
    if whole.shape[0] != shard.total:
        raise ValueError(
            f"take_shard: expected the whole set of {shard.total} rows, got shape "
            f"{tuple(whole.shape)}"
        )
    data = whole.detach().clone()
    if _world(shard.group) > 1:
        device = _comm_device(shard.group, data)
        buffer = data.to(device)
        dist.broadcast(buffer, src=_global_rank(shard.group, 0), group=shard.group)
        data = buffer.to(whole.device)
    return shard.rows(data).clone()


def gather_shards(rows: Tensor, shard: Shard) -> Tensor:
    """The whole ``[total, ...]`` tensor on every rank from each rank's ``rows`` (detached).

    Every rank must call it (it is a collective); evaluate and save what it returns.
    """
    if rows.shape[0] != shard.count:
        raise ValueError(
            f"gather_shards: this rank owns {shard.count} rows, got shape {tuple(rows.shape)}"
        )
    world = _world(shard.group)
    data = rows.detach()
    if world == 1:
        return data.clone()
    device = _comm_device(shard.group, data)
    spans = torch.tensor([shard.offset, shard.count], dtype=torch.int64, device=device)
    all_spans = [torch.empty_like(spans) for _ in range(world)]
    dist.all_gather(all_spans, spans, group=shard.group)
    offsets_counts = [(int(s[0]), int(s[1])) for s in all_spans]
    widest = max(count for _, count in offsets_counts)
    padded = torch.zeros((widest, *data.shape[1:]), dtype=data.dtype, device=device)
    padded[: shard.count] = data.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=shard.group)
    whole = torch.empty((shard.total, *data.shape[1:]), dtype=data.dtype, device=device)
    covered = torch.zeros(shard.total, dtype=torch.bool)
    for (offset, count), part in zip(offsets_counts, parts, strict=True):
        whole[offset : offset + count] = part[:count]
        covered[offset : offset + count] = True
    if not bool(covered.all()):
        raise ValueError("gather_shards: the ranks' shards do not cover the whole set")
    return whole.to(rows.device)


def fingerprint(params: Tensor | Sequence[Tensor]) -> int:
    r"""A 64-bit fingerprint of a parameter snapshot (a flat vector or per-parameter tensors).

    $h = c \sum_k b_k (2k + 1) + n \bmod 2^{64}$ over the raw bits $b_k$ of the values (odd
    weights: any single changed value changes $h$). Integer sums are exact in any order, so
    equal snapshots give equal fingerprints on every device.
    """
    tensors = [params] if isinstance(params, Tensor) else list(params)
    parts = [torch.as_tensor(t).detach().reshape(-1) for t in tensors]
    flat = parts[0] if len(parts) == 1 else torch.cat([p.to(parts[0].device) for p in parts])
    bits = flat.contiguous().view(_INT_VIEW[flat.element_size()]).to(torch.int64)
    total = int((bits * _odd_weights(bits.numel(), bits.device)).sum().item())
    return _as_int64(total * 0x5BD1E995 + bits.numel())


@functools.lru_cache(maxsize=4)
def _odd_weights(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, dtype=torch.int64, device=device) * 2 + 1


_FIELDS = (
    "start_epoch",
    "expert_epochs",
    "syn_steps",
    "step-plan seed",
    "expert start parameters (fingerprint)",
    "expert target parameters (fingerprint)",
)


def _as_int64(value: int) -> int:
    """``value`` modulo ``2**64`` in int64's signed range (seeds may be any int)."""
    value = int(value) & (2**64 - 1)
    return value - 2**64 if value >= 2**63 else value


def _global_rank(group: Any, rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return rank
    return int(dist.get_global_rank(group, rank))


def describe_disagreement(table: Sequence[Sequence[int]], ranks: Sequence[int]) -> str | None:
    """The message for rows (one per rank, values in ``_FIELDS`` order) that differ, else None."""
    lines = []
    for column, name in enumerate(_FIELDS):
        values = [int(row[column]) for row in table]
        if len(set(values)) > 1:
            shown = ", ".join(
                f"rank {r}: {v & (2**64 - 1):#018x}" if "fingerprint" in name else f"rank {r}: {v}"
                for r, v in zip(ranks, values, strict=True)
            )
            lines.append(f"  {name}: {shown}")
    if not lines:
        return None
    return (
        "the ranks of this sharded step match different expert windows, so their steps would "
        "silently drift apart:\n"
        + "\n".join(lines)
        + "\nSeed Python's random, numpy and torch alike on every rank before the fork draws "
        "anything (sharp_bilevel.adapters.seed_everything(seed)), and pass the same seed= "
        "(e.g. seed=it) to make_closure on every rank."
    )


def check_same_window(
    shard: Shard,
    *,
    start_epoch: int,
    expert_epochs: int,
    syn_steps: int,
    seed: int,
    start: Tensor | Sequence[Tensor],
    target: Tensor | Sequence[Tensor],
    like: Tensor,
) -> None:
    """Raise `RankMismatchError` on every rank if the ranks of ``shard.group`` disagree on the
    expert window (one all-gather of six integers; nothing when one rank or not distributed).

    ``like`` is a tensor on the compute device (NCCL needs the collective there).
    """
    world = _world(shard.group)
    if world == 1:
        return
    row = [
        start_epoch,
        expert_epochs,
        syn_steps,
        seed,
        fingerprint(start),
        fingerprint(target),
    ]
    device = _comm_device(shard.group, like)
    mine = torch.tensor([_as_int64(v) for v in row], dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=shard.group)
    table = [[int(v) for v in r.cpu()] for r in rows]
    ranks = [_global_rank(shard.group, r) for r in range(world)]
    message = describe_disagreement(table, ranks)
    if message is not None:
        raise RankMismatchError(message)
