"""``scaling.py`` on the GPUs of this machine: one NCCL rank per visible GPU.

    python benchmarks/scaling/gpu_scaling.py [--quick]

Per rank it records ``torch.cuda.max_memory_allocated`` beside the saved-for-backward meter,
for 1, 2, ... up to the number of visible GPUs (at most 3 worlds: 1, 2 and all), and writes
``benchmarks/scaling/results/gpu_scaling.{json,md}``. On a machine without CUDA it says so and
runs the same measurement on the CPU with gloo (``--quick`` keeps that to about a minute), so the
script stays runnable everywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from benchmarks.scaling import scaling


def main() -> None:
    extra = sys.argv[1:]
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        worlds = sorted({1, min(2, gpus), gpus})
        scaling.main(
            ["--device", "cuda", "--worlds", ",".join(map(str, worlds)), *extra],
            default_out="gpu_scaling.json",
        )
    else:
        print("no CUDA device visible: measuring on the CPU with gloo instead")
        scaling.main(["--worlds", "1,2", *extra], default_out="gpu_scaling.json")


if __name__ == "__main__":
    main()
