"""The evidence benchmark (issue 13): its statistics against closed forms, and a smoke run of the
whole plan on digits: every table run is evaluated and measured, the lr picks are the
validation argmax, the report's intervals are the paired t-intervals, and a rerun resumes."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import evidence  # noqa: E402
import evidence_report  # noqa: E402
from evidence_stats import paired_interval, t_quantile  # noqa: E402

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
    train, val, _ = evidence.load(evidence.smoke_plan())
    everything = evidence.load_digits().train
    assert len(train) + len(val) == len(everything)
    for c in range(10):
        n = int((everything.labels == c).sum())
        assert int((val.labels == c).sum()) == round(n / 6)
    rows = {tuple(x.flatten().tolist()) for x in val.images}
    assert not any(tuple(x.flatten().tolist()) in rows for x in train.images[:200])


def test_smoke_run_is_complete_consistent_and_resumes(tmp_path: Path) -> None:
    plan = evidence.smoke_plan()
    out, cache = tmp_path / "out", tmp_path / "cache"
    evidence.run(plan, out, cache, workers=1, max_jobs=7)  # stopped part-way
    report = evidence.run(plan, out, cache, workers=1)
    assert report["executed"] > 0
    seed0 = plan.seeds[0]
    for ipc in plan.ipcs:
        # the picks are the validation argmax over the same grid for every tuned row
        for row in ("MTT", "SATM"):
            scores = {
                plan.lr_base * m: report["val"][
                    evidence.run_key(ipc, row, plan.lr_base * m, seed0)
                ]["accuracy"]["ConvNet"]["mean"]
                for m in plan.lr_grid
            }
            assert evidence_report.picks(report, ipc)[row]["pick"] == max(scores, key=scores.get)
        table = evidence.table_runs(report, ipc)
        shared = table[("MTT", "shared")]
        assert table[(evidence.MATCHED, "shared")] == pytest.approx(
            shared * plan.syn_steps / evidence.keep_steps(plan)
        )
        for (row, _kind), lr in table.items():
            for seed in plan.seeds:
                key = evidence.run_key(ipc, row, lr, seed)
                assert key in report["test"]
                assert key in report["flatness"]
                flat = report["flatness"][key]
                assert len(flat["losses"]) == len(plan.radii)
                assert all(len(r) == plan.directions for r in flat["losses"])
        shared_flat = report["flatness"][evidence.run_key(ipc, "MTT", shared, seed0)]
        assert "eigenvalue" in shared_flat
        assert "accuracy_perturbed" in shared_flat
        ratio = report["norm_ratio"][f"ipc{ipc}"]
        assert len(ratio["norm_ratio"]) == plan.ratio_windows
        assert all(r > 0 for r in ratio["norm_ratio"])
        assert all(-1 <= c <= 1 for c in ratio["cosine"])
    # the Markdown's interval for SATM vs MTT at IPC 1 is the paired t-interval of the JSON
    ipc = plan.ipcs[0]
    table = evidence.table_runs(report, ipc)

    def accs(row: str) -> list[float]:
        lr = table[(row, "shared")]
        return [
            report["test"][evidence.run_key(ipc, row, lr, s)]["accuracy"]["ConvNet"]["mean"]
            for s in plan.seeds
        ]

    p = paired_interval(accs("SATM"), accs("MTT"))
    text = (out / "evidence_digits.md").read_text()
    cell = f"{100 * p.mean:+.2f} [{100 * p.low:+.2f}, {100 * p.high:+.2f}]"
    assert cell in text
    assert (out / "evidence_digits.png").stat().st_size > 10_000
    # a rerun has nothing left to do and changes no result
    before = json.loads((out / "evidence_digits.json").read_text())
    again = evidence.run(plan, out, cache, workers=1)
    assert again["executed"] == 0
    for part in ("distill", "val", "test", "flatness", "reference", "norm_ratio"):
        assert again[part] == before[part]
