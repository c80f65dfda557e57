"""The evidence benchmark (issue 13): its statistics against closed forms, and a smoke run of the
whole plan on digits: every table run is evaluated and measured, the lr picks are the
validation argmax, the report's intervals are the paired t-intervals, and a rerun resumes."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common.stats import paired_interval, t_quantile  # noqa: E402
from benchmarks.evidence import jobs, runner  # noqa: E402
from benchmarks.evidence import plan as plans  # noqa: E402
from benchmarks.evidence import report as evidence_report  # noqa: E402
from benchmarks.evidence.report import MATCHED, run_key, table_runs  # noqa: E402
from sharp_bilevel.distill.data import load_digits  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::sharp_bilevel.distill.diagnostics.DistillationWarning"
)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.1, 0.025])
def test_t_quantile_closed_forms(p: float) -> None:
    # df = 1 is Cauchy, df = 2 has t = (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    # large df: the normal quantile (statistics.NormalDist, an independent implementation)
    z = statistics.NormalDist().inv_cdf(p)
    assert t_quantile(p, 20000) == pytest.approx(z, rel=2e-4)


def test_paired_interval_by_hand() -> None:
    a, b = [0.71, 0.74, 0.69], [0.70, 0.70, 0.70]
    d = [x - y for x, y in zip(a, b, strict=True)]
    q = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975, 2}
    half = q * statistics.stdev(d) / math.sqrt(3)
    got = paired_interval(a, b)
    assert got.n == 3
    assert got.mean == pytest.approx(statistics.fmean(d), abs=1e-15)
    assert (got.low, got.high) == pytest.approx((got.mean - half, got.mean + half), rel=1e-9)
    assert not got.called  # the interval [-0.033, 0.060] contains 0
    assert paired_interval([1.0, 1.1, 1.2], [0.0, 0.05, 0.1]).called
    assert not paired_interval([1.0], [0.0]).called
    with pytest.raises(ValueError, match="equal lengths"):
        paired_interval([1.0], [1.0, 2.0])


def test_validation_split_is_stratified_and_disjoint() -> None:
    train, val, _ = jobs.load(plans.smoke_plan())
    everything = load_digits().train
    assert len(train) + len(val) == len(everything)
    for c in range(10):
        n = int((everything.labels == c).sum())
        assert int((val.labels == c).sum()) == round(n / 6)
    rows = {tuple(x.flatten().tolist()) for x in val.images}
    assert not any(tuple(x.flatten().tolist()) in rows for x in train.images[:200])


def test_smoke_run_is_complete_consistent_and_resumes(tmp_path: Path) -> None:
    plan = plans.smoke_plan()
    out, cache = tmp_path / "out", tmp_path / "cache"
    runner.run(plan, out, cache, workers=1, max_jobs=7)  # stopped part-way
    report = runner.run(plan, out, cache, workers=1)
    assert report["executed"] > 0
    seed0 = plan.seeds[0]
    for ipc in plan.ipcs:
        # the grid grows by a point (x3) for every tuned row while some row's best is its top;
        # the picks are then the validation argmax over that same grid
        def scores(row: str, grid: list[float], ipc: int = ipc) -> dict[float, float]:
            return {
                lr: report["val"][run_key(ipc, row, lr, seed0)]["accuracy"]["ConvNet"]["mean"]
                for lr in grid
            }

        grid = [plan.lr_for(ipc) * m for m in plan.lr_grid]
        tuned = [row for row in plan.rows if plans.is_tuned(row)]
        up, down = plan.lr_extend, plan.lr_extend_down
        while True:
            bests = {max(grid, key=scores(row, grid).get) for row in tuned}
            grow_up, grow_down = up > 0 and grid[-1] in bests, down > 0 and grid[0] in bests
            if not (grow_up or grow_down):
                break
            if grow_up:
                up, grid = up - 1, [*grid, grid[-1] * 3]
            if grow_down:
                down, grid = down - 1, [grid[0] / 3, *grid]
        assert evidence_report.lr_grid(report, ipc) == (grid, True)
        for row in tuned:
            s = scores(row, grid)
            assert evidence_report.picks(report, ipc)[row]["pick"] == max(s, key=s.get)
        table = table_runs(report, ipc)
        shared = table[("MTT", "shared")]
        assert table[(MATCHED, "shared")] == pytest.approx(
            shared * plan.syn_steps / plans.keep_steps(plan)
        )
        for (row, _kind), lr in table.items():
            for seed in plan.seeds:
                key = run_key(ipc, row, lr, seed)
                assert key in report["test"]
                assert key in report["flatness"]
                flat = report["flatness"][key]
                assert len(flat["losses"]) == len(plan.radii)
                assert all(len(r) == plan.directions for r in flat["losses"])
        shared_flat = report["flatness"][run_key(ipc, "MTT", shared, seed0)]
        assert "eigenvalue" in shared_flat
        # accuracy under perturbation: every shared run at the probe seeds, every radius and
        # direction; its unperturbed accuracy is the test job's at the same evaluation seed
        probes = {
            run_key(ipc, row, lr, seed)
            for (row, kind), lr in table.items()
            for seed in plan.hessian_seeds
            if kind == "shared"
        }
        for (row, _kind), lr in table.items():
            for seed in plan.seeds:
                key = run_key(ipc, row, lr, seed)
                assert (key in report["robustness"]) == (key in probes)
                if key in probes:
                    entry = report["robustness"][key]
                    assert len(entry["accuracy"]) == len(plan.acc_radii)
                    assert all(len(a) == plan.directions for a in entry["accuracy"])
                    test_acc = report["test"][key]["accuracy"]["ConvNet"]["accuracies"][0]
                    assert entry["clean"] == test_acc
        # ... and the pairing holds: the probe at radius 0 retrains exactly as the test job did
        key = run_key(ipc, "MTT", shared, seed0)
        zero = dataclasses.replace(plan, acc_radii=(0.0,))
        again = jobs.job_robustness(zero, cache, key, clean=-1.0)["accuracy"][0]
        assert (
            again == [report["test"][key]["accuracy"]["ConvNet"]["accuracies"][0]] * plan.directions
        )
        ratio = report["norm_ratio"][f"ipc{ipc}"]
        assert len(ratio["norm_ratio"]) == plan.ratio_windows
        assert all(r > 0 for r in ratio["norm_ratio"])
        assert all(-1 <= c <= 1 for c in ratio["cosine"])
    # the Markdown's interval for SATM vs MTT at IPC 1 is the paired t-interval of the JSON
    ipc = plan.ipcs[0]
    table = table_runs(report, ipc)

    def accs(row: str) -> list[float]:
        lr = table[(row, "shared")]
        return [
            report["test"][run_key(ipc, row, lr, s)]["accuracy"]["ConvNet"]["mean"]
            for s in plan.seeds
        ]

    p = paired_interval(accs("SATM"), accs("MTT"))
    text = (out / "evidence_digits.md").read_text()
    cell = f"{100 * p.mean:+.2f} [{100 * p.low:+.2f}, {100 * p.high:+.2f}]"
    assert cell in text

    # ... and the perturbation table's last column is the paired interval of the per-seed
    # accuracy changes
    def changes(row: str) -> list[float]:
        lr = table[(row, "shared")]
        entries = [report["robustness"][run_key(ipc, row, lr, s)] for s in (0, 1)]
        return [statistics.fmean(a - e["clean"] for a in e["accuracy"][-1]) for e in entries]

    p = paired_interval(changes("SATM"), changes("MTT"))
    assert f"{100 * p.mean:+.2f} [{100 * p.low:+.2f}, {100 * p.high:+.2f}]" in text
    assert (out / "evidence_digits.png").stat().st_size > 10_000
    # a rerun has nothing left to do and changes no result
    before = json.loads((out / "evidence_digits.json").read_text())
    again = runner.run(plan, out, cache, workers=1)
    assert again["executed"] == 0
    for part in ("distill", "val", "test", "flatness", "robustness", "reference", "norm_ratio"):
        assert again[part] == before[part]


def _report(scores: dict[str, dict[float, float]], extend: int, down: int = 0) -> dict:
    plan = {
        "lr_base": 10.0,
        "lr_grid": [1.0, 3.0],
        "seeds": [0],
        "lr_extend": extend,
        "lr_extend_down": down,
    }
    val = {
        run_key(1, row, lr, 0): {"accuracy": {"ConvNet": {"mean": acc}}}
        for row, grid in scores.items()
        for lr, acc in grid.items()
    }
    return {"plan": plan, "val": val, "tuned_rows": list(scores)}


def test_each_ipc_may_centre_its_own_grid() -> None:
    scores = {"MTT": {3.0: 0.5, 9.0: 0.6, 27.0: 0.55}}
    report = _report(scores, 1)
    report["plan"]["lr_base"] = [[1, 3.0], [10, 90.0]]  # the val scores are at IPC 1
    report["plan"]["lr_grid"] = [1.0, 3.0, 9.0]
    assert evidence_report.base_lr(report["plan"], 10) == 90.0
    assert evidence_report.lr_grid(report, 1) == ([3.0, 9.0, 27.0], True)
    assert evidence_report.lr_grid(report, 10) == ([90.0, 270.0, 810.0], False)  # not scored
    assert plans.full_plan("fashion", None).lr_for(10) == 30.0


def test_references_use_the_first_evaluation_seeds() -> None:
    plan = dataclasses.replace(plans.smoke_plan(), eval_seeds=(4, 5, 6), reference_eval_count=None)
    assert plan.reference_seeds() == (4, 5, 6)  # None: every evaluation seed
    assert dataclasses.replace(plan, reference_eval_count=1).reference_seeds() == (4,)
    assert dataclasses.replace(plan, reference_eval_count=2).reference_seeds() == (4, 5)


def test_lr_grid_grows_for_every_row_while_a_row_peaks_at_its_top() -> None:
    # MTT peaks at the top (30), SATM inside: both rows get 90, the grid is not final until
    # both are scored there
    half = {"MTT": {10.0: 0.5, 30.0: 0.6}, "SATM": {10.0: 0.6, 30.0: 0.5}}
    assert evidence_report.lr_grid(_report(half, 1), 1) == ([10.0, 30.0, 90.0], False)
    assert evidence_report.picks(_report(half, 1), 1)["MTT"]["pick"] is None
    assert evidence_report.lr_grid(_report(half, 0), 1) == ([10.0, 30.0], True)
    full = {"MTT": {**half["MTT"], 90.0: 0.55}, "SATM": {**half["SATM"], 90.0: 0.7}}
    assert evidence_report.lr_grid(_report(full, 1), 1) == ([10.0, 30.0, 90.0], True)
    picks = evidence_report.picks(_report(full, 1), 1)
    assert (picks["MTT"]["pick"], picks["SATM"]["pick"]) == (30.0, 90.0)
    # a second extension would be due (SATM peaks at 90) but lr_extend = 1 caps it; with 2 it
    # asks for 270
    assert evidence_report.lr_grid(_report(full, 2), 1) == ([10.0, 30.0, 90.0, 270.0], False)
    # ties go to the smaller lr, so a flat top does not extend
    flat = {"MTT": {10.0: 0.6, 30.0: 0.6}}
    assert evidence_report.lr_grid(_report(flat, 1), 1) == ([10.0, 30.0], True)
    # nothing scored yet: the base grid, not final
    assert evidence_report.lr_grid(_report({"MTT": {}}, 1), 1) == ([10.0, 30.0], False)


def test_lr_grid_grows_downwards_too_and_both_ways_at_once() -> None:
    low = {"MTT": {10.0: 0.6, 30.0: 0.5}}  # the bottom wins
    assert evidence_report.lr_grid(_report(low, 1), 1) == ([10.0, 30.0], True)  # no room below
    assert evidence_report.lr_grid(_report(low, 1, 1), 1) == ([10 / 3, 10.0, 30.0], False)
    scored = {"MTT": {10 / 3: 0.55, **low["MTT"]}}
    grid, final = evidence_report.lr_grid(_report(scored, 1, 1), 1)
    assert (grid, final) == ([10 / 3, 10.0, 30.0], True)
    assert evidence_report.picks(_report(scored, 1, 1), 1)["MTT"]["pick"] == 10.0
    # one row peaks at each end: both ends grow in the same round
    split = {"MTT": {10.0: 0.6, 30.0: 0.5}, "SATM": {10.0: 0.5, 30.0: 0.6}}
    assert evidence_report.lr_grid(_report(split, 1, 1), 1) == ([10 / 3, 10.0, 30.0, 90.0], False)


def test_only_additive_plan_changes_resume() -> None:
    plan = dataclasses.asdict(plans.smoke_plan())
    older = {k: v for k, v in plan.items() if k != "lr_extend"}  # written before the field
    assert runner.resumable(older, plan)
    assert runner.resumable({**plan, "lr_extend": 0}, plan)
    assert runner.resumable({**plan, "lr_extend_down": 1}, plan)
    assert not runner.resumable({**plan, "iterations": plan["iterations"] + 1}, plan)
    assert not runner.resumable(None, plan)


@pytest.mark.parametrize("name", ["evidence", "evidence_mnist"])
def test_the_docs_page_tables_are_the_recorded_results(name: str) -> None:
    """docs/evidence.md's tables are `summary_lines` of the committed Fashion-MNIST and MNIST
    runs: a rerun that changes a number fails here until the page is brought up to date."""
    report = json.loads((ROOT / "benchmarks" / "evidence" / "results" / f"{name}.json").read_text())
    assert report["variant"] == "full"
    page = (ROOT / "docs" / "evidence.md").read_text()
    for ipc in report["plan"]["ipcs"]:
        lines = evidence_report.summary_lines(report, ipc)
        assert len(lines) > 2 + len(report["plan"]["rows"]) - 1
        table = "\n".join(lines)
        assert table in page, f"{name}, IPC {ipc}: the docs table is not the recorded one"
    if name == "evidence":  # ... and so is the budget
        assert "\n".join(evidence_report.budget_lines(report)) in page
    # ... and its figure is the run's
    figure = (ROOT / "docs" / "assets" / f"{name}.png").read_bytes()
    assert figure == (ROOT / "benchmarks" / "evidence" / "results" / f"{name}.png").read_bytes()


def test_budget_lines_add_up_the_job_times_per_kind() -> None:
    report = {
        "jobs": {
            "expert/0": 120.0,
            "distill/ipc1/MTT/lr1/seed0": 60.0,
            "flatness/ipc1/a": 30.0,
            "flatness/ipc1/b": 90.0,
        },
        "flatness": {"ipc1/a": {}, "ipc1/b": {"eigenvalue": 1.0}},
        "wall_seconds": 180.0,
    }
    lines = evidence_report.budget_lines(report)
    assert lines[2] == "| expert |  | 1 | 2.0 | 40% |"  # the largest first
    assert "| flatness + λ_max | 1 | 1 | 1.5 | 30% |" in lines
    assert "| flatness | 1 | 1 | 0.5 | 10% |" in lines
    assert "| distill | 1 | 1 | 1.0 | 20% |" in lines
    assert lines[-1].startswith("5 job-minutes in all; 3 min of wall clock")


def test_validation_half_width_is_the_binomial_interval_of_one_score() -> None:
    scores = [0.6, 0.7, 0.8]
    report = {
        "val": {str(i): {"accuracy": {"ConvNet": {"mean": a}}} for i, a in enumerate(scores)},
        "data": {"val": 1000},
    }
    p, half = evidence_report.validation_half_width(report)
    assert p == 0.7
    assert math.isclose(half, 1.96 * math.sqrt(0.7 * 0.3 / 1000))  # about 2.8 points
    assert evidence_report.validation_half_width({"val": {}, "data": {"val": 10}}) is None
