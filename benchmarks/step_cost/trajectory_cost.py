"""Cost of one outer step: MTT (exact BPTT) vs naive SAM vs SATM (DESIGN.md sections 6 and 10).

    python benchmarks/step_cost/trajectory_cost.py [--quick] [--out <file>.json]
    python benchmarks/step_cost/trajectory_cost.py --variants [--out <file>.json]
    python benchmarks/step_cost/trajectory_cost.py --checkpointed [--out <file>.json]

(the recorded files: ``benchmarks/step_cost/results/``; their commands: README.md beside this)

``--variants``: LookSAM (k = 2, 5, 10, each with TUH + TR + first-order lr) and TESLA (alone
and inside SAM) against MTT and SATM, mean step time over whole 10-step cycles, peak saved
bytes, and TESLA's saved bytes for N = 20, 40, 80.

Variants, each one ``opt.step(closure)`` with a fresh ``TrajectoryMatching`` closure per step:
  mtt   SharpBilevelOptimizer(perturbation="none"), UnrollSettings() (exact BPTT, exact lr);
  sam   SharpBilevelOptimizer(perturbation="sam"),  UnrollSettings() (two full BPTT passes);
  satm  satm_optimizer(): smoothed SAM + keep N/3 + TR at tau = iota + first-order lr.
Time: medians of steps interleaved across the variants after one warm-up round, in this process
(wall clock, and the process CPU time beside it: steadier when other processes share the cores).
Memory: the peak of live saved-for-backward bytes (metered in the warm-up round), and for the IPC
10 configs the peak RSS (VmHWM) of a fresh child process that builds one variant and runs one
step of it. The children run with a fixed 64 KiB mmap threshold (MALLOC_MMAP_THRESHOLD_), so
freed tensors go back to the OS and the peak tracks what the step needs; glibc's default dynamic
threshold keeps freed tensors cached and inflates the two-pass variants' peak RSS
(``--rss-glibc-default`` measures that too).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting make a step 10-40x slower when another process shares
# the cores (measured here); passive waiting keeps the timings usable on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from benchmarks.common.memory import saved_bytes_meter
from benchmarks.common.timing import interleaved
from sharp_bilevel import SharpBilevelOptimizer
from sharp_bilevel.trajectory.checkpointed import segment_starts
from sharp_bilevel.trajectory.hypergradient import UnrollSettings
from sharp_bilevel.trajectory.matching import TrajectoryMatching
from sharp_bilevel.trajectory.presets import satm_optimizer
from sharp_bilevel.trajectory.student import FunctionalStudent

VARIANTS = ("mtt", "sam", "satm")
#: --compile-inner: every variant's steps without graph go through the compiled inner step
COMPILE_INNER = [False]
CLASSES = 10
MIB = 2**20
# (name, width, (C, H, W), N, IPC, measured steps); one warm-up round comes on top
FULL = [
    ("w128 8x8 N20 ipc1", 128, (1, 8, 8), 20, 1, 7),
    ("w128 8x8 N20 ipc10", 128, (1, 8, 8), 20, 10, 3),
    ("w128 8x8 N30 ipc1", 128, (1, 8, 8), 30, 1, 7),
    ("w128 8x8 N30 ipc10", 128, (1, 8, 8), 30, 10, 3),
    ("w32 28x28 N20 ipc1", 32, (1, 28, 28), 20, 1, 7),
    ("w32 28x28 N20 ipc10", 32, (1, 28, 28), 20, 10, 3),
]
QUICK = [("w128 8x8 N20 ipc1", 128, (1, 8, 8), 20, 1, 2)]
# environments of the RSS children (see the module docstring)
FIXED_MMAP = {"mmap threshold 64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
GLIBC_DEFAULT: dict[str, dict[str, str]] = {"glibc default": {}}
# ratio key -> bound (the targets)
TARGETS = {"time satm/mtt": 0.85, "time satm/sam": 0.40, "saved satm/mtt": 0.36}


def build_net(width: int, shape: tuple[int, ...]) -> nn.Module:
    """MTT's ConvNet: the library's ``get_network`` when it works, else a local copy."""
    try:
        from sharp_bilevel.distill.networks import get_network

        return get_network("ConvNet", shape[0], CLASSES, tuple(shape[1:]), width=width, seed=0)
    except (ImportError, AttributeError, TypeError, ValueError):
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        channels, size = shape[0], shape[1]
        for d in range(3):
            pad = 3 if shape[0] == 1 and d == 0 else 1
            layers += [nn.Conv2d(channels, width, 3, padding=pad), nn.GroupNorm(width, width)]
            layers += [nn.ReLU(), nn.AvgPool2d(2)]
            channels, size = width, (size + 2 * pad - 2) // 2
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * size * size, CLASSES))


class Run:
    """One variant on one config: outer variables, optimizer, expert segment; ``step()``."""

    def __init__(
        self, variant: str, net: nn.Module, cfg: tuple, keep: int | float = 1.0 / 3.0
    ) -> None:
        _, _, shape, self.syn_steps, ipc, _ = cfg
        gen = torch.Generator().manual_seed(1)
        self.net = net
        self.images = torch.randn(CLASSES * ipc, *shape, generator=gen).requires_grad_(True)
        self.labels = torch.arange(CLASSES).repeat_interleave(ipc)
        self.syn_lr = torch.tensor(0.01, requires_grad=True)
        self.start = FunctionalStudent(net).flat_parameters()
        self.target = self.start + 0.01 * torch.randn(self.start.shape, generator=gen)
        groups = [
            {"params": [self.images]},
            {"params": [self.syn_lr], "lr": 1e-5, "perturb": False},
        ]
        if variant == "satm":
            self.opt = satm_optimizer(groups, lr=100.0, keep=keep, seed=0)
        else:
            self.opt = SharpBilevelOptimizer(
                groups,
                perturbation="none" if variant == "mtt" else "sam",
                lr=100.0,
                momentum=0.5,
                closure_options={"unroll": UnrollSettings()},
            )
        self.count = 0

    def step(self) -> None:
        closure = TrajectoryMatching(
            self.net,
            self.images,
            self.syn_lr,
            self.labels,
            expert_start=self.start,
            expert_target=self.target,
            syn_steps=self.syn_steps,
            seed=self.count,
            compile_inner=COMPILE_INNER[0],
        )
        self.count += 1
        self.opt.step(closure)


# ---------------------------------------------------------------------- printing
def print_table(title: str, header: list[str], rows: list[list]) -> None:
    if not rows:
        return
    cells = [header] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


# ---------------------------------------------------------------------- measurements
def peak_saved(run: Run) -> int:
    with saved_bytes_meter() as meter:
        run.step()
    gc.collect()
    if meter["live"] != 0:
        raise RuntimeError(f"{meter['live']} saved bytes still alive after the step")
    return meter["peak"]


def _vm(field: str) -> float:
    """A field of /proc/self/status in MiB (VmRSS: now, VmHWM: peak of this process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_of_one_step(cfg: list, variant: str, threads: int) -> dict[str, float]:
    """Run in a child: RSS before one step of ``variant`` and the process's peak after it."""
    torch.set_num_threads(threads)
    run = Run(variant, build_net(cfg[1], cfg[2]), tuple(cfg))
    before = _vm("VmRSS")
    run.step()
    return {"before_mib": round(before, 1), "peak_mib": round(_vm("VmHWM"), 1)}


def child_rss(cfg: tuple, variant: str, threads: int, env: dict[str, str]) -> dict[str, float]:
    """Peak RSS of ``rss_of_one_step`` in a fresh interpreter with ``env`` added."""
    root = str(Path(__file__).resolve().parents[2])
    code = (
        f"import json, sys; sys.path.insert(0, {root!r}); "
        "import benchmarks.step_cost.trajectory_cost as t; "
        f"print(json.dumps(t.rss_of_one_step({list(cfg)!r}, {variant!r}, {threads})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(values: dict[str, float], prefix: str) -> dict[str, float]:
    pairs = (("satm", "mtt"), ("satm", "sam"), ("sam", "mtt"))
    return {f"{prefix} {a}/{b}": values[a] / values[b] for a, b in pairs}


def measure_config(cfg: tuple, allocators: dict[str, dict[str, str]], threads: int) -> dict:
    name, _, _, syn_steps, ipc, repeats = cfg
    net = build_net(cfg[1], cfg[2])
    runs = {v: Run(v, net, cfg) for v in VARIANTS}
    if COMPILE_INNER[0]:  # compile outside the meter (torch.func refuses saved-tensor hooks)
        for v in VARIANTS:
            runs[v].step()
    saved = {v: float(peak_saved(runs[v])) for v in VARIANTS}  # the warm-up round, metered
    wall, cpu = interleaved({v: runs[v].step for v in VARIANTS}, repeats)
    med_wall = {v: statistics.median(wall[v]) for v in VARIANTS}
    med_cpu = {v: statistics.median(cpu[v]) for v in VARIANTS}
    result = {
        "config": name,
        "N": syn_steps,
        "ipc": ipc,
        "keep_satm": UnrollSettings.satm().keep_steps(syn_steps),
        "wall_s": wall,
        "cpu_s": cpu,
        "median_wall_s": med_wall,
        "median_cpu_s": med_cpu,
        "peak_saved_bytes": saved,
        **ratios(med_wall, "time"),
        **ratios(med_cpu, "cpu"),
        **ratios(saved, "saved"),
    }
    for allocator, env in allocators.items():
        rss_mib = {v: child_rss(cfg, v, threads, env) for v in VARIANTS}
        growth = {v: rss_mib[v]["peak_mib"] - rss_mib[v]["before_mib"] for v in VARIANTS}
        result.setdefault("rss_mib", {})[allocator] = rss_mib
        result.setdefault("rss_growth", {})[allocator] = ratios(growth, "rss growth")
    print(f"{name}: " + ", ".join(f"{v} {med_wall[v]:.2f}s" for v in VARIANTS), flush=True)
    return result


def scaling(cfg: tuple, sizes: list[int], keeps: list[int]) -> dict:
    """SATM's peak saved bytes at a fixed keep over N, and over keep at the largest N."""
    net = build_net(cfg[1], cfg[2])

    def peak(syn_steps: int, keep: int) -> int:
        return peak_saved(Run("satm", net, (*cfg[:3], syn_steps, *cfg[4:]), keep))

    by_n = {n: peak(n, keeps[1]) for n in sizes}
    by_keep = {k: by_n[sizes[-1]] if k == keeps[1] else peak(sizes[-1], k) for k in keeps}
    return {
        "config": cfg[0].rsplit(" ", 2)[0] + f" ipc{cfg[4]}",
        "keep_fixed": keeps[1],
        "by_N": by_n,
        "N_fixed": sizes[-1],
        "by_keep": by_keep,
    }


# ---------------------------------------------------------------------- LookSAM and TESLA
#: variant -> (rule, its keyword arguments, unroll settings); MTT is the reference.
VARIANT_RUNS: dict[str, tuple[str, dict, UnrollSettings]] = {
    "mtt": ("none", {}, UnrollSettings()),
    "satm": ("ssam", {"smooth": 0.01}, UnrollSettings.satm()),
    **{
        f"looksam k={k}": ("looksam", {"k": k}, UnrollSettings.satm())  # + TUH + TR
        for k in (2, 5, 10)
    },
    "tesla": ("none", {}, UnrollSettings.tesla()),
    "sam + tesla": ("sam", {}, UnrollSettings.tesla()),
}
CYCLE = 10  # a multiple of every k: each LookSAM variant's mean covers whole cycles
#: LookSAM k=5 with TUH+TR must take at most this share of MTT's step time (issue 10)
LOOKSAM_TARGET = 0.65


class VariantRun(Run):
    """A ``Run`` whose optimizer is one of ``VARIANT_RUNS``."""

    def __init__(self, variant: str, net: nn.Module, cfg: tuple) -> None:
        super().__init__("mtt", net, cfg)
        rule, kwargs, settings = VARIANT_RUNS[variant]
        groups = [
            {"params": [self.images]},
            {"params": [self.syn_lr], "lr": 1e-5, "perturb": False},
        ]
        self.opt = SharpBilevelOptimizer(
            groups,
            perturbation=rule,
            lr=100.0,
            momentum=0.5,
            seed=0,
            closure_options={"unroll": settings},
            **kwargs,
        )


def peak_saved_cycle(run: Run, steps: int) -> int:
    """The peak saved bytes over ``steps`` consecutive steps (a LookSAM cycle has one SAM step)."""
    peak = 0
    for _ in range(steps):
        peak = max(peak, peak_saved(run))
    return peak


def variant_costs(cfg: tuple, cycles: int, tesla_lengths: list[int]) -> dict:
    """Mean step time over whole LookSAM cycles (variants interleaved cycle by cycle) and the
    peak saved bytes of each variant; TESLA's and BPTT's saved bytes over N."""
    net = build_net(cfg[1], cfg[2])
    runs = {v: VariantRun(v, net, cfg) for v in VARIANT_RUNS}
    saved = {v: float(peak_saved_cycle(runs[v], CYCLE)) for v in VARIANT_RUNS}  # warm-up
    wall, cpu = interleaved({v: runs[v].step for v in VARIANT_RUNS}, cycles, per_turn=CYCLE)
    mean_wall = {v: statistics.fmean(wall[v]) for v in VARIANT_RUNS}
    mean_cpu = {v: statistics.fmean(cpu[v]) for v in VARIANT_RUNS}
    by_n: dict[str, dict[int, float]] = {"tesla": {}, "mtt": {}}
    for n in tesla_lengths:
        for v in by_n:
            run = VariantRun(v, net, (*cfg[:3], n, *cfg[4:]))
            by_n[v][n] = float(peak_saved(run))
    result = {
        "config": cfg[0],
        "cycle_steps": CYCLE,
        "cycles": cycles,
        "mean_wall_s": mean_wall,
        "mean_cpu_s": mean_cpu,
        "time_vs_mtt": {v: mean_wall[v] / mean_wall["mtt"] for v in VARIANT_RUNS},
        "cpu_vs_mtt": {v: mean_cpu[v] / mean_cpu["mtt"] for v in VARIANT_RUNS},
        "peak_saved_bytes": saved,
        "saved_vs_mtt": {v: saved[v] / saved["mtt"] for v in VARIANT_RUNS},
        "saved_by_N": by_n,
    }
    print(f"{cfg[0]}: " + ", ".join(f"{v} {mean_wall[v]:.2f}s" for v in VARIANT_RUNS), flush=True)
    return result


def report_variants(results: list[dict]) -> dict:
    print_table(
        f"Mean step time over whole {CYCLE}-step cycles (ratio to MTT; CPU time in brackets) and "
        "peak saved bytes (ratio to MTT)",
        ["config", "variant", "s/step", "time/MTT", "saved/MTT"],
        [
            [
                r["config"],
                v,
                f"{r['mean_wall_s'][v]:.3f}",
                f"{r['time_vs_mtt'][v]:.3f} ({r['cpu_vs_mtt'][v]:.3f})",
                r["saved_vs_mtt"][v],
            ]
            for r in results
            for v in VARIANT_RUNS
        ],
    )
    for r in results:
        by_n = r["saved_by_N"]
        print_table(
            f"Peak saved MiB over N, {r['config']}",
            ["N", "TESLA", "MTT (BPTT)"],
            [[n, by_n["tesla"][n] / MIB, by_n["mtt"][n] / MIB] for n in by_n["tesla"]],
        )
    worst = max(r["time_vs_mtt"]["looksam k=5"] for r in results)
    worst_cpu = max(r["cpu_vs_mtt"]["looksam k=5"] for r in results)
    tesla_flat = all(len(set(r["saved_by_N"]["tesla"].values())) == 1 for r in results)
    verdicts = {
        "time looksam k=5/mtt": {
            "bound": LOOKSAM_TARGET,
            "worst": worst,
            "worst cpu": worst_cpu,
            "pass": worst <= LOOKSAM_TARGET,
        },
        "tesla saved constant in N": {"pass": tesla_flat},
    }
    print(
        f"\nTargets: LookSAM k=5 + TUH + TR <= {LOOKSAM_TARGET} x MTT: worst {worst:.3f} "
        f"[CPU {worst_cpu:.3f}] -> {'PASS' if worst <= LOOKSAM_TARGET else 'MISS'}; TESLA saved "
        f"bytes constant in N: {'PASS' if tesla_flat else 'MISS'}"
    )
    return verdicts


# ---------------------------------------------------------------------- checkpointed BPTT
#: saved bytes of the checkpointed unroll at N = 80 against exact BPTT, and its time (issue 11)
CHECKPOINT_TARGETS = {"saved": 0.30, "time": 1.4}


def checkpoint_costs(cfg: tuple, lengths: list[int], repeats: int) -> dict:
    """Exact BPTT against the checkpointed unroll (segment ceil(sqrt(N))): median step time
    (interleaved) and peak saved bytes, for each N."""
    net = build_net(cfg[1], cfg[2])
    out: dict[str, dict] = {}
    for n in lengths:
        runs = {}
        for mode in ("bptt", "checkpointed"):
            run = Run("mtt", net, (*cfg[:3], n, *cfg[4:]))
            run.opt.closure_options = {"unroll": UnrollSettings(hypergradient=mode)}
            runs[mode] = run
        saved = {m: float(peak_saved(r)) for m, r in runs.items()}  # also the warm-up
        times, _ = interleaved({m: r.step for m, r in runs.items()}, repeats)
        med = {m: statistics.median(t) for m, t in times.items()}
        out[str(n)] = {
            "segment": segment_starts(0, n, None)[1] if n > 1 else 1,
            "median_wall_s": med,
            "peak_saved_bytes": saved,
            "time ratio": med["checkpointed"] / med["bptt"],
            "saved ratio": saved["checkpointed"] / saved["bptt"],
        }
        print(
            f"N={n}: {out[str(n)]['saved ratio']:.3f} saved, {out[str(n)]['time ratio']:.3f} time"
        )
    last = out[str(lengths[-1])]
    verdicts = {
        "saved at largest N": {"bound": CHECKPOINT_TARGETS["saved"], "value": last["saved ratio"]},
        "time at largest N": {"bound": CHECKPOINT_TARGETS["time"], "value": last["time ratio"]},
    }
    return {"config": cfg[0], "by_N": out, "targets": verdicts}


# ---------------------------------------------------------------------- report
def report(results: list[dict], scale: dict) -> dict:
    print_table(
        "Time: ratios of median wall-clock step times (process CPU time ratio in brackets); "
        "peak live saved-for-backward bytes",
        [
            "config",
            "MTT s",
            "SATM/MTT",
            "SATM/SAM",
            "SAM/MTT",
            "saved SATM/MTT",
            "saved SAM/MTT",
            "MTT saved MiB",
        ],
        [
            [
                r["config"],
                f"{r['median_wall_s']['mtt']:.2f}",
                *(
                    f"{r['time ' + k]:.3f} ({r['cpu ' + k]:.3f})"
                    for k in ("satm/mtt", "satm/sam", "sam/mtt")
                ),
                r["saved satm/mtt"],
                r["saved sam/mtt"],
                f"{r['peak_saved_bytes']['mtt'] / MIB:.1f}",
            ]
            for r in results
        ],
    )
    print_table(
        "Peak RSS MiB of a fresh child running one step: peak (growth over its RSS just before "
        "the step); ratios of the growths",
        ["config", "allocator", *VARIANTS, "SATM/MTT", "SAM/MTT"],
        [
            [r["config"], allocator]
            + [
                f"{m[v]['peak_mib']:.0f} ({m[v]['peak_mib'] - m[v]['before_mib']:.0f})"
                for v in VARIANTS
            ]
            + [r["rss_growth"][allocator][f"rss growth {k}"] for k in ("satm/mtt", "sam/mtt")]
            for r in results
            if "rss_mib" in r
            for allocator, m in r["rss_mib"].items()
        ],
    )
    print_table(
        f"SATM peak saved MiB, {scale['config']}, keep={scale['keep_fixed']} steps, varying N",
        ["N", "peak MiB"],
        [[n, b / MIB] for n, b in scale["by_N"].items()],
    )
    print_table(
        f"SATM peak saved MiB, {scale['config']}, N={scale['N_fixed']}, varying keep",
        ["keep", "peak MiB", "MiB per kept step"],
        [[k, b / MIB, b / MIB / k] for k, b in scale["by_keep"].items()],
    )
    verdicts = {}
    print("\nTargets (the worst config counts; time on the wall clock, CPU time beside it):")
    for key, bound in TARGETS.items():
        worst = max(r[key] for r in results)
        verdicts[key] = {"bound": bound, "worst": worst, "pass": worst <= bound}
        line = f"  {key} <= {bound}: worst {worst:.3f} -> {'PASS' if worst <= bound else 'MISS'}"
        if key.startswith("time"):
            cpu = max(r[key.replace("time", "cpu")] for r in results)
            verdicts[key].update({"worst cpu": cpu, "pass cpu": cpu <= bound})
            line += f"  [CPU time: worst {cpu:.3f} -> {'PASS' if cpu <= bound else 'MISS'}]"
        print(line)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest config, 2 steps")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS child processes")
    parser.add_argument(
        "--rss-glibc-default", action="store_true", help="also measure RSS with glibc's defaults"
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="only the LookSAM (k = 2, 5, 10) and TESLA table against MTT and SATM",
    )
    parser.add_argument(
        "--compile-inner",
        action="store_true",
        help="run every variant with compile_inner=True (add --only to pick configs)",
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated config names to run (default: all)"
    )
    parser.add_argument(
        "--checkpointed",
        action="store_true",
        help="only exact BPTT against the checkpointed unroll, N = 20, 40, 80",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load_before = time.time(), os.getloadavg()[0]
    configs = QUICK if args.quick else FULL
    COMPILE_INNER[0] = args.compile_inner
    if args.compile_inner:
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.compile's own
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        configs = [c for c in configs if c[0] in wanted]
    if args.checkpointed:
        cfg = configs[0]
        lengths = [6, 12] if args.quick else [20, 40, 80]
        doc = checkpoint_costs(cfg, lengths, 1 if args.quick else 5)
        doc["meta"] = {
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "torch_threads": args.threads,
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "wall_s": round(time.time() - started, 1),
        }
        print(json.dumps(doc["targets"]))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
        return
    if args.variants:
        chosen = configs if args.quick else [c for c in FULL if c[4] == 1]
        lengths = [6, 12] if args.quick else [20, 40, 80]
        results = [variant_costs(c, 1 if args.quick else 2, lengths) for c in chosen]
        verdicts = report_variants(results)
        meta = {
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "torch_threads": args.threads,
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "quick": args.quick,
            "wall_s": round(time.time() - started, 1),
        }
        print(f"\ntotal {meta['wall_s']:.0f}s, 1-min load average {meta['load_average_1min']}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            doc = {"meta": meta, "configs": results, "targets": verdicts}
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
        return
    allocators = {**FIXED_MMAP, **(GLIBC_DEFAULT if args.rss_glibc_default else {})}
    results = [
        measure_config(
            cfg, {} if args.no_rss or (cfg[4] < 10 and not args.quick) else allocators, args.threads
        )
        for cfg in configs
    ]
    scale_cfg = configs[0] if (args.quick or len(configs) < 2) else configs[1]
    scale = scaling(scale_cfg, [12, 20, 30], [3, 6, 9])
    verdicts = report(results, scale)
    meta = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch_threads": args.threads,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "quick": args.quick,
        "wall_s": round(time.time() - started, 1),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "rss": "VmHWM of a fresh child process per variant, config and allocator (one step)",
    }
    print(f"\ntotal {meta['wall_s']:.0f}s, 1-min load average {meta['load_average_1min']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"meta": meta, "configs": results, "scaling": scale, "targets": verdicts}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
