"""sharp_bilevel: sharpness-aware bilevel optimisation for dataset distillation.

The public entry points:

* :class:`SharpBilevelOptimizer`: a ``torch.optim.Optimizer`` that wraps any base optimizer and
  any outer objective (a closure) with a perturbation rule;
* :func:`register_perturbation`, :func:`available_perturbations`, :func:`get_perturbation`: the
  rule registry (``"none"``, ``"sam"``, ``"asam"``, ``"gsam"``, ``"vasso"``, ``"ssam"``, yours);
* :class:`StepContext`: what a one-argument closure receives.
"""

from .context import ASCENT, DESCENT, StepContext, StepReport
from .errors import NonFiniteError
from .optimizer import SharpBilevelOptimizer
from .perturbations import (
    ASAM,
    GSAM,
    SAM,
    NoPerturbation,
    PerturbationRule,
    SmoothedSAM,
    VaSSO,
    available_perturbations,
    get_perturbation,
    register_perturbation,
)
from .smoothing import smoothing_noise

__version__ = "0.1.0.dev0"

__all__ = [
    "ASAM",
    "ASCENT",
    "DESCENT",
    "GSAM",
    "SAM",
    "NoPerturbation",
    "NonFiniteError",
    "PerturbationRule",
    "SharpBilevelOptimizer",
    "SmoothedSAM",
    "StepContext",
    "StepReport",
    "VaSSO",
    "__version__",
    "available_perturbations",
    "get_perturbation",
    "register_perturbation",
    "smoothing_noise",
]
