"""``torchrun --nproc_per_node=2 -m sharp_bilevel ...`` (gloo on CPU) writes the images a
single-process run of the same command writes, to float32 summation-order tolerance (1e-5 of
the images' scale; measured 3e-7), with one rank's output and the launch in report.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from sharp_bilevel.distill.checkpoint import load_synthetic

ARGS = [
    "--iterations", "3", "--num-experts", "1", "--train-epochs", "2", "--max-start-epoch", "1",
    "--expert-epochs", "1", "--syn-steps", "3", "--width", "4", "--eval-epochs", "1",
    "--eval-seeds", "0", "--eval-models", "ConvNet", "--quiet",
]  # fmt: skip


def _run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_torchrun_two_ranks_matches_one_process(tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = _run(
        [*launcher, "--nproc_per_node=2", "-m", "sharp_bilevel", *ARGS, "--out", "two"], tmp_path
    )
    assert two.count("wrote ") == 1  # rank 0 alone prints
    assert "(2 ranks, gloo)" in two
    shutil.copytree(tmp_path / "two" / "experts", tmp_path / "one" / "experts")  # same experts
    _run([sys.executable, "-m", "sharp_bilevel", *ARGS, "--out", "one"], tmp_path)
    for run in ("mtt-none", "mtt-satm"):
        a = load_synthetic(tmp_path / "two" / run / "synthetic.pt")
        b = load_synthetic(tmp_path / "one" / run / "synthetic.pt")
        scale = float(b["images"].abs().max())
        assert float((a["images"] - b["images"]).abs().max()) <= 1e-5 * scale, run
        assert a["images"].shape == b["images"].shape == (10, 1, 8, 8)
        assert abs(a["syn_lr"] - b["syn_lr"]) <= 1e-5 * b["syn_lr"]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["distributed"] == {"world_size": 2, "backend": "gloo", "mode": "sharded"}
    alone = json.loads((tmp_path / "one" / "report.json").read_text())
    assert alone["distributed"] == {"world_size": 1, "backend": None, "mode": "single"}
    assert not torch.equal(a["images"], torch.zeros_like(a["images"]))
