"""Floor 2, the trajectory engine: the functional student, the step plan, the unroll with TUH
and TR, the inner optimizers, the hypergradient settings, replayable augmentation, the
trajectory-matching objective and the SATM preset. It uses only `sharp_bilevel.optim`."""

from .augment import DSA, DSAParams
from .hypergradient import UnrollSettings, first_order_lr_grad
from .inner import PlainSGD, TorchoptInner
from .matching import TrajectoryMatching
from .presets import satm_optimizer
from .sharded import Shard, copy_to_ranks, reduce_from_ranks
from .step_plan import StepPlan
from .student import FunctionalStudent
from .unroll import matching_loss, unroll

__all__ = [
    "DSA",
    "DSAParams",
    "FunctionalStudent",
    "PlainSGD",
    "Shard",
    "StepPlan",
    "TorchoptInner",
    "TrajectoryMatching",
    "UnrollSettings",
    "copy_to_ranks",
    "first_order_lr_grad",
    "matching_loss",
    "reduce_from_ranks",
    "satm_optimizer",
    "unroll",
]
