"""Adapters that glue ``SharpBilevelOptimizer`` onto MTT, FTD and DATM distillation loops.

Installed as the subpackage ``sharp_bilevel.adapters`` (never a top-level ``adapters`` import):

* `sharp_bilevel.adapters.mtt`: ``make_closure`` for an MTT fork's update block;
* `sharp_bilevel.adapters.ftd`: the same closure and ``ImageEMA`` (attached as a post-step
  hook, so it only ever sees restored images);
* `sharp_bilevel.adapters.datm`: soft-label logits, ``StartEpochWindow`` and the
  threshold ``gate``.
"""

from . import datm, ftd, mtt

__all__ = ["datm", "ftd", "mtt"]
