"""The synthetic set sharded over 1, 2 and 3 CPU processes (gloo): per-rank memory, traffic, time.

    python benchmarks/scaling/scaling.py [--quick] [--out <file>.json]

For MTT (exact BPTT) and SATM (keep N/3, TR, first-order lr, smoothing) at N = 20, one outer
step of ``TrajectoryMatching(..., shard=...)`` under ``SharpBilevelOptimizer(process_group=...)``:

* per-rank peak of live saved-for-backward bytes (the meter of DESIGN.md section 10, in
  ``benchmarks/common/memory.py``), metered in a warm-up step; the single-process figure is the
  same problem with no process group;
* bytes all-reduced per outer step, counted by wrapping ``torch.distributed.all_reduce`` and
  checked against the analytic count (one ``P``-float all-reduce per inner step run forward and
  one per step with graph backward, plus a few scalars);
* step time, the median of interleaved steps. The machine has 2 cores: one process gets 2
  threads, each of 2 ranks 1 thread, and 3 ranks share 2 cores, so the times say what sharding
  costs here, not what it gains on one GPU per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from benchmarks.common.memory import saved_bytes_meter
from benchmarks.step_cost.trajectory_cost import build_net
from sharp_bilevel import SharpBilevelOptimizer, TrajectoryMatching, UnrollSettings
from sharp_bilevel.trajectory.presets import satm_optimizer
from sharp_bilevel.trajectory.sharded import Shard
from sharp_bilevel.trajectory.student import FunctionalStudent

CLASSES, SYN_STEPS = 10, 20
VARIANTS = ("mtt", "satm")
# (name, width, (C, H, W), IPC, timed steps)
FULL = [
    ("w128 8x8 ipc10", 128, (1, 8, 8), 10, 2),
    ("w128 8x8 ipc50", 128, (1, 8, 8), 50, 1),
    ("w32 28x28 ipc10", 32, (1, 28, 28), 10, 2),
    ("w32 28x28 ipc50", 32, (1, 28, 28), 50, 1),
]
QUICK = [("w128 8x8 ipc10", 128, (1, 8, 8), 10, 1)]
TARGETS = {2: 0.55, 3: 0.40}  # per-rank saved bytes / single process


class Traffic:
    """Counts ``dist.all_reduce`` calls and payload bytes while installed."""

    def __init__(self) -> None:
        self.calls, self.bytes = 0, 0
        self._original = dist.all_reduce

    def __enter__(self) -> Traffic:
        def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._original


def make_step(variant: str, cfg: tuple, shard: Shard | None, device: str = "cpu"):  # type: ignore[no-untyped-def]
    _, width, shape, ipc, _ = cfg
    net = build_net(width, shape).to(device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(CLASSES * ipc, *shape, generator=gen)
    labels = torch.arange(CLASSES).repeat_interleave(ipc)
    if shard is not None:
        images, labels = shard.rows(images), shard.rows(labels)
    images, labels = images.to(device).requires_grad_(True), labels.to(device)
    syn_lr = torch.tensor(0.01, device=device, requires_grad=True)
    start = FunctionalStudent(net).flat_parameters()
    target = start + 0.01 * torch.randn(start.shape, generator=gen).to(device)
    group = dist.group.WORLD if shard is not None else None
    groups = [
        {"params": [images], "sharded": shard is not None},
        {"params": [syn_lr], "lr": 1e-5, "perturb": False},
    ]
    if variant == "satm":
        opt = satm_optimizer(groups, lr=100.0, seed=0, process_group=group)
    else:
        opt = SharpBilevelOptimizer(
            groups,
            perturbation="none",
            lr=100.0,
            momentum=0.5,
            closure_options={"unroll": UnrollSettings()},
            process_group=group,
        )
    count = [0]

    def step() -> None:
        closure = TrajectoryMatching(
            net, images, syn_lr, labels, expert_start=start, expert_target=target,
            syn_steps=SYN_STEPS, seed=count[0], shard=shard,
        )  # fmt: skip
        count[0] += 1
        opt.step(closure)

    return step, int(start.numel())


def measure(cfg: tuple, shard: Shard | None, device: str = "cpu") -> dict[str, Any]:
    out: dict[str, Any] = {}
    cuda = device.startswith("cuda")
    for v in VARIANTS:
        step, params = make_step(v, cfg, shard, device)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        with saved_bytes_meter() as meter, Traffic() as traffic:
            step()  # warm-up, metered
        out[v] = {
            "step": step,
            "cuda_max_allocated": torch.cuda.max_memory_allocated(device) if cuda else 0,
            "saved_bytes": meter["peak"],
            "allreduce_calls": traffic.calls,
            "allreduce_bytes": traffic.bytes,
            "params": params,
            "times": [],
        }
    for _ in range(cfg[4]):
        for v in VARIANTS:
            if shard is not None:
                dist.barrier()
            began = time.perf_counter()
            out[v]["step"]()
            if cuda:
                torch.cuda.synchronize(device)
            out[v]["times"].append(time.perf_counter() - began)
    for v in VARIANTS:
        out[v]["seconds"] = statistics.median(out[v]["times"])
        del out[v]["step"]
    return out


def expected_bytes(variant: str, params: int) -> int:
    """Analytic payload: ``P`` floats per inner step forward and per kept step backward, per
    pass; SATM's second pass runs and keeps ``N - tau`` steps; plus the scalar reductions."""
    keep = UnrollSettings.satm().keep_steps(SYN_STEPS) if variant == "satm" else SYN_STEPS
    if variant == "mtt":
        vectors = SYN_STEPS + keep
        scalars = 4  # one agreement (flags, norm^2, gate)
    else:
        vectors = (SYN_STEPS + keep) + (keep + keep)  # ascent pass; descent pass from tau
        scalars = 4 + 4 + 1  # two agreements and SAM's ||g||^2
    return 4 * params * vectors + 8 * scalars


