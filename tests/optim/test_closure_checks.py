"""Issue 21, points 6 and 10 (optimizer part): a closure that is not callable is refused before
any work, naming ``closure``; one that never calls backward() is warned about."""

from __future__ import annotations

import pytest
import torch

from sharp_bilevel import NoGradientWarning, SharpBilevelOptimizer


def _opt(rule: str = "sam"):
    phi = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    rho = {} if rule == "none" else {"rho": 0.05}
    return phi, SharpBilevelOptimizer([phi], perturbation=rule, lr=0.1, momentum=0.9, **rho)


@pytest.mark.parametrize("bad", [5, "closure", [1]])
def test_a_closure_that_is_not_callable_is_refused_before_any_work(bad):
    phi, opt = _opt()
    before = phi.detach().clone()
    with pytest.raises(TypeError, match=r"step\(closure=\.\.\.\) must be a callable .*got "):
        opt.step(bad)
    assert torch.equal(phi.detach(), before)
    assert opt.steps_taken == 0
    with pytest.raises(TypeError, match=r"step\(skip_if=\.\.\.\) must be a callable"):
        opt.step(lambda: (phi**2).sum(), skip_if=3)


@pytest.mark.parametrize("rule", ["sam", "none"])
def test_a_closure_that_never_calls_backward_is_warned_about(rule):
    phi, opt = _opt(rule)
    with pytest.warns(NoGradientWarning, match="(ascent|descent) pass left no gradient"):
        opt.step(lambda: (phi**2).sum().detach())
    # a closure that does call backward() steps silently, and like a plain loop would
    phi2, opt2 = _opt(rule)

    def closure():
        loss = (phi2**2).sum()
        loss.backward()
        return loss

    opt2.step(closure)  # filterwarnings=error: any warning fails here
    assert not torch.equal(phi2.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
