"""The benchmarks grouped by study (issue 21, "The house"): one folder per study with its scripts,
its results and a README; every path the docs and READMEs give exists; every script starts from
the repository root with the command its README gives; regenerating a recorded report from its
JSON reproduces the committed bytes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
STUDIES = ("step_cost", "scaling", "evidence", "gpu_check")
#: the scripts a README gives a command for (run as files from the repository root)
SCRIPTS = (
    "step_cost/trajectory_cost.py",
    "step_cost/inner_step.py",
    "step_cost/tesla_gap.py",
    "scaling/scaling.py",
    "scaling/gpu_scaling.py",
    "evidence/evidence.py",
    "evidence/accuracy.py",
    "gpu_check/gpu_check.py",
)
PATH = re.compile(r"benchmarks/[\w./{},-]*\w")

sys.path.insert(0, str(ROOT))


def test_one_folder_per_study_with_its_readme_and_results() -> None:
    top = {p.name for p in BENCH.iterdir() if p.name != "__pycache__"}
    assert top == {*STUDIES, "common", "README.md", "__init__.py", "plot_results.py"}
    index = (BENCH / "README.md").read_text()
    for study in STUDIES:
        readme = (BENCH / study / "README.md").read_text()
        assert f"({study}/README.md)" in index
        for script in (BENCH / study).glob("*.py"):
            if script.name != "__init__.py":
                assert script.name in readme, f"{study}/README.md does not name {script.name}"
        results = BENCH / study / "results"
        for result in results.glob("*.*") if results.is_dir() else ():
            assert f"results/{result.stem}." in readme, f"{study}/README.md lacks {result.name}"
    assert sorted(p.name for p in (BENCH / "common").glob("*.py")) == [
        "__init__.py",
        "discussion.py",
        "memory.py",
        "stats.py",
        "timing.py",
    ]


def _paths(text: str) -> list[str]:
    """``benchmarks/...`` paths in ``text``, brace alternatives expanded (``x.{json,md}``)."""
    out = []
    for path in PATH.findall(text):
        if (braces := re.search(r"\{([^}]*)\}", path)) is None:
            out.append(path)
        else:
            out += [path.replace(braces.group(0), alt) for alt in braces.group(1).split(",")]
    return out


def test_every_benchmark_path_in_the_docs_exists() -> None:
    """README, the docs pages (the changelog records history), the benchmarks' READMEs and the
    library's docstrings name only paths that exist (the not yet recorded GPU results aside)."""
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *BENCH.rglob("README.md")]
    files += list((ROOT / "sharp_bilevel").rglob("*.py"))
    missing = []
    for file in files:
        if file.name == "changelog.md":
            continue
        for path in _paths(file.read_text()):
            if "gpu_check.json" in path or "gpu_check.md" in path or "gpu_scaling." in path:
                continue  # written by the GPU runs, not recorded yet
            if not (ROOT / path).exists():
                missing.append(f"{file.relative_to(ROOT)}: {path}")
    assert not missing


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_starts_from_the_repository_root(script: str) -> None:
    readme = (BENCH / script.split("/")[0] / "README.md").read_text()
    assert f"python benchmarks/{script}" in readme  # the README's command
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.lstrip().startswith("usage:") or "usage:" in done.stdout


@pytest.mark.parametrize("name", ["evidence", "evidence_mnist"])
def test_regenerated_evidence_reports_are_the_recorded_bytes(name: str, tmp_path: Path) -> None:
    from benchmarks.evidence.report import write_report

    results = BENCH / "evidence" / "results"
    write_report(json.loads((results / f"{name}.json").read_text()), tmp_path, name)
    for suffix in (".md", ".png"):
        recorded = (results / f"{name}{suffix}").read_bytes()
        assert (tmp_path / f"{name}{suffix}").read_bytes() == recorded, suffix


def test_regenerated_accuracy_report_is_the_recorded_one(tmp_path: Path) -> None:
    """Byte for byte except the experts' folder, shown relative to the checkout that ran it. As
    ``--markdown-only`` does, it rewrites a copy of the file (its hand-written discussion stays)."""
    from benchmarks.evidence.accuracy import write_markdown

    results = BENCH / "evidence" / "results"
    (tmp_path / "a.md").write_bytes((results / "accuracy.md").read_bytes())
    (tmp_path / "a.md").write_text("# stale\n" + (tmp_path / "a.md").read_text().split("\n", 1)[1])
    write_markdown(json.loads((results / "accuracy.json").read_text()), tmp_path / "a.md")
    got = (tmp_path / "a.md").read_text().splitlines()
    recorded = (results / "accuracy.md").read_text().splitlines()
    assert len(got) == len(recorded)
    differ = [i for i, (a, b) in enumerate(zip(got, recorded, strict=True)) if a != b]
    assert all(recorded[i].startswith("* Experts:") for i in differ)
