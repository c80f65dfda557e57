"""Adapters that glue ``SharpBilevelOptimizer`` onto MTT, FTD and DATM distillation loops.

Installed as the subpackage ``sharp_bilevel.adapters`` (never a top-level ``adapters`` import):

* `sharp_bilevel.adapters.mtt`: ``make_closure`` for an MTT fork's update block;
* `sharp_bilevel.adapters.ftd`: the same closure and ``ImageEMA`` (attached as a post-step
  hook, so it only ever sees restored images);
* `sharp_bilevel.adapters.datm`: soft-label logits, ``StartEpochWindow`` and the
  threshold ``gate``;
* `sharp_bilevel.adapters.distributed`: one process per GPU under ``torchrun``
  (``use_local_gpu``, ``seed_everything``, ``take_shard``, ``gather_shards``, and the per-step
  check that the ranks match the same expert window).
"""

from . import datm, distributed, ftd, mtt
from .distributed import (
    RankMismatchError,
    gather_shards,
    seed_everything,
    take_shard,
    use_local_gpu,
)

__all__ = [
    "RankMismatchError",
    "datm",
    "distributed",
    "ftd",
    "gather_shards",
    "mtt",
    "seed_everything",
    "take_shard",
    "use_local_gpu",
]
