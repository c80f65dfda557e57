"""How many CPU threads torch uses in the main job, chosen so a busy machine does not thrash.

torch's default intra-op pool takes every physical core. When other jobs share those cores the
threads wait on each other at every parallel region: the README's job took 27.5 min with the
default 2 threads under a load of 2.5-13 on two cores, 44 s with one thread (one outer step:
77 s with 2 threads, 5.5 s with 1, same load). The choice, in order:

1. ``--threads N``;
2. the user's own setting: ``OMP_NUM_THREADS`` in the environment (``torchrun`` sets 1), or a
   ``torch.set_num_threads`` call made before `main` (the count differs from torch's default);
3. the idle cores: ``round(usable cores - 1-minute load average)``, at least 1 and at most
   torch's default, where usable cores are ``os.sched_getaffinity(0)`` (``os.cpu_count()``
   where that does not exist).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: torch's thread count when this module was imported (its default unless the user set one).
STARTUP_THREADS = torch.get_num_threads()
#: The count `apply_threads` last set (not the user's own setting when seen again).
_applied: list[int] = []


@dataclass(frozen=True)
class ThreadChoice:
    """The chosen count and why (``reason`` is a sentence for the log and ``report.json``)."""

    threads: int
    reason: str
    cores: int | None = None
    load: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain values for ``report.json``."""
        return asdict(self)


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average, None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(
    requested: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
    current: int | None = None,
    default: int | None = None,
    cores: int | None = None,
    load: float | None = None,
) -> ThreadChoice:
    """Pick torch's intra-op thread count (see the module's docstring for the order).

    Args:
        requested: ``--threads`` (None: not given).
        env: the environment (``os.environ`` when None).
        current: ``torch.get_num_threads()`` now (read when None).
        default: torch's count before anyone set it (`STARTUP_THREADS` when None).
        cores: usable cores (`usable_cores` when None).
        load: the 1-minute load average (`load_average` when None; a system without one
            counts as idle).
    """
    if requested is not None:
        return ThreadChoice(requested, f"--threads {requested}")
    env = os.environ if env is None else env
    current = torch.get_num_threads() if current is None else current
    default = STARTUP_THREADS if default is None else default
    omp = (env.get("OMP_NUM_THREADS") or "").strip()
    if omp:
        return ThreadChoice(current, f"OMP_NUM_THREADS={omp} in the environment")
    if current != default and current not in _applied:
        return ThreadChoice(current, f"torch.set_num_threads({current}) before the job")
    cores = usable_cores() if cores is None else cores
    load = load_average() if load is None else load
    idle = round(cores - max(0.0, load or 0.0))
    threads = max(1, min(default, cores, idle))
    return ThreadChoice(
        threads,
        f"idle cores: {cores} usable, load average {load or 0.0:.2f} "
        f"(torch's default {default}; set --threads or OMP_NUM_THREADS to choose)",
        cores,
        load,
    )


def apply_threads(requested: int | None = None) -> ThreadChoice:
    """`choose_threads` for this process, then ``torch.set_num_threads`` with it."""
    choice = choose_threads(requested)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
        _applied.append(choice.threads)
    return choice
