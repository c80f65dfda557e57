"""Run a worker function on several gloo ranks, each in its own process, and collect results.

``run_ranks(W, "module:function", tmp_path, **kwargs)`` starts ``W`` Python processes with the
environment ``torchrun`` would give them, each calls ``function(rank, world_size, **kwargs)``
after ``init_process_group("gloo")`` and saves what it returns; a run that does not finish
within ``timeout`` seconds is killed and fails the test as a hang.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parent

_BOOT = """
import importlib, json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
module, name = {target!r}.split(":")
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
result = getattr(importlib.import_module(module), name)(rank, world, **json.loads({kwargs!r}))
torch.save(result, {out!r} + f"/rank{{rank}}.pt")
if dist.is_initialized():
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(
    world_size: int, target: str, tmp_path: Path, *, timeout: float = 240, **kwargs: Any
) -> list[Any]:
    """Results of ``target`` (``"module:function"`` importable from tests/) on every rank."""
    out = tmp_path / f"ranks-{world_size}-{target.replace(':', '-')}"
    out.mkdir(parents=True, exist_ok=True)
    code = _BOOT.format(tests=str(TESTS), target=target, kwargs=json.dumps(kwargs), out=str(out))
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore::FutureWarning",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired as err:
        for proc in procs:
            proc.kill()
        raise AssertionError(
            f"{target} on {world_size} ranks hung (killed after {timeout} s)"
        ) from err
    failed = [
        (r, p.returncode, log)
        for r, (p, log) in enumerate(zip(procs, logs, strict=True))
        if p.returncode
    ]
    assert not failed, "\n".join(f"rank {r} exited {rc}:\n{log[-3000:]}" for r, rc, log in failed)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
