"""Checkpoints: ``state_dict``/``load_state_dict`` continue a run bit for bit (DESIGN.md 3, 5).

For every rule (VaSSO's ``d``, SATM's noise generator, GSAM) and for SGD with momentum and Adam:
K steps, save (in memory and through ``torch.save``/``torch.load``), a fresh optimizer on fresh
parameters loads it, M more steps; the result equals an uninterrupted run of K + M steps.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _helpers import ALL_RULES, Objective, all_equal, backward_closure, clones

from sharp_bilevel import SharpBilevelOptimizer

F64 = torch.float64
K, M = 3, 3
BASES = {
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 0.02}),
}


def _initial():
    gen = torch.Generator().manual_seed(8)
    P0 = [torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(5, generator=gen, dtype=F64)]
    Q0 = [torch.tensor(0.3, dtype=F64)]
    objective = Objective([torch.randn(p.shape, generator=gen, dtype=F64) for p in P0])
    return P0, Q0, objective


def _build(rule, base, P0, Q0, seed):
    P = [torch.nn.Parameter(p.clone()) for p in P0]
    Q = [torch.nn.Parameter(q.clone()) for q in Q0]
    base_cls, base_kwargs = BASES[base]
    smooth = {"smooth": 0.1} if rule in ("ssam", "none") else {}
    opt = SharpBilevelOptimizer(
        [{"params": P}, {"params": Q, "perturb": False, "lr": 0.01}],
        base_optimizer=base_cls,
        perturbation=rule,
        seed=seed,
        **smooth,
        **base_kwargs,
    )
    return opt, P, Q


def _run(opt, P, Q, objective, steps, gate_at=None):
    """``steps`` step() calls; the call at index ``gate_at`` is skipped by the gate."""
    steps_seen = []
    closure = backward_closure(objective, P, Q)

    def recording(ctx):
        steps_seen.append(ctx.step)
        return closure(ctx)

    for t in range(steps):
        opt.step(recording, skip_if=(lambda loss: True) if t == gate_at else None)
    return steps_seen


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("through_bytes", [True, False], ids=["torch_save", "in_memory"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("rule", ALL_RULES)
def test_continuation_is_bit_identical_to_an_uninterrupted_run(rule, base, through_bytes):
    P0, Q0, objective = _initial()

    straight, sP, sQ = _build(rule, base, P0, Q0, seed=11)
    straight_seen = _run(straight, sP, sQ, objective, K + M, gate_at=1)

    first, fP, fQ = _build(rule, base, P0, Q0, seed=11)
    _run(first, fP, fQ, objective, K, gate_at=1)
    saved_params = clones(fP + fQ)
    state = first.state_dict()
    state = _round_trip(state) if through_bytes else copy.deepcopy(state)
    # the original keeps running: the saved state must not follow it
    _run(first, fP, fQ, objective, 2)

    # fresh parameters set to the saved values, another seed: everything must come from `state`
    resumed, rP, rQ = _build(rule, base, saved_params[: len(P0)], saved_params[len(P0) :], 999)
    resumed.load_state_dict(state)
    assert resumed.steps_taken == K - 1
    assert resumed.skipped_steps == {"nonfinite": 0, "gate": 1}
    steps_seen = _run(resumed, rP, rQ, objective, M)
    per_step = 2 if rule not in ("none", "looksam") else 1
    if rule == "looksam":  # one or two passes, as in the uninterrupted run (the state says)
        assert steps_seen == [s for s in straight_seen if s >= K - 1]
        assert 1 in [steps_seen.count(s) for s in set(steps_seen)]
    else:
        assert steps_seen == [s for s in range(K - 1, K - 1 + M) for _ in range(per_step)]

    assert all_equal(rP + rQ, sP + sQ)
    assert resumed.steps_taken == straight.steps_taken
    # the optimizer states agree too
    for key, value in straight.state.items():
        index = [id(t) for t in sP + sQ].index(id(key))
        twin = resumed.state[(rP + rQ)[index]]
        assert twin.keys() == value.keys()
        for name in value:
            assert torch.equal(torch.as_tensor(twin[name]), torch.as_tensor(value[name]))


@pytest.mark.parametrize("rule", ["vasso", "ssam"])
def test_continuation_needs_the_saved_rule_state(rule):
    """Guard for the test above: without loading, the continuation differs (state matters)."""
    P0, Q0, objective = _initial()
    straight, sP, sQ = _build(rule, "sgd_momentum", P0, Q0, seed=11)
    _run(straight, sP, sQ, objective, K + M)
    first, fP, fQ = _build(rule, "sgd_momentum", P0, Q0, seed=11)
    _run(first, fP, fQ, objective, K)
    state = _round_trip(first.state_dict())
    fresh, rP, rQ = _build(rule, "sgd_momentum", clones(fP), clones(fQ), seed=999)
    # only the base optimizer's part: the rule state / noise generator stay fresh
    fresh.base_optimizer.load_state_dict({k: v for k, v in state.items() if k != "sharp_bilevel"})
    _run(fresh, rP, rQ, objective, M)
    assert not all_equal(rP, sP)


def test_vasso_state_holds_d_and_is_a_copy():
    P0, Q0, objective = _initial()
    opt, P, Q = _build("vasso", "sgd_momentum", P0, Q0, seed=0)
    seen = []
    opt.step(backward_closure(objective, P, Q, seen))
    state = opt.state_dict()["sharp_bilevel"]
    assert state["perturbation"] == "VaSSO"
    d = state["rule_state"]["d"]
    # first step: d = g, the gradient of the ascent call
    assert all_equal(d, seen[0]["gP"])
    opt.step(backward_closure(objective, P, Q, seen))
    assert all_equal(d, seen[0]["gP"])  # the saved copy did not move with the optimizer
    d2 = opt.state_dict()["sharp_bilevel"]["rule_state"]["d"]
    for new, old, g in zip(d2, d, seen[2]["gP"], strict=True):
        torch.testing.assert_close(new, 0.1 * old + 0.9 * g, rtol=1e-14, atol=0)


def test_loading_a_state_dict_of_another_rule_raises():
    P0, Q0, objective = _initial()
    sam, P, Q = _build("sam", "sgd_momentum", P0, Q0, seed=0)
    _run(sam, P, Q, objective, 2)
    vasso, _, _ = _build("vasso", "sgd_momentum", P0, Q0, seed=0)
    before = copy.deepcopy(vasso.state_dict())
    with pytest.raises(ValueError, match="SAM") as info:
        vasso.load_state_dict(sam.state_dict())
    assert "VaSSO" in str(info.value)
    ssam, _, _ = _build("ssam", "sgd_momentum", P0, Q0, seed=0)
    with pytest.raises(ValueError, match="perturbation"):
        ssam.load_state_dict(sam.state_dict())
    # nothing was loaded
    after = vasso.state_dict()
    assert before["state"] == {}
    assert after["state"] == {}
    assert after["sharp_bilevel"]["steps_taken"] == 0


def test_loading_a_plain_torch_state_dict_raises():
    P0, Q0, _ = _initial()
    opt, P, Q = _build("sam", "sgd_momentum", P0, Q0, seed=0)
    plain = torch.optim.SGD(
        [{"params": P}, {"params": Q, "lr": 0.01}], lr=0.05, momentum=0.9
    ).state_dict()
    with pytest.raises(ValueError, match="sharp_bilevel"):
        opt.load_state_dict(plain)


def test_state_dict_survives_weights_only_load():
    """``torch.load`` defaults to ``weights_only=True``: the extra entry must be loadable so."""
    P0, Q0, objective = _initial()
    opt, P, Q = _build("ssam", "adam", P0, Q0, seed=4)
    _run(opt, P, Q, objective, 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    extra = loaded["sharp_bilevel"]
    assert extra["steps_taken"] == 2
    generator = torch.Generator()
    generator.set_state(extra["noise_rng"])
    expected = torch.Generator()
    expected.set_state(opt.state_dict()["sharp_bilevel"]["noise_rng"])
    assert torch.equal(torch.randn(8, generator=generator), torch.randn(8, generator=expected))