def _worker(rank: int, world: int, init: str, configs: list, out: str, device: str) -> None:
    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    results = []
    for cfg in configs:
        shard = Shard.current(CLASSES * cfg[3])
        results.append(
            {"config": cfg[0], "rank": rank, "count": shard.count, **measure(cfg, shard, device)}
        )
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def run_world(world: int, configs: list, device: str = "cpu") -> list[list[dict[str, Any]]]:
    """Per config, one result per rank (``world = 1``: one process, no process group)."""
    if world == 1:
        torch.set_num_threads(2)
        single = "cuda:0" if device == "cuda" else device
        return [[{"config": c[0], "rank": 0, "count": CLASSES * c[3], **measure(c, None, single)}]
                for c in configs]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        mp.start_processes(_worker, args=(world, init, configs, tmp, device), nprocs=world,
                           start_method="spawn")  # fmt: skip
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return [list(col) for col in zip(*per_rank, strict=True)]


def main(argv: list[str] | None = None, *, default_out: str = "scaling.json") -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small config")
    parser.add_argument("--worlds", default="1,2,3")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / default_out))
    args = parser.parse_args(argv)
    configs = QUICK if args.quick else FULL
    worlds = [int(w) for w in args.worlds.split(",")]
    by_world = {w: run_world(w, configs, args.device) for w in worlds}
    rows = []
    for k, cfg in enumerate(configs):
        single = by_world[1][k][0] if 1 in by_world else None
        for w in worlds:
            ranks = by_world[w][k]
            for v in VARIANTS:
                peak = max(r[v]["saved_bytes"] for r in ranks)
                row = {
                    "config": cfg[0], "world": w, "variant": v,
                    "per_rank_saved_mib": round(peak / 2**20, 2),
                    "seconds": round(max(r[v]["seconds"] for r in ranks), 3),
                    "allreduce_mib": round(ranks[0][v]["allreduce_bytes"] / 2**20, 3),
                    "allreduce_calls": ranks[0][v]["allreduce_calls"],
                    "expected_allreduce_mib": round(
                        expected_bytes(v, ranks[0][v]["params"]) / 2**20, 3
                    ) if w > 1 else 0.0,
                }  # fmt: skip
                if args.device == "cuda":
                    cuda_peak = max(r[v]["cuda_max_allocated"] for r in ranks)
                    row["per_rank_cuda_max_mib"] = round(cuda_peak / 2**20, 1)
                    if single is not None:
                        base = single[v]["cuda_max_allocated"]
                        row["cuda_vs_single"] = round(cuda_peak / base, 3)
                if single is not None:
                    row["saved_vs_single"] = round(peak / single[v]["saved_bytes"], 3)
                    row["time_vs_single"] = round(row["seconds"] / single[v]["seconds"], 3)
                    if w in TARGETS:
                        row["target"] = TARGETS[w]
                        row["pass"] = row["saved_vs_single"] <= TARGETS[w]
                rows.append(row)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""),
        "device": args.device,
        "syn_steps": SYN_STEPS,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    keys = [
        "config", "world", "variant", "per_rank_saved_mib", "saved_vs_single", "target", "pass",
        "allreduce_mib", "expected_allreduce_mib", "seconds", "time_vs_single",
    ] + (["per_rank_cuda_max_mib", "cuda_vs_single"] if args.device == "cuda" else [])  # fmt: skip
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    Path(args.out).with_suffix(".md").write_text(
        f"# Sharded scaling ({result['date']}, {result['machine']})\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
