"""Signs that a distillation run is doing nothing useful, counted per run and warned about once.

A run can go on for hours while its inner lr sits at the clamp, DATM's gate skips almost every
step, or the images blow up; none of these raises. `RunDiagnostics` counts them, and
`RunDiagnostics.warn` emits one `DistillationWarning` per kind, with the count, at
the end of the run. The counts land in ``report.json``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

#: ``syn_lr`` is clamped from below at this value after every step (a negative inner lr would
#: invert the inner loop, MTT issue #16).
LR_FLOOR = 1e-8
#: The images' norm counts as exploded beyond this multiple of its initial value.
NORM_EXPLOSION = 100.0
#: DATM's gate is reported when it skips more than this share of the steps.
GATE_SHARE = 0.5


class DistillationWarning(UserWarning):
    """A distillation run finished but probably learned little (see the message's count)."""


@dataclass
class RunDiagnostics:
    """Counts over a run's outer iterations (kept across resumes in the checkpoint).

    Attributes:
        iterations: outer iterations run.
        lr_clamped: iterations after which ``syn_lr`` was raised to `LR_FLOOR`.
        gate_skipped: steps skipped by DATM's gate (``loss > threshold``).
        nonfinite_skipped: steps skipped for a NaN/inf loss or hypergradient (``nonfinite="skip"``,
            or under float16's ``GradScaler``), ``overflow_skipped`` included.
        overflow_skipped: of those, steps the float16 ``GradScaler`` skipped with a finite loss:
            float16 overflowed in the backward pass and the scaler halved its scale.
        loss_scale: the ``GradScaler``'s scale after the last iteration (None without one).
        initial_image_norm: ``||images||_2`` at iteration 0.
        max_image_norm_ratio: largest ``||images||_2 / initial_image_norm`` seen.
    """

    iterations: int = 0
    lr_clamped: int = 0
    gate_skipped: int = 0
    nonfinite_skipped: int = 0
    initial_image_norm: float = 0.0
    max_image_norm_ratio: float = 1.0
    overflow_skipped: int = 0
    loss_scale: float | None = None

    def record(
        self,
        *,
        clamped: bool,
        image_norm: float,
        skipped: dict[str, int],
        overflow: bool = False,
        loss_scale: float | None = None,
    ) -> None:
        """Account for one finished iteration (``skipped``: the optimizer's running counts;
        ``overflow``: this step was a float16 ``GradScaler`` skip; ``loss_scale``: its scale)."""
        self.iterations += 1
        self.overflow_skipped += int(overflow)
        self.loss_scale = loss_scale
        self.lr_clamped += int(clamped)
        self.gate_skipped = int(skipped.get("gate", 0))
        self.nonfinite_skipped = int(skipped.get("nonfinite", 0))
        if self.initial_image_norm > 0:
            self.max_image_norm_ratio = max(
                self.max_image_norm_ratio, image_norm / self.initial_image_norm
            )

    def problems(self) -> list[str]:
        """One sentence per kind of trouble seen (empty for a healthy run)."""
        n = self.iterations
        out = []
        if self.lr_clamped:
            out.append(
                f"syn_lr was clamped at its floor {LR_FLOOR:g} after {self.lr_clamped} of {n} "
                "iterations: the learned inner lr collapsed (lower lr_lr, CLI --lr-lr)"
            )
        if n and self.gate_skipped > GATE_SHARE * n:
            out.append(
                f"DATM's gate skipped {self.gate_skipped} of {n} steps (outer loss above "
                "threshold): the images barely moved (raise threshold, CLI --threshold)"
            )
        diverged = self.nonfinite_skipped - self.overflow_skipped
        if diverged:
            out.append(
                f"{diverged} of {n} steps were skipped for a NaN or infinite "
                "loss or hypergradient (lower lr_img, CLI --lr-img)"
            )
        if self.overflow_skipped:
            out.append(
                f"{self.overflow_skipped} of {n} steps were skipped because float16 overflowed "
                "in the backward pass through the unroll (the loss was finite): the GradScaler "
                f"halves its scale at each such step (now {self.loss_scale:g}); if it keeps "
                "happening, use autocast='bfloat16' (CLI --autocast bf16), which needs no scaler"
            )
        if self.max_image_norm_ratio > NORM_EXPLOSION:
            out.append(
                f"the images' norm grew to {self.max_image_norm_ratio:.3g}x its initial value: "
                "the outer steps diverge (lower lr_img, CLI --lr-img)"
            )
        return out

    def warn(self, label: str) -> None:
        """Emit one `DistillationWarning` per problem, prefixed by the run's label."""
        for problem in self.problems():
            warnings.warn(f"{label}: {problem}", DistillationWarning, stacklevel=3)

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers (for the checkpoint and ``report.json``)."""
        return asdict(self)
