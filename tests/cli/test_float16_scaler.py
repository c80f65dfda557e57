"""``--autocast float16`` on CPU (issue 21, point 6): the GradScaler starts from a scale this
problem's float16 backward can hold, and steps it does skip are reported as float16 overflow,
not as a divergence to cure by lowering ``--lr-img`` (the old, wrong advice)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _pipeline_fixtures import CLASSES, config, tiny_data
from torch import Tensor

from sharp_bilevel.distill import pipeline
from sharp_bilevel.distill.diagnostics import RunDiagnostics
from sharp_bilevel.distill.networks import get_network
from sharp_bilevel.distill.pipeline import DistillResult, distill


def _short_experts(step: float = 1e-3) -> list[list[list[Tensor]]]:
    """Experts whose epochs are ``step`` apart: the normalised matching loss then has large
    gradients, as real experts' (close epochs) do, and 65536 overflows float16."""
    net = get_network("ConvNet", 1, CLASSES, (8, 8), width=4, seed=0)
    gen = torch.Generator().manual_seed(1)
    experts = []
    for _ in range(2):
        snap = [p.detach().clone() for p in net.parameters()]
        trajectory = [snap]
        for _ in range(4):
            snap = [t + step * torch.randn(t.shape, generator=gen) for t in snap]
            trajectory.append(snap)
        experts.append(trajectory)
    return experts


def _run() -> tuple[DistillResult, list[str]]:
    images, labels = tiny_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = distill(
            config(autocast="float16", iterations=4, lr_img=1e-3),
            images,
            labels,
            CLASSES,
            _short_experts(),
        )
    return result, [str(w.message) for w in caught]


def test_torch_default_scale_overflows_and_is_reported_as_such(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "FLOAT16_INIT_SCALE", 2.0**16)  # torch's default
    result, messages = _run()
    skipped = int(sum(result.history["skipped"]))
    assert skipped >= 3  # the scaler backs off, one skipped step per halving
    assert all(math.isfinite(v) for v in result.history["loss"])
    diagnostics = result.diagnostics
    assert diagnostics.overflow_skipped == diagnostics.nonfinite_skipped == skipped
    assert diagnostics.loss_scale == 2.0**16 / 2**skipped
    assert len(messages) == 1
    assert f"{skipped} of 4 steps were skipped because float16 overflowed" in messages[0]
    assert "GradScaler" in messages[0]
    assert "lr_img" not in messages[0]
    assert "--autocast bf16" in messages[0]


def test_the_pipeline_scale_holds_for_the_same_problem() -> None:
    result, messages = _run()
    assert result.history["skipped"] == [0.0] * 4
    assert result.diagnostics.loss_scale == pipeline.FLOAT16_INIT_SCALE
    assert messages == []


def test_a_real_divergence_still_says_lower_lr_img() -> None:
    diagnostics = RunDiagnostics(iterations=10, nonfinite_skipped=3, overflow_skipped=1)
    diagnostics.loss_scale = 128.0
    problems = diagnostics.problems()
    assert problems[0].startswith("2 of 10 steps were skipped for a NaN or infinite loss")
    assert "lower lr_img" in problems[0]
    assert problems[1].startswith("1 of 10 steps were skipped because float16 overflowed")
    assert "now 128" in problems[1]
