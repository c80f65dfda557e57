"""What a one-argument closure receives: the pass it runs in and a per-step scratch space."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

#: The first closure call: the gradient ``g`` at ``phi`` (at ``phi + Delta`` when smoothing).
ASCENT: Final = "ascent"
#: The second closure call: the gradient ``g'`` at ``phi + eps``.
DESCENT: Final = "descent"

Phase = Literal["ascent", "descent"]


@dataclass
class StepContext:
    """Handed to a closure that takes one argument, once per closure call.

    Attributes:
        phase: ``"ascent"`` (first call) or ``"descent"`` (second call, at ``phi + eps``).
        step: number of steps this optimizer has taken before this one.
        two_pass: whether a descent call follows the ascent call in this step (False for
            ``perturbation="none"``): an objective records what the second pass reuses only then.
        smoothed: whether the ascent call runs at ``phi + Delta`` (SATM smoothing, or a rule
            that draws noise such as Bayesian SAM).
        scratch: a dict that lives across the two calls of one step and is new each step: the
            ascent pass leaves state here (e.g. the inner state ``w_tau`` for trajectory reusing)
            for the descent pass to pick up.
        options: read-only settings given to the optimizer as ``closure_options`` (for example
            truncation and reuse settings an outer objective reads).
        loss_scale: the ``GradScaler``'s scale for this call (1.0 without one): back-propagate
            ``ctx.scale(loss)``; the optimizer unscales the gradients after the call.
    """

    phase: Phase
    step: int
    two_pass: bool
    smoothed: bool
    scratch: dict[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    loss_scale: float = 1.0

    def scale(self, loss: Any) -> Any:
        """``loss * loss_scale``: what to back-propagate under a ``GradScaler``."""
        return loss * self.loss_scale if self.loss_scale != 1.0 else loss

    @property
    def is_ascent(self) -> bool:
        """True in the first closure call."""
        return self.phase == ASCENT

    @property
    def is_descent(self) -> bool:
        """True in the second closure call (at the perturbed point)."""
        return self.phase == DESCENT


@dataclass(frozen=True)
class StepReport:
    """What the last ``step()`` did (``SharpBilevelOptimizer.last_step``).

    Attributes:
        loss: ``F(phi)``, the first call's loss (at ``phi + Delta`` when smoothing).
        perturbed_loss: ``F(phi + eps)``, the second call's loss (None with one pass or a skip).
        grad_norm: ``||g||_2`` over the perturbed parameters.
        skipped: None when the base optimizer stepped, else ``"nonfinite"`` or ``"gate"``.
    """

    loss: float
    perturbed_loss: float | None
    grad_norm: float
    skipped: str | None = None

    @property
    def sharpness(self) -> float | None:
        """``F(phi + eps) - F(phi)``, the surrogate gap SAM-style rules lower."""
        if self.perturbed_loss is None:
            return None
        return self.perturbed_loss - self.loss
