"""README's two set-up commands stay true, and CI runs exactly the test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None, "README.md must open with a bash block of the two commands"
    assert text.index("```bash") < 40, "the commands must be README's first lines"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_main_job_and_test_commands() -> None:
    main_job, tests = _readme_commands()
    assert main_job.endswith("python -m sharp_bilevel")
    assert "pytest" in tests
    for command in (main_job, tests):
        assert command.startswith("pip install torch==2.13.0 "), (
            "torch must be pinned to the CPU wheel"
        )


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _, tests = _readme_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_adapters_ship_as_a_subpackage_only(tmp_path: Path) -> None:
    # Outside the checkout (no cwd on sys.path): only the installed mapping is visible.
    probe = (
        "import importlib.util, sharp_bilevel.adapters as a;"
        "print(a.__file__); print(importlib.util.find_spec('adapters'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert Path(out[0]).parent == ROOT / "adapters"
    assert out[1] == "None", "the repository's adapters/ must not be importable as `adapters`"


def test_readme_python_blocks_run_with_warnings_as_errors(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks, "README.md shows the optimizer in a python block"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", "\n\n".join(blocks)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
