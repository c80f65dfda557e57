"""What one small run leaves behind (issue 21, points 12 and 13): ``report.json`` records the
settings that ran (a preset's values, not the flags it overrode), the library version and a UTC
time; every file takes the user's umask; a rerun that cannot resume the folder exits with
``SystemExit(2)`` and one line that says how to get a new run, with no traceback of ours, in
one process and under ``torchrun``."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import sharp_bilevel
from sharp_bilevel.cli import app as cli
from sharp_bilevel.distill.checkpoint import atomic_write_text
from sharp_bilevel.distill.pipeline import DistillConfig

ARGS = [
    "--iterations", "2", "--num-experts", "1", "--train-epochs", "2", "--max-start-epoch", "1",
    "--expert-epochs", "1", "--syn-steps", "3", "--width", "4", "--eval-epochs", "1",
    "--eval-seeds", "0", "--eval-models", "ConvNet", "--quiet",
]  # fmt: skip
UMASK = 0o027  # group may read, others nothing: neither the default 0o022 nor mkstemp's 0600
PACKAGE = Path(sharp_bilevel.__file__).resolve().parent


@dataclasses.dataclass
class Run:
    out: Path
    report: dict  # type: ignore[type-arg]
    began: datetime.datetime
    ended: datetime.datetime
    chart_titles: dict[str, object]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("cli") / "run"
    began = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    titles: dict[str, object] = {}

    def recording(name: str, chart: Callable[..., Path]) -> Callable[..., Path]:
        def draw(*args: object, **kwargs: object) -> Path:
            titles[name] = kwargs.get("title")
            return chart(*args, **kwargs)

        return draw

    previous = os.umask(UMASK)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OMP_NUM_THREADS", "1")  # the thread-choice test reads this reason
            for name in ("save_curves", "save_accuracy_chart"):
                mp.setattr(cli, name, recording(name, getattr(cli, name)))
            assert cli.main([*ARGS, "--out", str(out)]) == 0
    finally:
        os.umask(previous)
    ended = datetime.datetime.now(datetime.UTC)
    return Run(out, json.loads((out / "report.json").read_text()), began, ended, titles)


def test_the_charts_name_the_data_set_and_the_ipc(run: Run) -> None:
    """accuracy.png and curves.png say what was distilled (issue 21, point 14)."""
    ipc, dataset = run.report["settings"]["ipc"], run.report["settings"]["dataset"]
    expected = f"{dataset}, IPC {ipc}"
    assert run.chart_titles == {"save_curves": expected, "save_accuracy_chart": expected}


def test_report_records_version_and_utc_time(run: Run) -> None:
    assert run.report["sharp_bilevel"] == sharp_bilevel.__version__
    written = datetime.datetime.fromisoformat(run.report["written_utc"])
    assert written.utcoffset() == datetime.timedelta(0)
    assert run.began <= written <= run.ended


def test_report_config_is_what_ran_with_the_preset_noted(run: Run) -> None:
    satm = run.report["runs"]["mtt-satm"]
    config, resolved = satm["config"], satm["resolved"]
    assert (config["reuse"], config["lr_gradient"], config["smooth"]) == (True, "first_order", 0.01)
    assert config["keep"] == pytest.approx(1 / 3)
    assert satm["preset"]["name"] == "satm"
    assert set(satm["preset"]["fields"]) == {"keep", "reuse", "lr_gradient", "smooth"}
    # one truth: the recorded settings, run as a plain rule, resolve to the same unroll
    plain = DistillConfig(**{**config, "perturbation": "ssam"}).resolved()
    for key in ("keep_steps", "iota", "tau", "lr_gradient", "hypergradient", "smooth"):
        assert plain[key] == resolved[key], key
    none = run.report["runs"]["mtt-none"]
    assert none["preset"] is None
    assert (none["config"]["reuse"], none["config"]["lr_gradient"]) == (False, "exact")


def test_report_says_which_thread_count_and_why(run: Run) -> None:
    choice = run.report["thread_choice"]
    assert choice["threads"] == run.report["threads"] >= 1
    assert choice["reason"] == "OMP_NUM_THREADS=1 in the environment"  # the fixture sets it


def test_every_file_takes_the_umask(run: Run) -> None:
    files = [p for p in run.out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"report.json", "checkpoint.pt", "synthetic.pt", "images.png", "manifest.json"} <= names
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~UMASK, path


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_take_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = atomic_write_text("{}", tmp_path / "report.json")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def _refusal(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_rerun_that_cannot_resume_says_how_to_start_a_new_one(
    run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    # fewer iterations than the checkpoint holds (docs/distributed.md after the README job)
    line = _refusal(capsys, [*ARGS, "--out", str(run.out), "--iterations", "1"])
    assert line.startswith("python -m sharp_bilevel: error: argument --iterations: must be at")
    assert "for a new run pass another --out (or --no-resume to start this folder over)" in line
    # other settings than the checkpoint's
    line = _refusal(capsys, [*ARGS, "--out", str(run.out), "--lr-img", "5"])
    assert "cannot resume" in line
    assert "--lr-img 10.0 (now 5.0)" in line
    assert "for a new run pass another --out (or --no-resume" in line


def _torchrun(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*launcher, "--nproc_per_node=2", "-m", "sharp_bilevel", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _no_traceback_of_ours(err: str) -> None:
    """torchrun prints its own ChildFailedError traceback; none of our frames may appear."""
    assert f'File "{PACKAGE}' not in err, err
    assert "sharp_bilevel/" not in "".join(x for x in err.splitlines() if 'File "' in x), err


def test_user_errors_under_torchrun_print_one_line_and_no_traceback_of_ours(
    run: Run, tmp_path: Path
) -> None:
    done = _torchrun([*ARGS, "--out", str(run.out), "--iterations", "1"], tmp_path)
    assert done.returncode != 0
    _no_traceback_of_ours(done.stderr)
    assert done.stderr.count("error: argument --iterations: must be at least 2") == 1
    assert "another --out" in done.stderr
    # used to train the experts, then die in the pipeline with our traceback
    out = tmp_path / "fixed"
    done = _torchrun([*ARGS, "--fixed-fraction", "0.5", "--ipc", "2", "--out", str(out)], tmp_path)
    assert done.returncode != 0
    _no_traceback_of_ours(done.stderr)
    assert done.stderr.count("argument --fixed-fraction: cannot be sharded over 2") == 1
    assert not (out / "experts").exists()
