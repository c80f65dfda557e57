"""The main job's loop with the synthetic set sharded over 2 gloo ranks (``distill(...,
process_group=...)``) against the same run in one process.

Tolerance: float32, where the sharded inner gradient is a sum over ranks of partial means and
the single-process one a mean over the batch; the summation order alone differs, so each inner
step differs by float32 rounding (about 6e-8 relative) and six outer steps stay within 1e-5 of
the images' scale (measured: 4e-8). A checkpoint holds whole tensors; resuming it under the same
ranks is bit-identical, under one process it is within the same tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _distributed import run_ranks
from _pipeline_fixtures import CLASSES, config, tiny_data, tiny_experts

from sharp_bilevel.distill.checkpoint import load_checkpoint
from sharp_bilevel.distill.pipeline import distill

TOLERANCE = 1e-5
SETTINGS = {"ipc": 3, "checkpoint_every": 2}  # 9 images: 5 on rank 0, 4 on rank 1


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max().clamp_min(1e-12))
    return float((a.float() - b.float()).abs().max()) <= TOLERANCE * scale


def _one_process(tmp_path: Path | None = None, iterations: int = 6, **cfg: object):  # type: ignore[no-untyped-def]
    images, labels = tiny_data()
    checkpoint = None if tmp_path is None else tmp_path
    return distill(
        config(iterations=iterations, **SETTINGS, **cfg),  # type: ignore[arg-type]
        images,
        labels,
        CLASSES,
        tiny_experts(),
        checkpoint=checkpoint,
    )


@pytest.mark.parametrize(
    ("method", "perturbation"), [("mtt", "satm"), ("datm", "vasso"), ("ftd", "asam")]
)
def test_two_ranks_give_the_single_process_images(
    tmp_path: Path, method: str, perturbation: str
) -> None:
    cfg = {"method": method, "perturbation": perturbation}
    ranks = run_ranks(
        2, "_dist_cases:pipeline", tmp_path, checkpoint=str(tmp_path / "ck.pt"),
        iterations=6, **SETTINGS, **cfg,
    )  # fmt: skip
    reference = _one_process(**cfg)
    assert min(reference.history["grad_norm"]) > 0  # every step moved the images
    for rank in ranks:
        assert torch.equal(rank["images"], ranks[0]["images"])  # every rank returns the whole set
        assert _close(rank["images"], reference.images)
        assert _close(rank["labels"], reference.labels)
        assert _close(rank["syn_lr"], torch.tensor(reference.syn_lr))
        assert _close(rank["losses"], torch.tensor(reference.history["loss"]))
        if method == "ftd":
            assert reference.ema_images is not None
            assert _close(rank["ema"], reference.ema_images)
    saved = load_checkpoint(tmp_path / "ck.pt")
    assert saved["images"].shape == reference.images.shape  # whole tensors, not a shard
    assert torch.equal(saved["images"], ranks[0]["images"])


def test_a_two_rank_checkpoint_resumes_on_two_ranks_and_on_one(tmp_path: Path) -> None:
    cfg = {"method": "datm", "perturbation": "satm"}
    whole = run_ranks(
        2, "_dist_cases:pipeline", tmp_path / "a", checkpoint=str(tmp_path / "a.pt"),
        iterations=4, **SETTINGS, **cfg,
    )[0]  # fmt: skip
    stopped = run_ranks(
        2, "_dist_cases:pipeline", tmp_path / "b", checkpoint=str(tmp_path / "b.pt"),
        iterations=4, stop_at=2, **SETTINGS, **cfg,
    )  # fmt: skip
    assert all(bool(r["stopped"]) for r in stopped)
    assert load_checkpoint(tmp_path / "b.pt")["iteration"] == 2
    (tmp_path / "c.pt").write_bytes((tmp_path / "b.pt").read_bytes())
    resumed = run_ranks(
        2, "_dist_cases:pipeline", tmp_path / "c", checkpoint=str(tmp_path / "b.pt"),
        iterations=4, **SETTINGS, **cfg,
    )[0]  # fmt: skip
    for key in ("images", "labels", "syn_lr", "losses"):
        assert torch.equal(resumed[key], whole[key]), key
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: no thread-count warning
    try:
        alone = _one_process(tmp_path / "c.pt", iterations=4, **cfg)
    finally:
        torch.set_num_threads(threads)
    assert _close(alone.images, whole["images"])
    assert _close(alone.labels, whole["labels"])
