"""What one evidence run measures: the rows (each a ``DistillConfig`` override), the ``Plan``
dataclass and the three plans (full, quick, smoke) with the reasons for their sizes."""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks.evidence.report import MATCHED
from sharp_bilevel.trajectory.hypergradient import UnrollSettings

DATE = "2026-12-01"
TUH = {"keep": 1.0 / 3.0, "lr_gradient": "first_order"}
#: (row, DistillConfig overrides, tuned): every other setting is shared.
ROWS: list[tuple[str, dict[str, Any], bool]] = [
    ("MTT", {"perturbation": "none"}, True),
    ("FTD (EMA)", {"method": "ftd", "perturbation": "none"}, True),
    ("SAM", {"perturbation": "sam"}, True),
    ("ASAM", {"perturbation": "asam"}, True),
    ("GSAM", {"perturbation": "gsam"}, True),
    ("VaSSO", {"perturbation": "vasso"}, True),
    ("SATM", {"perturbation": "satm"}, True),
    ("SATM w/o smoothing", {"perturbation": "sam", "reuse": True, **TUH}, True),
    ("SAM, rho 2", {"perturbation": "sam", "rho": 2.0}, False),
    ("TUH", {"perturbation": "none", **TUH}, False),
    ("TUH, lr x N/keep", {"perturbation": "none", **TUH}, False),
]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one invocation measures (see ``full_plan`` for why these sizes)."""

    dataset: str
    root: str | None
    train_pool: int  # training images read (train + validation)
    val_fraction: float  # share of each class held out for lr tuning
    test_count: int | None
    width: int
    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    num_experts: int
    expert_epochs_trained: int
    iterations: int
    batch_syn: tuple[tuple[int, int | None], ...]  # (ipc, batch_syn)
    ipcs: tuple[int, ...]
    seeds: tuple[int, ...]
    eval_seeds: tuple[int, ...]
    eval_epochs: int
    archs: tuple[str, ...]
    lr_base: tuple[tuple[int, float], ...]  # (ipc, the middle of its lr_img grid)
    lr_grid: tuple[float, ...]
    rows: tuple[str, ...]
    windows: int
    radii: tuple[float, ...]
    directions: int
    hessian_seeds: tuple[int, ...]
    hessian_iterations: int
    acc_radii: tuple[float, ...]  # radii of the accuracy-under-perturbation probe
    ratio_windows: int
    lr_extend: int = 0  # grid points that may be added above the top (see report.lr_grid)
    lr_extend_down: int = 0  # ... and below the bottom
    reference_eval_count: int | None = None  # evaluation seeds of the init/random references

    def reference_seeds(self) -> tuple[int, ...]:
        """The evaluation seeds of the init and random-real references (the first
        ``reference_eval_count`` of ``eval_seeds``; all of them when it is None)."""
        return self.eval_seeds[: self.reference_eval_count]

    def batch_for(self, ipc: int) -> int | None:
        return dict(self.batch_syn)[ipc]

    def lr_for(self, ipc: int) -> float:
        return dict(self.lr_base)[ipc]


ALL_ROWS = tuple(r for r, _, _ in ROWS)


def full_plan(dataset: str, root: str | None) -> Plan:
    """44 minutes on two cores (two workers) for Fashion-MNIST from scratch, 88 job-minutes;
    about 83 on the slower machine of the previous run (its identical expert jobs took 1.9x as
    long).

    Sized from the job-minutes of the last full run (215 in 109 min of wall: distillation 97,
    test evaluations 56, robustness 23, flatness with λ_max 18, references 8, the rest 13):
    50 iterations instead of 60 (distillation is the largest share; the sets still move by
    several percent of their norm), 5,000 test images instead of 10,000 (about half of an
    IPC 1 evaluation is the test forward; the 95% half-width of one accuracy grows from about
    0.9 to 1.3 points, while differences are paired over seeds on the same images), the
    init and random-real references at one evaluation seed (they are reference lines, not rows),
    4 power iterations (the Rayleigh quotient is stable to 3 digits after 4). Each IPC's lr grid
    is centred where the last run's picks fell (IPC 1: 810, the best of MTT and within 1 point
    of every row's; SATM's was the top, 2430, which is now inside; IPC 10: 30) and may grow a
    point either way. Kept from before: 100 evaluation epochs, accuracy under perturbation at
    one radius, 0.5, over 3 directions (the unperturbed accuracy is the test job's)."""
    return Plan(
        dataset=dataset,
        root=root,
        train_pool=6000,
        val_fraction=1 / 6,
        test_count=5000,
        width=16,
        syn_steps=10,
        expert_epochs=2,
        max_start_epoch=4,
        num_experts=5,
        expert_epochs_trained=6,
        iterations=50,
        batch_syn=((1, None), (10, 20)),
        ipcs=(1, 10),
        seeds=(0, 1, 2, 3, 4),
        eval_seeds=(0, 1, 2),
        eval_epochs=100,
        archs=("ConvNet", "MLP"),
        lr_base=((1, 810.0), (10, 30.0)),
        lr_grid=(1 / 3, 1.0, 3.0),
        rows=ALL_ROWS,
        windows=2,
        radii=(0.0, 0.02, 0.05, 0.1, 0.2),
        directions=3,
        hessian_seeds=(0, 1, 2),
        hessian_iterations=4,
        acc_radii=(0.5,),
        ratio_windows=8,
        lr_extend=1,
        lr_extend_down=1,
        reference_eval_count=1,
    )


def quick_plan(dataset: str, root: str | None) -> Plan:
    """Under 10 minutes: 2 seeds x 1 evaluation seed, fewer rows and iterations."""
    return dataclasses.replace(
        full_plan(dataset, root),
        train_pool=3000,
        test_count=2000,
        num_experts=2,
        iterations=20,
        seeds=(0, 1),
        eval_seeds=(0,),
        lr_base=((1, 90.0), (10, 10.0)),
        lr_grid=(1.0, 3.0),
        lr_extend=0,
        lr_extend_down=0,
        rows=("MTT", "SAM", "SATM", "TUH", MATCHED),
        directions=2,
        hessian_seeds=(0,),
        hessian_iterations=3,
        acc_radii=(0.5,),
        ratio_windows=2,
    )


def smoke_plan() -> Plan:
    """Seconds, on digits: what the test suite runs."""
    return dataclasses.replace(
        full_plan("digits", None),
        width=8,
        syn_steps=3,
        num_experts=1,
        expert_epochs_trained=3,
        max_start_epoch=1,
        iterations=2,
        batch_syn=((2, 8),),
        ipcs=(2,),
        seeds=(0, 1, 2),
        eval_seeds=(0,),
        eval_epochs=20,
        archs=("ConvNet",),
        lr_base=((2, 10.0),),
        lr_grid=(1.0, 3.0),
        lr_extend=2,
        lr_extend_down=0,
        rows=("MTT", "SATM", MATCHED),
        radii=(0.0, 0.1),
        directions=2,
        hessian_seeds=(0, 1),
        hessian_iterations=2,
        acc_radii=(0.1, 0.2),
        ratio_windows=2,
    )


def row_overrides(name: str) -> dict[str, Any]:
    for row, overrides, _ in ROWS:
        if row == name:
            return overrides
    raise KeyError(name)


def is_tuned(name: str) -> bool:
    return any(row == name and tuned for row, _, tuned in ROWS)


def keep_steps(plan: Plan) -> int:
    """TUH's kept steps at ``keep = N/3``."""
    iota, _ = UnrollSettings(keep=TUH["keep"]).resolve(plan.syn_steps, None)
    return plan.syn_steps - iota
