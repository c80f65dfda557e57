"""Running (or resuming) an evidence plan: which jobs are ready given what is done, recording
their results in the report, and the loop that runs them in one or several worker processes and
rewrites the JSON, the Markdown and the figure as they finish."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from benchmarks.evidence.jobs import expert_file, load, run_job, set_file
from benchmarks.evidence.plan import DATE, Plan, is_tuned, keep_steps
from benchmarks.evidence.report import lr_grid, run_key, table_runs, write_report

PLOT_EVERY = 300.0  # seconds between redrawn plots during a run (always at the end)


# --------------------------------------------------------------------------------------------
# what is ready to run, given what is done


def ready(plan: Plan, report: dict[str, Any], cache: Path) -> list[tuple[str, str, dict]]:
    """Jobs whose inputs exist and whose results do not: (id, kind, args)."""
    jobs: list[tuple[str, str, dict]] = []
    experts = [f"expert/{k}" for k in range(plan.num_experts)]
    missing = [k for k in range(plan.num_experts) if not expert_file(cache, k).is_file()]
    for k in missing:
        jobs.append((experts[k], "expert", {"k": k}))
    if missing:
        return jobs
    done = report["jobs"]

    def add(job_id: str, kind: str, args: dict[str, Any]) -> None:
        if job_id not in done:
            jobs.append((job_id, kind, args))

    def distilled(key: str) -> bool:
        return key in report["distill"] and set_file(cache, key).is_file()

    for ipc in plan.ipcs:
        add(f"norm_ratio/ipc{ipc}", "norm_ratio", {"ipc": ipc})
        for seed in plan.seeds:
            add(f"reference/ipc{ipc}/seed{seed}", "reference", {"ipc": ipc, "seed": seed})
        # the tuning grid at seed 0, scored on the validation split (it may grow: lr_grid)
        grid, _ = lr_grid(report, ipc)
        for row in plan.rows:
            if not is_tuned(row):
                continue
            for lr in grid:
                key = run_key(ipc, row, lr, plan.seeds[0])
                if not distilled(key):
                    add(f"distill/{key}", "distill", _distill_args(ipc, row, lr, plan.seeds[0]))
                elif key not in report["val"]:
                    add(f"val/{key}", "evaluate", {"key": key, "split": "val"})
        # the table runs, once their lr is known
        for (row, kind), lr in table_runs(report, ipc).items():
            for seed in plan.seeds:
                key = run_key(ipc, row, lr, seed)
                if not distilled(key):
                    add(f"distill/{key}", "distill", _distill_args(ipc, row, lr, seed))
                    continue
                if key not in report["test"]:
                    add(f"test/{key}", "evaluate", {"key": key, "split": "test"})
                probe = kind == "shared" and seed in plan.hessian_seeds
                if key not in report["flatness"]:
                    args = {"key": key, "ipc": ipc, "seed": seed, "hessian": probe}
                    add(f"flatness/{key}", "flatness", args)
                if probe and key not in report["robustness"] and key in report["test"]:
                    clean = report["test"][key]["accuracy"]["ConvNet"]["accuracies"][0]
                    add(f"robustness/{key}", "robustness", {"key": key, "clean": clean})
    unique: dict[str, tuple[str, str, dict]] = {}
    for job in jobs:  # a run can be a grid point and a table run, shared and tuned: first wins
        unique.setdefault(job[0], job)
    return sorted(unique.values(), key=_priority)


def _priority(job: tuple[str, str, dict]) -> int:
    """Distillation first (it unblocks the rest), then validation, references, tests, flatness."""
    prefix = job[0].split("/", 1)[0]
    return {"distill": 0, "val": 1, "reference": 2, "norm_ratio": 2, "test": 3}.get(prefix, 4)


def _distill_args(ipc: int, row: str, lr: float, seed: int) -> dict[str, Any]:
    return {"ipc": ipc, "row": row, "lr": lr, "seed": seed}


def record(report: dict[str, Any], job_id: str, kind: str, args: dict, out: dict) -> None:
    report["jobs"][job_id] = out.get("seconds", 0.0)
    if kind == "distill":
        key = run_key(args["ipc"], args["row"], args["lr"], args["seed"])
        report["distill"][key] = {**args, **out}
    elif kind == "evaluate":
        report["val" if args["split"] == "val" else "test"][args["key"]] = out
    elif kind == "flatness":
        report["flatness"][args["key"]] = out
    elif kind == "robustness":
        report["robustness"][args["key"]] = out
    elif kind == "reference":
        report["reference"][f"ipc{args['ipc']}/seed{args['seed']}"] = out
    elif kind == "norm_ratio":
        report["norm_ratio"][f"ipc{args['ipc']}"] = out


#: Plan fields whose change only adds jobs: a report made with other values resumes.
ADDITIVE = ("lr_extend", "lr_extend_down")


def resumable(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether a report made under plan ``old`` can be continued under ``new``."""
    if old is None:
        return False

    def core(plan: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in plan.items() if k not in ADDITIVE}

    return core(old) == core(new)


