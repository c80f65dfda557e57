"""Markdown and plots of ``evidence.py``'s JSON (rewritten after every job, so partial runs read).

Per-seed accuracy = the mean over evaluation seeds; rows give mean ± std over distillation seeds
and the paired difference to MTT with its 95% t-interval (`benchmarks.common.stats`'s
`paired_interval`): a difference is marked **real** only when the interval excludes 0.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common.discussion import write_keeping_discussion
from benchmarks.common.stats import paired_interval

BASE = "MTT"
MATCHED = "TUH, lr x N/keep"
#: the script named in reports recorded before the benchmarks were grouped by study (a new
#: report records its own, so a regenerated old report reads exactly as before)
OLD_SCRIPT = "benchmarks/evidence.py"


def run_key(ipc: int, row: str, lr: float, seed: int) -> str:
    """The id of one distillation run (and of its results) in the report."""
    return f"ipc{ipc}/{row}/lr{lr:.6g}/seed{seed}"


def base_lr(plan: dict[str, Any], ipc: int) -> float:
    """The plan's ``lr_base`` at this IPC: one number for every IPC, or (ipc, lr) pairs."""
    base = plan["lr_base"]
    return float(base) if isinstance(base, (int, float)) else float(dict(base)[ipc])


def _scores(report: dict[str, Any], ipc: int, row: str, grid: list[float]) -> dict[float, float]:
    """{lr: validation accuracy} of ``row`` at the grid points scored so far."""
    seed = report["plan"]["seeds"][0]
    out: dict[float, float] = {}
    for lr in grid:
        entry = report["val"].get(run_key(ipc, row, lr, seed))
        if entry is not None:
            out[lr] = entry["accuracy"]["ConvNet"]["mean"]
    return out


def _best(scores: dict[float, float]) -> float:
    """The lr with the best score (ties: the smallest)."""
    return max(scores, key=lambda lr: (scores[lr], -lr))


def lr_grid(report: dict[str, Any], ipc: int) -> tuple[list[float], bool]:
    """The lr_img grid at this IPC and whether it is final.

    It starts at ``lr_base * lr_grid`` (ascending; `base_lr`). While the top of the grid is the best
    validation score of any tuned row, one more point (the top times the grid's last ratio) is
    added for EVERY tuned row, so that all rows keep the same budget: at most ``lr_extend``
    points. Likewise below the bottom (divided by the first ratio), at most ``lr_extend_down``
    points. The grid is final once every tuned row is scored on it and no extension is due.
    """
    plan = report["plan"]
    grid = [base_lr(plan, ipc) * m for m in plan["lr_grid"]]
    tuned = report.get("tuned_rows", [])
    up_left, down_left = plan.get("lr_extend", 0), plan.get("lr_extend_down", 0)
    while True:
        scores = [_scores(report, ipc, row, grid) for row in tuned]
        if any(len(s) < len(grid) for s in scores):
            return grid, False
        bests = {_best(s) for s in scores}
        up = up_left > 0 and grid[-1] in bests
        down = down_left > 0 and grid[0] in bests and len(grid) > 1
        if not (up or down):
            return grid, True
        if up:
            up_left -= 1
            grid.append(grid[-1] * (grid[-1] / grid[-2] if len(grid) > 1 else 3.0))
        if down:
            down_left -= 1
            grid.insert(0, grid[0] / (grid[1] / grid[0]))


def picks(report: dict[str, Any], ipc: int) -> dict[str, dict[str, Any]]:
    """{row: {"grid": {lr: validation accuracy}, "pick": lr | None}} for the tuned rows. The
    pick is the grid value (`lr_grid`) with the best accuracy at the first distillation seed
    (ties: the smallest lr), None until the grid is final."""
    grid, final = lr_grid(report, ipc)
    out: dict[str, dict[str, Any]] = {}
    for row in report.get("tuned_rows", []):
        scores = _scores(report, ipc, row, grid)
        if scores:
            out[row] = {"grid": scores, "pick": _best(scores) if final else None}
    return out


