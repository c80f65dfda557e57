"""Workers for the rank-agreement tests of resuming (run on gloo ranks by _distributed.run_ranks).

`disagreeing_checkpoints` runs, in one process group: an uninterrupted sharded run, the same run
stopped after its checkpoint at iteration 2, then one resume per scenario in which the last rank
reads a different file from the others at the same path (missing, older, other contents), and
finally the agreeing resume. Each scenario records the error and how long the rank took.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SCENARIOS = ("missing", "older", "different")


def _run(path: Path, iterations: int, stop_at: int | None = None, **cfg: Any) -> Any:
    from _pipeline_fixtures import CLASSES, config, tiny_data, tiny_experts

    from sharp_bilevel.distill.pipeline import distill

    images, labels = tiny_data()

    def progress(it: int, values: dict[str, float]) -> None:
        if it == stop_at:
            raise KeyboardInterrupt

    return distill(
        config(iterations=iterations, **cfg),
        images,
        labels,
        CLASSES,
        tiny_experts(),
        checkpoint=path,
        progress=progress,
        process_group=dist.group.WORLD,
    )


def disagreeing_checkpoints(rank: int, world: int, folder: str, **cfg: Any) -> dict[str, Any]:
    """Worker: see the module docstring; every rank's own copy lives in ``folder/rank{r}``."""
    from sharp_bilevel.distill.checkpoint import atomic_save, load_checkpoint

    root = Path(folder)
    whole = _run(root / "whole.pt", 4, **cfg)
    with contextlib.suppress(KeyboardInterrupt):  # stopped after the checkpoint of iteration 2
        _run(root / "part.pt", 4, stop_at=2, **cfg)
    odd = rank == world - 1  # the last rank reads another file
    mine = root / f"rank{rank}"
    mine.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # rank 0 has written part.pt (iteration 2) and whole.pt (iteration 4)
    out: dict[str, Any] = {}
    for name in SCENARIOS:
        path = mine / f"{name}.pt"
        if not odd:
            shutil.copyfile(root / "part.pt", path)
        elif name == "older":  # the others are at iteration 2, this rank's copy at 0
            older = load_checkpoint(root / "part.pt")
            older["iteration"] = 0
            older["history"] = {k: [] for k in older["history"]}
            atomic_save(older, path)
        elif name == "different":
            other = load_checkpoint(root / "part.pt")
            other["images"] = other["images"] + 1e-3
            atomic_save(other, path)
        began = time.perf_counter()
        try:
            _run(path, 4, **cfg)
        except ValueError as err:
            out[name] = f"{type(err).__name__}: {err}"
        else:
            out[name] = "no error"
        out[f"{name}_seconds"] = time.perf_counter() - began
    shutil.copyfile(root / "part.pt", mine / "agree.pt")  # each rank its own identical copy
    resumed = _run(mine / "agree.pt", 4, **cfg)
    for key in ("images", "labels"):
        out[key], out[f"whole_{key}"] = getattr(resumed, key), getattr(whole, key)
    out["syn_lr"] = torch.tensor([resumed.syn_lr, whole.syn_lr])
    out["losses"] = torch.tensor([resumed.history["loss"], whole.history["loss"]])
    return out


def agreement(rank: int, world: int, folder: str) -> dict[str, Any]:
    """Worker: `agree_on_checkpoint` on plain files, with a user's own ``load``."""
    from sharp_bilevel.distill.checkpoint import CheckpointDisagreementError, agree_on_checkpoint

    root = Path(folder)
    out: dict[str, Any] = {}
    cases = {
        "all-missing": None,
        "same": {"iteration": 3, "x": torch.ones(2)},
        "newer-on-last": {"iteration": 5 if rank == world - 1 else 3, "x": torch.ones(2)},
    }
    for name, content in cases.items():
        path = root / f"rank{rank}" / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is not None:
            torch.save(content, path)
        try:
            got = agree_on_checkpoint(path, lambda p: torch.load(p, weights_only=True),
                                      dist.group.WORLD)  # fmt: skip
            out[name] = "none" if got is None else f"iteration {got['iteration']}"
        except CheckpointDisagreementError as err:
            out[name] = str(err)
            out[f"{name}_readings"] = dict(err.readings)
    return out