def new_report(plan: Plan) -> dict[str, Any]:
    return {
        "benchmark": "evidence",
        "date": DATE,
        "script": "benchmarks/evidence/evidence.py",
        "plan": dataclasses.asdict(plan),
        "keep": keep_steps(plan),
        "machine": {
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "jobs": {},
        "distill": {},
        "val": {},
        "test": {},
        "flatness": {},
        "robustness": {},
        "reference": {},
        "norm_ratio": {},
        "tuned_rows": [row for row in plan.rows if is_tuned(row)],
        "wall_seconds": 0.0,
    }


def run(
    plan: Plan,
    out: Path,
    cache: Path,
    workers: int,
    max_jobs: int | None = None,
    variant: str = "smoke",
) -> dict:
    """Run (or resume) the plan; returns the report. ``max_jobs`` stops early (for tests);
    ``variant`` (full, quick, smoke) is recorded in the report."""
    name = "evidence" if plan.dataset == "fashion" else f"evidence_{plan.dataset}"
    path = out / f"{name}.json"
    report = json.loads(json.dumps(new_report(plan)))  # as it reads back (tuples as lists)
    if path.is_file():
        old = json.loads(path.read_text())
        if resumable(old.get("plan"), report["plan"]):
            report = {**report, **old, "plan": report["plan"]}  # sections added since: empty
        else:
            print(f"{path} holds another plan: starting afresh", flush=True)
    report["variant"] = variant
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    if "data" not in report:
        train, val, test = load(plan)
        report["data"] = {
            "train": len(train),
            "val": len(val),
            "test": len(test),
            "shape": [train.channels, *train.image_size],
        }
    began = time.perf_counter()
    wall0 = report["wall_seconds"]
    executed = 0
    plotted = -math.inf

    def save(final: bool = False) -> None:
        nonlocal plotted
        report["wall_seconds"] = wall0 + time.perf_counter() - began
        path.write_text(json.dumps(report, indent=1) + "\n")
        now = time.perf_counter()
        draw = final or now - plotted > PLOT_EVERY
        write_report(report, out, name, plot_too=draw)
        plotted = now if draw else plotted

    def finished(job_id: str, kind: str, args: dict, result: dict) -> None:
        nonlocal executed
        executed += 1
        record(report, job_id, kind, args, result)
        save()
        print(
            f"[{(time.perf_counter() - began) / 60:5.1f} min] {job_id} "
            f"({result.get('seconds', 0.0):.0f} s)",
            flush=True,
        )

    if workers <= 1:
        while (todo := ready(plan, report, cache)) and (max_jobs is None or executed < max_jobs):
            job_id, kind, args = todo[0]
            finished(job_id, kind, args, run_job(plan, cache, kind, args))
    else:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        running: dict[Future[dict], tuple[str, str, dict]] = {}
        try:
            while True:
                busy = {j[0] for j in running.values()}
                for job in ready(plan, report, cache):
                    if len(running) >= workers:
                        break
                    if job[0] not in busy:
                        running[pool.submit(run_job, plan, cache, job[1], job[2])] = job
                        busy.add(job[0])
                if not running:
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    job_id, kind, args = running.pop(future)
                    finished(job_id, kind, args, future.result())
        finally:
            pool.shutdown(cancel_futures=True)
    save(final=True)
    report["executed"] = executed
    return report