def table_runs(report: dict[str, Any], ipc: int) -> dict[tuple[str, str], float]:
    """{(row, "shared"|"tuned"): lr_img} for the rows whose lr is known: *shared* is MTT's pick
    (x N/keep for the matched TUH row), *tuned* each scored row's own pick."""
    plan = report["plan"]
    scored = picks(report, ipc)
    shared = scored.get(BASE, {}).get("pick")
    if shared is None:
        return {}
    out: dict[tuple[str, str], float] = {}
    ratio = plan["syn_steps"] / report["keep"]
    for row in plan["rows"]:
        out[(row, "shared")] = shared * ratio if row == MATCHED else shared
        if row in scored and scored[row]["pick"] is not None:
            out[(row, "tuned")] = scored[row]["pick"]
    return out


def listed_runs(report: dict[str, Any], ipc: int) -> list[tuple[str, str, float, float | None]]:
    """(kind, row, lr_img, MTT's lr_img of that kind) of every table row: the shared-lr rows,
    then the tuned rows whose pick differs (an equal pick is the same run, not repeated)."""
    table = table_runs(report, ipc)
    out = []
    for kind in ("shared", "tuned"):
        for row in report["plan"]["rows"]:
            lr = table.get((row, kind))
            if lr is not None and not (kind == "tuned" and lr == table.get((row, "shared"))):
                out.append((kind, row, lr, table.get((BASE, kind))))
    return out


def per_seed(report: dict[str, Any], ipc: int, row: str, lr: float, arch: str) -> dict[int, float]:
    out = {}
    for seed in report["plan"]["seeds"]:
        entry = report["test"].get(run_key(ipc, row, lr, seed))
        if entry is not None:
            out[seed] = entry["accuracy"][arch]["mean"]
    return out


def _ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def _ms_g(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g} ± {sd:.2g}"


def _diff(a: dict[int, float], b: dict[int, float], scale: float = 100.0, fmt: str = "+.2f") -> str:
    seeds = sorted(set(a) & set(b))
    p = paired_interval([a[s] for s in seeds], [b[s] for s in seeds])
    if p.n < 2:
        return "–"
    tag = " **real**" if p.called else ""
    m, lo, hi = (format(scale * v, fmt) for v in (p.mean, p.low, p.high))
    return f"{m} [{lo}, {hi}]{tag}"


def _reference(report: dict[str, Any], ipc: int, which: str, arch: str) -> list[float]:
    return [
        v[which][arch]["mean"] for k, v in report["reference"].items() if k.startswith(f"ipc{ipc}/")
    ]


