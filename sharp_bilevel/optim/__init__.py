"""Floor 1, the optimizer plugin: ``SharpBilevelOptimizer``, the perturbation rules, SATM's
smoothing, the step context and the errors. It knows nothing of trajectories: any closure that
returns a loss and fills ``.grad`` is an outer objective."""

from .context import ASCENT, DESCENT, StepContext, StepReport
from .distributed import DistributedStepError, RankLayout
from .errors import NoGradientWarning, NonFiniteError
from .optimizer import SharpBilevelOptimizer
from .smoothing import smoothing_noise

__all__ = [
    "ASCENT",
    "DESCENT",
    "DistributedStepError",
    "NoGradientWarning",
    "NonFiniteError",
    "RankLayout",
    "SharpBilevelOptimizer",
    "StepContext",
    "StepReport",
    "smoothing_noise",
]
