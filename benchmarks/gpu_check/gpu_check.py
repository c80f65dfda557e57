"""The prepared GPU check: exactness, memory and time at SATM's Table 6 scale, mixed precision.

    python benchmarks/gpu_check/gpu_check.py                       # on the GPU (about 5 minutes)
    python benchmarks/gpu_check/gpu_check.py --device cpu --quick  # the same code path, seconds

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out-dir`` (default
``benchmarks/gpu_check/results``; ``--quick`` writes ``gpu_check_quick.*``):

1. exactness: float64 image and lr gradients on the device against the CPU for MTT (exact
   BPTT), SAM (one full two-pass step) and SATM (smoothed SAM + TUH + TR + first-order lr);
2. scale (the paper's Table 6: ConvNet width 128, 32x32x3, 100 classes, IPC 10, N = 50, random
   images and experts): peak memory (``torch.cuda.max_memory_allocated`` on CUDA; on the CPU
   the peak of live saved-for-backward bytes) and median step time of MTT, SAM, SATM, TESLA and
   the checkpointed exact BPTT, as ratios to MTT, beside the paper's figures;
3. mixed precision: bf16 (and fp16 with a GradScaler, CUDA only) step time and the relative
   error of the image hypergradient against float32, for MTT;
4. the compiled inner step: SATM's step time with ``compile_inner=True`` against eager.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from benchmarks.common.memory import saved_bytes_meter
from sharp_bilevel import SharpBilevelOptimizer, TrajectoryMatching, UnrollSettings
from sharp_bilevel.distill.networks import get_network
from sharp_bilevel.trajectory.augment import DSA
from sharp_bilevel.trajectory.student import FunctionalStudent

#: SATM paper, Table 6 (CIFAR-100, IPC 10, N = 50, one GPU): memory GB and seconds per step
PAPER = {
    "memory_gb": {"mtt": 17.1, "tesla": 3.6, "satm": 5.7},
    "seconds": {"mtt": 12.1, "tesla": 15.3, "satm": 12.0},
}
FULL = {"width": 128, "shape": (3, 32, 32), "classes": 100, "ipc": 10, "steps": 50, "repeats": 3}
QUICK = {"width": 8, "shape": (3, 8, 8), "classes": 4, "ipc": 1, "steps": 4, "repeats": 1}
#: variant -> (rule, rule kwargs, unroll settings)
VARIANTS: dict[str, tuple[str, dict[str, Any], UnrollSettings]] = {
    "mtt": ("none", {}, UnrollSettings()),
    "sam": ("sam", {}, UnrollSettings()),
    "satm": ("ssam", {"smooth": 0.01}, UnrollSettings.satm()),
    "tesla": ("none", {}, UnrollSettings.tesla()),
    "checkpointed": ("none", {}, UnrollSettings(hypergradient="checkpointed")),
}


class Problem:
    """Random images, labels and an expert segment for one network, on ``device``."""

    def __init__(
        self, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        c, h, w = cfg["shape"]
        net = get_network("ConvNet", c, cfg["classes"], (h, w), width=cfg["width"], seed=seed)
        self.net = net.to(device, dtype)
        n = cfg["classes"] * cfg["ipc"]
        self.images = torch.randn(n, c, h, w, generator=gen, dtype=dtype).to(device)
        self.images.requires_grad_(True)
        self.labels = torch.arange(cfg["classes"], device=device).repeat_interleave(cfg["ipc"])
        self.syn_lr = torch.tensor(0.01, dtype=dtype, device=device, requires_grad=True)
        start = FunctionalStudent(self.net).flat_parameters().detach()
        noise = torch.randn(start.shape, generator=gen, dtype=dtype).to(device)
        self.start, self.target = start, start + 0.01 * noise
        self.steps = cfg["steps"]

    def objective(
        self, seed: int, autocast: torch.dtype | None = None, compile_inner: bool = False
    ) -> TrajectoryMatching:
        return TrajectoryMatching(
            self.net,
            self.images,
            self.syn_lr,
            self.labels,
            expert_start=self.start,
            expert_target=self.target,
            syn_steps=self.steps,
            augmentation=DSA(),
            seed=seed,
            autocast=autocast,
            compile_inner=compile_inner,
        )

    def optimizer(self, variant: str, scaler: Any = None) -> SharpBilevelOptimizer:
        rule, kwargs, settings = VARIANTS[variant]
        return SharpBilevelOptimizer(
            [
                {"params": [self.images]},
                {"params": [self.syn_lr], "perturb": False, "lr": 1e-5},
            ],
            perturbation=rule,
            lr=100.0,
            momentum=0.5,
            seed=0,
            grad_scaler=scaler,
            closure_options={"unroll": settings},
            **kwargs,
        )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_step_gradients(variant: str, device: torch.device) -> list[Tensor]:
    """The image and lr gradients of one step of ``variant`` (float64, the tiny config)."""
    problem = Problem(QUICK, device, torch.float64, seed=3)
    opt = problem.optimizer(variant)
    opt.step(problem.objective(seed=5))
    assert problem.images.grad is not None
    assert problem.syn_lr.grad is not None
    return [problem.images.grad.detach().cpu(), problem.syn_lr.grad.detach().cpu()]


def exactness(device: torch.device) -> dict[str, dict[str, float]]:
    out = {}
    for variant in ("mtt", "sam", "satm"):
        here = one_step_gradients(variant, device)
        cpu = one_step_gradients(variant, torch.device("cpu"))
        out[variant] = {
            name: float((a - b).norm() / b.norm().clamp_min(1e-300))
            for name, a, b in zip(("images", "syn_lr"), here, cpu, strict=True)
        }
    return out


def measure(
    step: Callable[[], None], device: torch.device, repeats: int
) -> tuple[float, float, float]:
    """(peak bytes of the first call, median seconds of the next ``repeats``, saved bytes)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with saved_bytes_meter() as meter:
        step()
        synchronize(device)
    saved = float(meter["peak"])
    peak = float(torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else saved
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return peak, statistics.median(times), saved


def scale(cfg: dict[str, Any], device: torch.device) -> dict[str, dict[str, float]]:
    out = {}
    for variant in VARIANTS:
        problem = Problem(cfg, device, torch.float32)
        opt = problem.optimizer(variant)
        count = [0]

        def step(
            problem: Problem = problem, opt: SharpBilevelOptimizer = opt, count: list = count
        ) -> None:
            opt.step(problem.objective(seed=count[0]))
            count[0] += 1

        peak, seconds, saved = measure(step, device, cfg["repeats"])
        out[variant] = {"peak_bytes": peak, "seconds": seconds, "saved_bytes": saved}
        print(f"  {variant}: {peak / 2**20:.1f} MiB, {seconds:.2f} s/step", flush=True)
        del problem, opt
    for variant in VARIANTS:
        out[variant]["memory_vs_mtt"] = out[variant]["peak_bytes"] / out["mtt"]["peak_bytes"]
        out[variant]["time_vs_mtt"] = out[variant]["seconds"] / out["mtt"]["seconds"]
    return out


def precision(cfg: dict[str, Any], device: torch.device) -> dict[str, dict[str, float]]:
    """MTT's step time and image-hypergradient error in bf16 (and fp16) against float32."""
    kinds: list[tuple[str, torch.dtype | None]] = [("float32", None), ("bfloat16", torch.bfloat16)]
    if device.type == "cuda":
        kinds.append(("float16", torch.float16))
    grads: dict[str, Tensor] = {}
    out: dict[str, dict[str, float]] = {}
    for name, dtype in kinds:
        problem = Problem(cfg, device, torch.float32)
        scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
        opt = problem.optimizer("mtt", scaler)
        probe = problem.objective(seed=0, autocast=dtype)
        probe()  # the gradient at the initial point, for the error
        assert problem.images.grad is not None
        grads[name] = problem.images.grad.detach().clone()
        problem.images.grad = None
        count = [0]

        def step(
            problem: Problem = problem,
            opt: SharpBilevelOptimizer = opt,
            count: list = count,
            dtype: torch.dtype | None = dtype,
        ) -> None:
            opt.step(problem.objective(seed=count[0], autocast=dtype))
            count[0] += 1

        _, seconds, _ = measure(step, device, cfg["repeats"])
        out[name] = {"seconds": seconds}
    for name in out:
        diff = (grads[name] - grads["float32"]).norm() / grads["float32"].norm()
        out[name]["relative_error"] = float(diff)
        out[name]["time_vs_float32"] = out[name]["seconds"] / out["float32"]["seconds"]
    return out


def compiled_step(cfg: dict[str, Any], device: torch.device) -> dict[str, float]:
    """SATM's step time with the compiled inner step (its steps before iota) against eager."""
    out: dict[str, float] = {}
    for compile_inner in (False, True):
        problem = Problem(cfg, device, torch.float32)
        opt = problem.optimizer("satm")
        count = [0]

        def step(
            problem: Problem = problem,
            opt: SharpBilevelOptimizer = opt,
            count: list = count,
            compile_inner: bool = compile_inner,
        ) -> None:
            opt.step(problem.objective(seed=count[0], compile_inner=compile_inner))
            count[0] += 1

        step()  # compiles outside the timing (and outside measure's saved-tensor meter)
        _, seconds, _ = measure(step, device, cfg["repeats"])
        out["compiled_s" if compile_inner else "eager_s"] = seconds
    out["speed_up"] = out["eager_s"] / out["compiled_s"]
    return out


def markdown(doc: dict[str, Any]) -> str:
    meta, cfg = doc["meta"], doc["config"]
    lines = [
        "# GPU check",
        "",
        f"`python benchmarks/gpu_check/gpu_check.py{' --quick' if meta['quick'] else ''} --device "
        f"{meta['device']}` on {meta['device_name']}, {meta['date']}, torch {meta['torch']} "
        f"({meta['wall_s']:.0f} s). Config: ConvNet width {cfg['width']}, "
        f"{'x'.join(map(str, cfg['shape']))}, {cfg['classes']} classes, IPC {cfg['ipc']}, "
        f"N = {cfg['steps']}, random images and expert segment, DSA on.",
        "",
        "## Exactness: float64 gradients on the device against the CPU (relative difference)",
        "",
        "| variant | images | syn_lr |",
        "|---|---|---|",
    ]
    for v, r in doc["exactness"].items():
        lines.append(f"| {v} | {r['images']:.2e} | {r['syn_lr']:.2e} |")
    memory = "max_memory_allocated" if meta["device"].startswith("cuda") else "peak saved bytes"
    lines += [
        "",
        f"## Memory ({memory}) and time per step, against MTT; the paper's figures beside",
        "",
        "| variant | MiB | memory/MTT | paper GB | s/step | time/MTT | paper s |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, r in doc["scale"].items():
        mem, sec = PAPER["memory_gb"].get(v, "-"), PAPER["seconds"].get(v, "-")
        lines.append(
            f"| {v} | {r['peak_bytes'] / 2**20:.1f} | {r['memory_vs_mtt']:.3f} | {mem} | "
            f"{r['seconds']:.2f} | {r['time_vs_mtt']:.3f} | {sec} |"
        )
    lines += [
        "",
        "## Mixed precision (MTT, exact BPTT)",
        "",
        "| dtype | s/step | time/float32 | image hypergradient relative error |",
        "|---|---|---|---|",
    ]
    for k, r in doc["precision"].items():
        lines.append(
            f"| {k} | {r['seconds']:.2f} | {r['time_vs_float32']:.3f} | {r['relative_error']:.2e} |"
        )
    c = doc["compiled_inner_step"]
    lines += [
        "",
        "## The compiled inner step (SATM, `compile_inner=True`)",
        "",
        f"SATM step {c['eager_s']:.2f} s eager, {c['compiled_s']:.2f} s compiled: speed-up "
        f"{c['speed_up']:.2f}x.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny config (seconds)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.compile's own
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu)")
    started = time.time()
    cfg = QUICK if args.quick else FULL
    print(f"exactness on {device}", flush=True)
    exact = exactness(device)
    print(f"scale: {cfg}", flush=True)
    scaled = scale(cfg, device)
    print("precision", flush=True)
    prec = precision(cfg, device)
    print("compiled inner step", flush=True)
    compiled = compiled_step(cfg, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    doc = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "device": str(device),
            "device_name": name or platform.machine(),
            "quick": args.quick,
            "wall_s": round(time.time() - started, 1),
        },
        "config": {**cfg, "shape": list(cfg["shape"])},
        "paper": PAPER,
        "exactness": exact,
        "scale": scaled,
        "precision": prec,
        "compiled_inner_step": compiled,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.out_dir / f"gpu_check{suffix}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out_dir / f"gpu_check{suffix}.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
