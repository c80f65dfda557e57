"""Point 4 of issue 21: a skipped step draws no noise. A run with one skipped step (gate,
non-finite, gradient-scaler back-off) continues exactly as a run that never tried that step:
same noise generator state, bit-identical parameters afterwards. Before, the skip left the
generator advanced (the raise path already restored it)."""

from __future__ import annotations

import pytest
import torch

from sharp_bilevel import SharpBilevelOptimizer

F64 = torch.float64


def _run(rule: str, skip_at: int | None, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    phi = torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=F64))
    target = torch.randn(3, 4, generator=gen, dtype=F64)
    opt = SharpBilevelOptimizer(
        [phi], perturbation=rule, seed=5, lr=0.1, momentum=0.9, nonfinite="skip"
    )
    for k in range(5):
        bad = k == skip_at

        def closure(*, bad: bool = bad) -> torch.Tensor:
            loss = ((phi - target) ** 2).sum() * (math_nan() if bad and how == "nonfinite" else 1)
            loss.backward()
            return loss

        if bad and how == "gate":
            opt.step(closure, skip_if=lambda _loss: True)
        else:
            opt.step(closure)
    return phi.detach().clone(), opt._noise_generator.get_state()


def math_nan() -> float:
    return float("nan")


@pytest.mark.parametrize("how", ["gate", "nonfinite"])
@pytest.mark.parametrize("rule", ["ssam", "bsam"])
def test_a_skipped_step_leaves_the_noise_generator_as_it_was(rule, how):
    skipped_phi, skipped_rng = _run(rule, 2, how)
    # the reference takes the same four real steps and never tries the skipped one
    gen = torch.Generator().manual_seed(0)
    phi = torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=F64))
    target = torch.randn(3, 4, generator=gen, dtype=F64)
    opt = SharpBilevelOptimizer([phi], perturbation=rule, seed=5, lr=0.1, momentum=0.9)

    def closure() -> torch.Tensor:
        loss = ((phi - target) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    assert torch.equal(skipped_rng, opt._noise_generator.get_state())
    assert torch.equal(skipped_phi, phi.detach())
    # and the skip did happen: without it the run differs
    assert not torch.equal(_run(rule, None, how)[0], phi.detach())
