"""Runs that would silently do nothing useful say so; resumes extend runs and name what differs;
files are written atomically and killed writers' temporaries are cleaned (issue 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _pipeline_fixtures import CLASSES, config, tiny_data, tiny_experts

from sharp_bilevel.cli import app as cli
from sharp_bilevel.distill.checkpoint import (
    load_checkpoint,
    load_synthetic,
    remove_stale_temporaries,
    save_synthetic,
)
from sharp_bilevel.distill.data import class_balanced_indices
from sharp_bilevel.distill.diagnostics import LR_FLOOR, DistillationWarning, RunDiagnostics
from sharp_bilevel.distill.pipeline import ResumeError, distill
from sharp_bilevel.distill.report import write_json
from sharp_bilevel.distill.validation import ConfigError
from sharp_bilevel.optim.errors import NonFiniteError

IGNORE_HEALTH = pytest.mark.filterwarnings(
    "ignore::sharp_bilevel.distill.diagnostics.DistillationWarning"
)


def run(**overrides: object):  # type: ignore[no-untyped-def]
    images, labels = tiny_data()
    checkpoint = overrides.pop("checkpoint", None)
    experts = overrides.pop("experts", None) or tiny_experts()
    return distill(config(**overrides), images, labels, CLASSES, experts, checkpoint=checkpoint)


def same_run(a, b) -> bool:  # type: ignore[no-untyped-def]
    return (
        torch.equal(a.images, b.images)
        and torch.equal(a.labels, b.labels)
        and a.syn_lr == b.syn_lr
        and json.dumps(a.history) == json.dumps(b.history)  # NaN-aware equality
    )


# ------------------------------------------------------------------ warnings with counts
def test_clamped_lr_is_reported_once_with_its_count() -> None:
    with pytest.warns(DistillationWarning) as caught:
        result = run(lr_lr=1.0, iterations=6)
    floor = float(torch.tensor(LR_FLOOR))  # syn_lr is float32
    at_floor = sum(v == floor for v in result.history["syn_lr"])
    assert at_floor >= 2
    assert result.diagnostics.lr_clamped == at_floor
    messages = [str(w.message) for w in caught]
    assert messages == [
        f"mtt-none: syn_lr was clamped at its floor 1e-08 after {at_floor} of 6 iterations: "
        "the learned inner lr collapsed (lower lr_lr, CLI --lr-lr)"
    ]


def test_a_gate_that_skips_most_steps_is_reported() -> None:
    with pytest.warns(DistillationWarning, match=r"gate skipped 5 of 5 steps") as caught:
        result = run(method="datm", threshold=1e-9, iterations=5)
    assert len(caught) == 1
    assert sum(result.history["skipped"]) == 5
    assert result.diagnostics.gate_skipped == 5


def test_exploding_images_are_reported() -> None:
    images, labels = tiny_data()
    order = class_balanced_indices(labels, 2, CLASSES, torch.Generator().manual_seed(0))
    initial = float(images[order].norm())
    with pytest.warns(DistillationWarning, match=r"images' norm grew to") as caught:
        result = run(lr_img=1e6, iterations=4)
    assert len(caught) == 1
    assert result.diagnostics.initial_image_norm == pytest.approx(initial, rel=1e-6)
    final_ratio = float(result.images.norm()) / initial
    assert result.diagnostics.max_image_norm_ratio >= final_ratio * (1 - 1e-6)
    assert final_ratio > 100


def test_a_healthy_run_says_nothing(recwarn: pytest.WarningsRecorder) -> None:
    result = run(iterations=3)
    assert result.diagnostics.problems() == []
    assert not [w for w in recwarn if issubclass(w.category, DistillationWarning)]


def test_diagnostics_thresholds() -> None:
    d = RunDiagnostics(initial_image_norm=2.0)
    for norm in (2.0, 150.0, 100.0):
        d.record(clamped=False, image_norm=norm, skipped={"gate": 1})
    assert d.max_image_norm_ratio == 75.0
    assert d.problems() == []  # 1 of 3 gated, ratio 75 <= 100
    d.record(clamped=True, image_norm=202.0, skipped={"gate": 3, "nonfinite": 1})
    kinds = [p.split()[0] for p in d.problems()]
    assert kinds == ["syn_lr", "DATM's", "1", "the"]


# ------------------------------------------------------------------ non-finite steps
@IGNORE_HEALTH
def test_diverging_run_checkpoints_then_continues_with_skip(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    with pytest.raises(NonFiniteError, match=r"outer iteration 3: .*--nonfinite skip"):
        run(lr_lr=1e3, iterations=6, checkpoint=path)
    assert load_checkpoint(path)["iteration"] == 3
    resumed = run(lr_lr=1e3, iterations=6, checkpoint=path, nonfinite="skip")
    fresh = run(lr_lr=1e3, iterations=6, nonfinite="skip")
    assert same_run(resumed, fresh)
    assert fresh.diagnostics.nonfinite_skipped == sum(fresh.history["skipped"]) > 0
    assert resumed.diagnostics == fresh.diagnostics


def test_cli_offers_nonfinite_skip() -> None:
    args = cli.build_parser().parse_args(["--nonfinite", "skip"])
    assert cli._config(args, "sam").nonfinite == "skip"


# ------------------------------------------------------------------ resuming
def test_raising_iterations_extends_a_finished_run_bit_identically(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    run(iterations=4, checkpoint=path, perturbation="satm")
    extended = run(iterations=6, checkpoint=path, perturbation="satm")
    straight = run(iterations=6, perturbation="satm")
    assert same_run(extended, straight)
    with pytest.raises(ConfigError, match="must be at least 6 to resume") as info:
        run(iterations=5, checkpoint=path, perturbation="satm")
    assert info.value.argument == "iterations"


def test_resume_names_every_differing_setting(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    run(iterations=2, checkpoint=path)
    with pytest.raises(ResumeError) as info:
        run(iterations=2, checkpoint=path, lr_img=5.0, syn_steps=2, checkpoint_every=1)
    assert info.value.changes == {"lr_img": (10.0, 5.0), "syn_steps": (3, 2)}
    assert "lr_img=10.0 (now 5.0), syn_steps=3 (now 2)" in str(info.value)


def test_resuming_with_another_thread_count_warns(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    run(iterations=2, checkpoint=path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)
    try:
        with pytest.warns(DistillationWarning, match="not bit-identical"):
            run(iterations=3, checkpoint=path)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ files
def test_stale_temporaries_are_removed_on_start(tmp_path: Path) -> None:
    run_dir = tmp_path / "mtt-none"
    run_dir.mkdir()
    stale = run_dir / ".checkpoint.pt.k3j_9x.tmp"
    other = run_dir / ".synthetic.pt.abc123.tmp"
    keep = run_dir / "notes.tmp"
    for p in (stale, other, keep):
        p.write_bytes(b"torn")
    run(iterations=1, checkpoint=run_dir / "checkpoint.pt")
    assert not stale.exists()
    assert other.exists()  # another file's temporary: not distill's to remove
    assert remove_stale_temporaries(tmp_path) == [other]
    assert keep.exists()


def _failing_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError("disk died")

    monkeypatch.setattr("sharp_bilevel.distill.checkpoint.os.fsync", fsync)


def test_synthetic_and_report_writes_are_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = torch.randn(3, 1, 2, 2)
    synthetic = save_synthetic(tmp_path / "synthetic.pt", images, torch.arange(3), 0.01)
    report = write_json({"accuracy": 0.5}, tmp_path / "report.json")
    _failing_fsync(monkeypatch)
    with pytest.raises(OSError, match="disk died"):
        save_synthetic(synthetic, images + 1, torch.arange(3), 0.02)
    with pytest.raises(OSError, match="disk died"):
        write_json({"accuracy": 0.9}, report)
    monkeypatch.undo()
    assert torch.equal(load_synthetic(synthetic)["images"], images)
    assert json.loads(report.read_text()) == {"accuracy": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "synthetic.pt"]
