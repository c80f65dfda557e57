"""sharp_bilevel: sharpness-aware bilevel optimisation for dataset distillation.

The public entry points:

* `SharpBilevelOptimizer`: a ``torch.optim.Optimizer`` that wraps any base optimizer and
  any outer objective (a closure) with a perturbation rule;
* `register_perturbation`, `available_perturbations`, `get_perturbation`: the
  rule registry (``"none"``, ``"sam"``, ``"asam"``, ``"gsam"``, ``"vasso"``, ``"ssam"``, yours);
* `StepContext`: what a one-argument closure receives;
* `TrajectoryMatching`, `UnrollSettings`, `satm_optimizer`: MTT-style
  trajectory matching with TUH, TR and first-order lr learning;
* `get_network`, `FunctionalStudent`, `StepPlan`, `DSA`,
  `ZCA`: the pieces a distillation loop is built from.
"""

from .distill.networks import available_networks, get_network
from .distill.zca import ZCA
from .optim.context import ASCENT, DESCENT, StepContext, StepReport
from .optim.distributed import DistributedStepError
from .optim.errors import NoGradientWarning, NonFiniteError
from .optim.optimizer import SharpBilevelOptimizer
from .optim.perturbations import (
    ASAM,
    GCSAM,
    GSAM,
    SAM,
    WSAM,
    BayesianSAM,
    FriendlySAM,
    LookSAM,
    NoPerturbation,
    PerturbationRule,
    SmoothedSAM,
    VaSSO,
    available_perturbations,
    get_perturbation,
    register_perturbation,
)
from .optim.smoothing import smoothing_noise
from .trajectory.augment import DSA, DSAParams
from .trajectory.hypergradient import UnrollSettings, first_order_lr_grad
from .trajectory.inner import PlainSGD, TorchoptInner
from .trajectory.matching import TrajectoryMatching
from .trajectory.presets import satm_optimizer
from .trajectory.sharded import Shard
from .trajectory.step_plan import StepPlan
from .trajectory.student import FunctionalStudent
from .trajectory.unroll import matching_loss, unroll

__version__ = "0.1.0.dev0"

__all__ = [
    "ASAM",
    "ASCENT",
    "DESCENT",
    "DSA",
    "GCSAM",
    "GSAM",
    "SAM",
    "WSAM",
    "ZCA",
    "BayesianSAM",
    "DSAParams",
    "DistributedStepError",
    "FriendlySAM",
    "FunctionalStudent",
    "LookSAM",
    "NoGradientWarning",
    "NoPerturbation",
    "NonFiniteError",
    "PerturbationRule",
    "PlainSGD",
    "Shard",
    "SharpBilevelOptimizer",
    "SmoothedSAM",
    "StepContext",
    "StepPlan",
    "StepReport",
    "TorchoptInner",
    "TrajectoryMatching",
    "UnrollSettings",
    "VaSSO",
    "__version__",
    "available_networks",
    "available_perturbations",
    "first_order_lr_grad",
    "get_network",
    "get_perturbation",
    "matching_loss",
    "register_perturbation",
    "satm_optimizer",
    "smoothing_noise",
    "unroll",
]
