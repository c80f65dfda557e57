"""A synthetic set sharded over gloo ranks gives the single-process step (DESIGN.md section 11).

Each test spawns its ranks as separate processes (``_distributed.run_ranks``, with a timeout:
a hang fails the test) and compares with the same problem run here in one process, in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _dist_cases import CASES, N_IMAGES, reference_after_skip, run_case
from _distributed import run_ranks

from sharp_bilevel.trajectory.sharded import Shard

TOLERANCE = 1e-10  # float64; measured differences are ~1e-15 (summation order only)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, torch.Tensor]]:
    return {name: run_case(name, None) for name in CASES}


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_steps_equal_the_single_process_steps(
    tmp_path: Path, references: dict[str, dict[str, torch.Tensor]], world: int
) -> None:
    ranks = run_ranks(world, "_dist_cases:exactness", tmp_path, names=list(CASES))
    counts = [int(r["shard"][1]) for r in ranks]
    assert sum(counts) == N_IMAGES
    assert len(set(counts)) > 1, "the split must be uneven"
    for name, ref in references.items():
        assert ref["images"].abs().max() > 0, name  # the steps moved the images
        for rank in ranks:
            offset, count = (int(v) for v in rank["shard"])
            shard = Shard(offset, count, N_IMAGES)
            got = rank[name]
            assert _rel(got["images"], shard.rows(ref["images"])) < TOLERANCE, (name, offset)
            if CASES[name]["soft"]:
                assert _rel(got["labels"], shard.rows(ref["labels"])) < TOLERANCE, name
            assert _rel(got["syn_lr"], ref["syn_lr"]) < TOLERANCE, name
            assert _rel(got["losses"], ref["losses"]) < TOLERANCE, name
            assert _rel(got["grad_norm"], ref["grad_norm"]) < TOLERANCE, name
        # the replicated lr moved identically on every rank (bit for bit)
        assert all(torch.equal(r[name]["syn_lr"], ranks[0][name]["syn_lr"]) for r in ranks)


@pytest.mark.parametrize("kind", ["raise-before", "raise-after"])
def test_a_closure_raising_on_one_rank_restores_and_raises_on_every_rank(
    tmp_path: Path, kind: str
) -> None:
    ranks = run_ranks(2, "_dist_cases:faults", tmp_path, timeout=120, kind=kind)
    for rank in ranks:
        assert rank["outcome"] == "DistributedStepError"
        assert bool(rank["restored"])


def test_a_nan_on_one_rank_is_raised_by_every_rank(tmp_path: Path) -> None:
    ranks = run_ranks(2, "_dist_cases:faults", tmp_path, timeout=120, kind="nan-raise")
    for rank in ranks:
        assert rank["outcome"] == "NonFiniteError"
        assert bool(rank["restored"])
        assert bool(rank["alive"])  # an agreed decision: the group is not torn down


def test_a_nan_on_one_rank_is_skipped_by_every_rank(tmp_path: Path) -> None:
    ranks = run_ranks(2, "_dist_cases:faults", tmp_path, timeout=120, kind="nan-skip")
    reference = reference_after_skip()
    for rank, offset in zip(ranks, (0, 4), strict=True):
        assert rank["outcome"] == "stepped"
        assert int(rank["skipped"]) == 1
        assert bool(rank["restored"])
        count = rank["after_skip"].shape[0]
        assert _rel(rank["after_skip"], reference[offset : offset + count]) < TOLERANCE


def test_even_split_and_members() -> None:
    shards = [Shard.even(7, r, 3) for r in range(3)]
    assert [(s.offset, s.count) for s in shards] == [(0, 3), (3, 2), (5, 2)]
    positions, rows = shards[1].members(torch.tensor([6, 3, 0, 4, 5]))
    assert positions.tolist() == [1, 3]
    assert rows.tolist() == [0, 1]
    with pytest.raises(ValueError, match="outside a set of 7"):
        Shard(5, 3, 7)


def test_students_with_batch_statistics_are_refused_when_sharded() -> None:
    from sharp_bilevel import TrajectoryMatching, get_network

    net = get_network("ConvNetBN", 1, 3, (8, 8), width=4, seed=0)
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    images = torch.randn(4, 1, 8, 8, requires_grad=True)
    closure = TrajectoryMatching(
        net, images, torch.tensor(0.01, requires_grad=True), torch.arange(4) % 3,
        expert_start=w0, expert_target=w0 + 0.01, syn_steps=2, shard=Shard(0, 4, 4),
    )  # fmt: skip
    with pytest.raises(ValueError, match="without batch statistics"):
        closure()
