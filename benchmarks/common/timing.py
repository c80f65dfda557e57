"""Time as the studies measure it: variants interleaved in one process after a warm-up, so a
change of machine load hits every variant alike, and a ratio of medians (or means) of those."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, after a garbage collection."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    calls: Mapping[str, Callable[[], object]], rounds: int, per_turn: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of every call of every variant, taken in turns: each of ``rounds``
    rounds runs each variant ``per_turn`` times in a row, in the order of ``calls``.

    The caller runs the warm-up first (it is often metered for memory)."""
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            for _ in range(per_turn):
                w, c = timed(fn)
                wall[name].append(w)
                cpu[name].append(c)
    return wall, cpu
