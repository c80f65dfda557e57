"""``benchmarks/gpu_check/gpu_check.py --device cpu --quick`` runs end to end, so the GPU check
cannot rot before a GPU is lent (issue 11)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_and_writes_its_report(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "gpu_check" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--quick", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check_quick.json").read_text())
    assert set(doc["exactness"]) == {"mtt", "sam", "satm"}
    for row in doc["exactness"].values():  # CPU against CPU: the same computation
        assert row == {"images": 0.0, "syn_lr": 0.0}
    scale = doc["scale"]
    assert set(scale) == {"mtt", "sam", "satm", "tesla", "checkpointed"}
    assert scale["mtt"]["memory_vs_mtt"] == 1.0
    assert scale["satm"]["memory_vs_mtt"] < 1.0  # TUH keeps fewer steps' activations
    assert scale["tesla"]["memory_vs_mtt"] < 1.0
    assert 0 < doc["precision"]["bfloat16"]["relative_error"] < 1.0
    assert doc["compiled_inner_step"]["speed_up"] > 0
    text = (tmp_path / "gpu_check_quick.md").read_text()
    assert "17.1" in text  # the paper's figures stand beside ours
    assert "| satm |" in text