def accuracy_lines(report: dict[str, Any], ipc: int) -> list[str]:
    plan = report["plan"]
    archs = plan["archs"]
    head = ["row", "lr_img", "seeds"]
    for a in archs:
        head += [f"{a} %", f"{a} Δ vs MTT [95% CI]"]
    head += ["image step", "image change"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for which, label in (("init", "init (real, iter 0)"), ("random", "random real")):
        cells = [label, "–", str(len(_reference(report, ipc, which, archs[0])))]
        for a in archs:
            cells += [_ms(_reference(report, ipc, which, a)), ""]
        lines.append("| " + " | ".join([*cells, "", ""]) + " |")
    for kind, row, lr, mtt_lr in listed_runs(report, ipc):
        runs = [report["distill"].get(run_key(ipc, row, lr, s)) for s in plan["seeds"]]
        runs = [r for r in runs if r is not None]
        cells = [f"{row} ({kind} lr)", f"{lr:.3g}", ""]
        n = 0
        for a in archs:
            mine = per_seed(report, ipc, row, lr, a)
            n = max(n, len(mine))
            base = per_seed(report, ipc, BASE, mtt_lr, a) if mtt_lr else {}
            cells += [_ms(list(mine.values())), "" if row == BASE else _diff(mine, base)]
        cells[2] = str(n)
        steps = [r["step_median"] for r in runs]
        change = [r["image_change"] for r in runs]
        cells += [
            f"{statistics.fmean(steps):.3g}" if steps else "–",
            f"{100 * statistics.fmean(change):.1f}%" if change else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _shared_entries(report: dict[str, Any], ipc: int, section: str) -> dict[str, dict]:
    """{row: {seed: entry}} of ``report[section]`` for the shared-lr runs (rows with none left
    out)."""
    plan = report["plan"]
    table = table_runs(report, ipc)
    out: dict[str, dict] = {}
    for row in plan["rows"]:
        lr = table.get((row, "shared"))
        if lr is None:
            continue
        found = report.get(section, {})
        entries = {s: found.get(run_key(ipc, row, lr, s)) for s in plan["seeds"]}
        if any(e is not None for e in entries.values()):
            out[row] = {s: e for s, e in entries.items() if e is not None}
    return out


def flatness_rows(report: dict[str, Any], ipc: int) -> dict[str, dict[str, Any]]:
    """Per shared-lr row: mean loss per radius and eigenvalues per seed."""
    out: dict[str, dict[str, Any]] = {}
    for row, entries in _shared_entries(report, ipc, "flatness").items():
        losses = [[statistics.fmean(r) for r in e["losses"]] for e in entries.values()]
        eig = {s: e["eigenvalue"] for s, e in entries.items() if "eigenvalue" in e}
        curve = [statistics.fmean(c) for c in zip(*losses, strict=True)]
        out[row] = {"curve": curve, "n": len(losses), "eig": eig}
    return out


def flatness_lines(report: dict[str, Any], ipc: int) -> list[str]:
    plan = report["plan"]
    rows = flatness_rows(report, ipc)
    radii = plan["radii"]
    head = ["row", "seeds"] + [f"L(r={r:g})" for r in radii] + ["λ_max", "Δλ vs MTT [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows.get(BASE, {}).get("eig", {})
    for row, v in rows.items():
        eig = v["eig"]
        cells = [row, str(v["n"])] + [f"{x:.4f}" for x in v["curve"]]
        cells.append(_ms_g(list(eig.values())) if eig else "–")
        cells.append("" if row == BASE or not eig else _diff(eig, base, 1.0, "+.3g"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def robustness_rows(report: dict[str, Any], ipc: int) -> dict[str, dict[str, Any]]:
    """Per shared-lr row: {"clean": {seed: acc}, "change": [{seed: mean over directions of
    acc(x + δ) − acc(x)} per radius], "spread": [its std over seeds x directions per radius]}."""
    out: dict[str, dict[str, Any]] = {}
    for row, entries in _shared_entries(report, ipc, "robustness").items():
        clean = {s: e["clean"] for s, e in entries.items()}
        moved = [{s: [a - e["clean"] for a in e["accuracy"][i]] for s, e in entries.items()}
                 for i in range(len(report["plan"]["acc_radii"]))]  # fmt: skip
        change = [{s: statistics.fmean(m) for s, m in per.items()} for per in moved]
        every = [[v for m in per.values() for v in m] for per in moved]
        spread = [statistics.stdev(e) if len(e) > 1 else 0.0 for e in every]
        out[row] = {"clean": clean, "change": change, "spread": spread}
    return out


def robustness_lines(report: dict[str, Any], ipc: int) -> list[str]:
    plan = report["plan"]
    rows = robustness_rows(report, ipc)
    radii = plan["acc_radii"]
    head = ["row", "seeds", "acc (r=0) %"] + [f"Δacc at r={r:g} (pts)" for r in radii]
    head.append(f"Δacc at r={radii[-1]:g} vs MTT's [95% CI]")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows.get(BASE)
    for row, v in rows.items():
        cells = [row, str(len(v["clean"])), _ms(list(v["clean"].values()))]
        for d, sd in zip(v["change"], v["spread"], strict=True):
            cells.append(f"{100 * statistics.fmean(d.values()):+.2f} ± {100 * sd:.2f}")
        last = "" if row == BASE or base is None else _diff(v["change"][-1], base["change"][-1])
        lines.append("| " + " | ".join([*cells, last]) + " |")
    return lines


def summary_lines(report: dict[str, Any], ipc: int) -> list[str]:
    """The docs page's table: ConvNet accuracy, the paired Δ to MTT on every arch, the loss rise
    and the accuracy change at the largest radii (shared-lr rows, then tuned rows that differ)."""
    plan = report["plan"]
    archs = plan["archs"]
    flat, robust = flatness_rows(report, ipc), robustness_rows(report, ipc)
    r_loss, r_acc = plan["radii"][-1], plan["acc_radii"][-1]
    head = ["row", "lr_img", f"{archs[0]} %"] + [f"Δ {a} [95% CI]" for a in archs]
    head += [f"loss rise r={r_loss:g}", f"Δacc r={r_acc:g} (pts)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, row, lr, mtt_lr in listed_runs(report, ipc):
        name = row if kind == "shared" else f"{row}, tuned"
        cells = [name, f"{lr:.3g}", _ms(list(per_seed(report, ipc, row, lr, archs[0]).values()))]
        for a in archs:
            mine = per_seed(report, ipc, row, lr, a)
            base = per_seed(report, ipc, BASE, mtt_lr, a) if mtt_lr else {}
            cells.append("" if row == BASE and kind == "shared" else _diff(mine, base))
        f, r = (flat.get(row), robust.get(row)) if kind == "shared" else (None, None)
        cells.append(f"{f['curve'][-1] - f['curve'][0]:.4f}" if f else "")
        cells.append(f"{100 * statistics.fmean(r['change'][-1].values()):+.2f}" if r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def budget_lines(report: dict[str, Any]) -> list[str]:
    """Where the time went: jobs and job-minutes per kind and IPC (flatness with and without
    λ_max apart), and the wall clock they took on the workers."""
    groups: dict[tuple[str, str], list[float]] = {}
    for job_id, seconds in report["jobs"].items():
        kind, _, rest = job_id.partition("/")
        ipc = rest.split("/", 1)[0] if rest.startswith("ipc") else ""
        kind = "validation" if kind == "val" else kind
        if kind == "flatness" and "eigenvalue" in report["flatness"].get(rest, {}):
            kind = "flatness + λ_max"
        groups.setdefault((kind, ipc.removeprefix("ipc")), []).append(seconds)
    total = sum(sum(v) for v in groups.values())
    lines = ["| job | IPC | jobs | job-min | share |", "|---|---|---|---|---|"]
    for (kind, ipc), times in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        share = 100 * sum(times) / total if total else 0.0
        lines.append(f"| {kind} | {ipc} | {len(times)} | {sum(times) / 60:.1f} | {share:.0f}% |")
    lines += [
        "",
        f"{total / 60:.0f} job-minutes in all; {report['wall_seconds'] / 60:.0f} min of wall clock"
        " (jobs run on two workers).",
    ]
    return lines


def _norms(report: dict[str, Any]) -> dict[int, float]:
    """Mean ||x_0|| of the initial images per IPC (from the distillation runs)."""
    out: dict[int, list[float]] = {}
    for entry in report["distill"].values():
        if "initial_norm" in entry:
            out.setdefault(entry["ipc"], []).append(entry["initial_norm"])
    return {ipc: statistics.fmean(v) for ipc, v in sorted(out.items())}


def validation_half_width(report: dict[str, Any]) -> tuple[float, float] | None:
    """(median validation accuracy p, the binomial 95% half-width ``1.96 sqrt(p (1 - p) / n)``)
    of one validation score on the ``n`` held-out images, or None without scores: grid points
    closer than this are within the noise of the pick."""
    scores = [v["accuracy"]["ConvNet"]["mean"] for v in report.get("val", {}).values()]
    n = report.get("data", {}).get("val")
    if not scores or not n:
        return None
    p = statistics.median(scores)
    return p, 1.96 * math.sqrt(p * (1.0 - p) / n)


def settings_lines(report: dict[str, Any]) -> list[str]:
    plan = report["plan"]
    data = report.get("data", {})
    ratio = plan["syn_steps"] / report["keep"]
    per_ipc = not isinstance(plan["lr_base"], (int, float))
    grid = "; ".join(
        (f"IPC {ipc}: " if per_ipc else "")
        + ", ".join(f"{base_lr(plan, ipc) * m:.3g}" for m in plan["lr_grid"])
        for ipc in (plan["ipcs"] if per_ipc else plan["ipcs"][:1])
    )
    up, down = plan.get("lr_extend", 0), plan.get("lr_extend_down", 0)
    extended = f"extended upwards for every tuned row by up to {up} point(s) while the top is "
    extended += "any row's best" + (
        f", downwards by up to {down} while the bottom is" if down else ""
    )
    return [
        f"* Data: {plan['dataset']} {'x'.join(map(str, data.get('shape', [])))}: "
        f"{data.get('train')} train (experts and initial images), {data.get('val')} validation "
        f"({100 * plan['val_fraction']:.0f}% of each class held out of the training images; "
        f"lr tuning only), {data.get('test')} test images.",
        f"* Experts: {plan['num_experts']} x ConvNet width {plan['width']}, SGD lr 0.01, "
        f"{plan['expert_epochs_trained']} epochs, DSA.",
        f"* Distillation: ConvNet width {plan['width']}, N = {plan['syn_steps']} inner steps, "
        f"M = {plan['expert_epochs']} expert epochs, start epoch < {plan['max_start_epoch']}, "
        f"{plan['iterations']} iterations, batch_syn {dict(plan['batch_syn'])}, DSA, "
        "lr_lr 1e-6; rules at their library defaults. TUH keeps "
        f"{report['keep']} of {plan['syn_steps']} steps (N/keep = {ratio:.3g}).",
        "* Radius: the SAM-family default rho = 0.05 is "
        + ", ".join(
            f"{100 * 0.05 / n:.2g}% of ||x_0|| at IPC {ipc} (||x_0|| ≈ {n:.0f})"
            for ipc, n in _norms(report).items()
        )
        + "; the `rho 2` rows use 40x that.",
        f"* lr_img grid: {grid}, scored at distillation seed "
        f"{plan['seeds'][0]} on the validation split (ConvNet, one evaluation seed), "
        f"{extended} (final grids: "
        + "; ".join(
            f"IPC {ipc}: " + ", ".join(f"{lr:.3g}" for lr in lr_grid(report, ipc)[0])
            for ipc in plan["ipcs"]
        )
        + "); *shared lr* = MTT's pick for every row, *tuned lr* = each row's own pick.",
        f"* Evaluation: distillation seeds {plan['seeds']} x evaluation seeds "
        f"{plan['eval_seeds']}, {plan['eval_epochs']} epochs, archs {plan['archs']}, at the "
        f"learned syn_lr (init and random real: lr 0.01, evaluation seeds "
        f"{tuple(plan['eval_seeds'][: plan.get('reference_eval_count')])}).",
        f"* Flatness: outer loss over {plan['windows']} frozen windows (the same for every set), "
        f"{plan['directions']} random directions per radius r (relative: ||δ|| = r ||x||); "
        f"λ_max after {plan['hessian_iterations']} power iterations (seeds "
        f"{plan['hessian_seeds']}); ConvNet test accuracy under perturbation (evaluation seed "
        f"{plan['eval_seeds'][0]}, radii {plan['acc_radii']}, the same {plan['directions']} "
        f"directions) at distillation seeds {plan['hessian_seeds']}.",
    ]


def write_markdown(report: dict[str, Any], path: Path) -> None:
    plan = report["plan"]
    lines = [
        f"# Evidence on real images: {plan['dataset']}",
        "",
        f"Generated by `{report.get('script', OLD_SCRIPT)}` ({report.get('variant', 'full')} plan, "
        f"{report['date']}); torch "
        f"{report['machine']['torch']}, {report['machine']['cpu_cores']} CPU cores; "
        f"{len(report['jobs'])} jobs, {report['wall_seconds'] / 60:.1f} min wall clock.",
        "",
        "## Settings",
        "",
        *settings_lines(report),
        "",
        "## Where the time goes",
        "",
        *budget_lines(report),
        "",
        "## Truncated vs exact image hypergradient (initial images, seed 0)",
        "",
        "| IPC | keep / N | norm ratio ‖g_TUH‖/‖g‖ (mean, per window) | cosine (mean) |",
        "|---|---|---|---|",
    ]
    for ipc in plan["ipcs"]:
        r = report["norm_ratio"].get(f"ipc{ipc}")
        if r is not None:
            per = ", ".join(f"{x:.2f}" for x in r["norm_ratio"])
            lines.append(
                f"| {ipc} | {r['keep']} / {r['syn_steps']} | {r['norm_ratio_mean']:.3f} ({per}) "
                f"| {r['cosine_mean']:.3f} |"
            )
    lines += ["", "## lr_img picks (validation accuracy % at each grid value)", ""]
    if (noise := validation_half_width(report)) is not None:
        p, half = noise
        lines += [
            f"One score is the accuracy on the {report['data']['val']} validation images: at "
            f"{100 * p:.1f}% its binomial 95% half-width is ±{100 * half:.1f} points, so grid "
            "points closer than that are within its noise.",
            "",
        ]
    for ipc in plan["ipcs"]:
        for row, v in picks(report, ipc).items():
            grid = ", ".join(f"{lr:g}: {100 * a:.1f}" for lr, a in v["grid"].items())
            pick = "–" if v["pick"] is None else f"{v['pick']:g}"
            lines.append(f"* IPC {ipc}, {row}: {grid} → **{pick}**")
    for ipc in plan["ipcs"]:
        lines += [
            "",
            f"## Test accuracy, IPC {ipc}",
            "",
            "Mean ± std over distillation seeds; Δ = paired difference to MTT at the same lr "
            "choice, 95% t-interval, **real** when it excludes 0. Tuned rows whose pick equals "
            "the shared lr are the same runs and are not repeated. `image step` = lr_img x "
            "median ‖∇_x L‖ per iteration; `image change` = ‖x_final − x_0‖/‖x_0‖.",
            "",
            *accuracy_lines(report, ipc),
            "",
            f"## Flatness, IPC {ipc} (shared lr)",
            "",
            "L(r) = outer loss at relative radius r, mean over directions and seeds; λ_max = "
            "dominant Hessian eigenvalue of the outer loss w.r.t. the images.",
            "",
            *flatness_lines(report, ipc),
            "",
            f"## Accuracy under perturbation, IPC {ipc} (shared lr)",
            "",
            "Δacc = ConvNet test accuracy of the set moved by r‖x‖ along a random direction minus "
            "that of the set itself (the same evaluation seed, so the change is paired): mean ± "
            "std over seeds x directions. The last column compares the per-seed change to MTT's "
            "(paired over distillation seeds); a flatter set loses less.",
            "",
            *robustness_lines(report, ipc),
        ]
    write_keeping_discussion(path, "\n".join(lines) + "\n")


def plot(report: dict[str, Any], path: Path) -> bool:
    """Accuracy bars (per arch and IPC) and loss-vs-radius curves; False if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = report["plan"]
    ipcs, archs = plan["ipcs"], plan["archs"]
    if not any(table_runs(report, ipc) for ipc in ipcs):
        return False
    fig, axes = plt.subplots(
        len(archs) + 2,
        len(ipcs),
        figsize=(8.0 * len(ipcs), 3.8 * (len(archs) + 2)),
        squeeze=False,
    )
    for j, ipc in enumerate(ipcs):
        table = table_runs(report, ipc)
        for i, arch in enumerate(archs):
            ax = axes[i][j]
            names = list(plan["rows"])
            for k, (kind, offset, hatch) in enumerate((("shared", -0.2, ""), ("tuned", 0.2, "//"))):
                xs, ms, ss = [], [], []
                for x, row in enumerate(names):
                    lr = table.get((row, kind))
                    vals = list(per_seed(report, ipc, row, lr, arch).values()) if lr else []
                    if vals:
                        xs.append(x + offset)
                        ms.append(100 * statistics.fmean(vals))
                        ss.append(100 * (statistics.stdev(vals) if len(vals) > 1 else 0.0))
                ax.bar(
                    xs,
                    ms,
                    0.4,
                    yerr=ss,
                    capsize=3,
                    hatch=hatch,
                    label=f"{kind} lr_img",
                    color=("tab:blue", "tab:orange")[k],
                    alpha=0.85,
                )
            for which, style in (("init", "--"), ("random", ":")):
                vals = _reference(report, ipc, which, arch)
                if vals:
                    ax.axhline(
                        100 * statistics.fmean(vals),
                        color="k",
                        ls=style,
                        lw=1,
                        label="init (real)" if which == "init" else "random real",
                    )
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"IPC {ipc}, evaluated on {arch}")
            ax.set_ylabel("test accuracy %")
            heights = [b.get_height() for b in ax.patches] + [
                100 * statistics.fmean(v)
                for v in (_reference(report, ipc, w, arch) for w in ("init", "random"))
                if v
            ]
            top = max(heights or [100.0])
            ax.set_ylim(
                max(0.0, min(heights or [0.0]) - 4),
                min(100.0, top + 0.35 * (top - min(heights or [0.0])) + 3),
            )
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper center", ncol=4)
        colors = plt.get_cmap("tab20")

        def style(k: int, colors: Any = colors) -> dict[str, Any]:
            return {"ls": "-" if k < 6 else ("--" if k < 10 else ":"), "marker": "os^"[k % 3],
                    "ms": 3, "color": colors(2 * k % 20 + k // 10)}  # fmt: skip

        names = list(plan["rows"])
        ax = axes[len(archs)][j]
        for row, v in flatness_rows(report, ipc).items():
            rise = [c - v["curve"][0] for c in v["curve"]]
            ax.plot(plan["radii"], rise, label=row, **style(names.index(row)))
        ax.set_xlabel("relative radius r of the random image perturbation (||δ|| = r ||x||)")
        ax.set_ylabel("L(x + δ) − L(x)")
        ax.set_title(f"IPC {ipc}: outer-loss rise under random perturbation (shared lr)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax = axes[len(archs) + 1][j]
        robust = robustness_rows(report, ipc)
        for row, v in robust.items():
            k = names.index(row)
            moved = [0.0] + [100 * statistics.fmean(d.values()) for d in v["change"]]
            ax.plot([0.0, *plan["acc_radii"]], moved, label=row, **style(k))
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xlabel("relative radius r of the random image perturbation (||δ|| = r ||x||)")
        ax.set_ylabel("acc(x + δ) − acc(x) (points)")
        ax.set_title(f"IPC {ipc}: ConvNet test accuracy change, same perturbations and colours")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out: Path, name: str, plot_too: bool = True) -> None:
    """``name.md`` (always) and ``name.png`` (with ``plot_too``) in ``out``."""
    write_markdown(report, out / f"{name}.md")
    if plot_too:
        plot(report, out / f"{name}.png")
