"""Bad input to ``SharpBilevelOptimizer`` fails early and clearly.

One table: arguments -> exception type and message patterns (every pattern must match). Each
error is raised before the base optimizer is built and leaves the parameters untouched. Then
the checks made during a step: what a user rule returns, sparse gradients; and ``rho`` for
``"none"``, accepted and ignored so that a sweep over rules can pass one ``rho``.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass

import pytest
import torch
from _helpers import Objective, all_equal, backward_closure, clones

from sharp_bilevel import PerturbationRule, SharpBilevelOptimizer, get_perturbation

F64 = torch.float64
NAN, INF = math.nan, math.inf
LR = r"must be a finite number >= 0"
SEED = r"seed must be an int in \[0, 2\*\*63 - 1\]"
SGD_ARGS = r"SGD \(which accepts dampening, .*lr, maximize, momentum, nesterov, weight_decay\)"

# (id, arguments, exception, patterns); "groups" gives each group's extra keys
BAD_ARGUMENTS = [
    # a hyperparameter of another rule: name the rule, what it accepts, and who has it
    (
        "eta_with_sam",
        {"perturbation": "sam", "eta": 0.01},
        TypeError,
        [
            r"unexpected keyword argument 'eta'",
            r"perturbation 'sam' \(which accepts per_sample, rho, xi\)",
            SGD_ARGS,
            r"eta is a hyperparameter of 'asam', 'fsam', 'gsam', 'wsam', not of 'sam'",
        ],
    ),
    (
        "theta_with_alias",
        {"perturbation": " SMOOTH", "theta": 0.5},
        TypeError,
        [r"perturbation 'ssam'", r"theta is a hyperparameter of 'vasso', not of 'ssam'"],
    ),
    (
        "unknown_name",
        {"perturbation": "asam", "bogus": 1},
        TypeError,
        [r"'bogus'", r"'asam' \(which accepts eta, per_sample, rho, scaled, xi\)", SGD_ARGS],
    ),
    (
        "sgd_argument_with_adam",
        {"base_optimizer": torch.optim.Adam, "momentum": 0.9},
        TypeError,
        [r"'momentum'", r"Adam \(which accepts .*betas.*\)"],
    ),
    (
        "eta_in_perturbation_kwargs",
        {"perturbation": "sam", "perturbation_kwargs": {"eta": 0.1}},
        TypeError,
        [r"'sam' has no hyperparameter\(s\) \['eta'\]", r"eta is a hyperparameter of 'asam'"],
    ),
    ("unknown_rule", {"perturbation": "samm"}, ValueError, [r"unknown perturbation 'samm'"]),
    ("rule_not_a_name", {"perturbation": 3}, TypeError, [r"perturbation must be a name"]),
    # the optimizer's own options
    ("smooth_bool", {"smooth": True}, ValueError, [r"smooth must be a finite number >= 0"]),
    ("smooth_str", {"smooth": "0.1"}, ValueError, [r"smooth must be a finite number >= 0"]),
    ("smooth_nan", {"smooth": NAN}, ValueError, [r"smooth must be a finite number >= 0"]),
    ("seed_huge", {"seed": 2**70}, ValueError, [SEED, r"1180591620717411303424"]),
    ("seed_2_63", {"seed": 2**63}, ValueError, [SEED]),
    ("seed_negative", {"seed": -1}, ValueError, [SEED]),
    ("seed_float", {"seed": 1.5}, ValueError, [SEED]),
    ("seed_bool", {"seed": True}, ValueError, [SEED]),
    ("seed_str", {"seed": "3"}, ValueError, [SEED]),
    ("closure_options_int", {"closure_options": 5}, TypeError, [r"closure_options must be a"]),
    (
        "closure_options_pairs",
        {"closure_options": [("keep", 3)]},
        TypeError,
        [r"closure_options must be a mapping or None, got list"],
    ),
    (
        "perturbation_kwargs_list",
        {"perturbation_kwargs": ["rho"]},
        TypeError,
        [r"perturbation_kwargs must be a mapping"],
    ),
    ("nonfinite", {"nonfinite": "ignore"}, ValueError, [r"nonfinite must be one of"]),
    # learning rates, given to the base optimizer or per group
    *[(f"lr_{v!r}", {"lr": v}, ValueError, [r"^lr " + LR]) for v in (NAN, INF, -INF, -0.1)],
    ("lr_str", {"lr": "0.1"}, ValueError, [r"^lr " + LR, r"'0\.1'"]),
    ("lr_bool", {"lr": True}, ValueError, [r"^lr " + LR, r"True"]),
    ("lr_tensor_nan", {"lr": torch.tensor(NAN)}, ValueError, [r"^lr " + LR]),
    ("group0_lr_nan", {"groups": [{"lr": NAN}, {}]}, ValueError, [r"param group 0's lr " + LR]),
    ("group1_lr_str", {"groups": [{}, {"lr": "0.1"}]}, ValueError, [r"param group 1's lr " + LR]),
    ("group1_lr_inf", {"groups": [{}, {"lr": INF}]}, ValueError, [r"param group 1's lr " + LR]),
    ("group1_lr_bool", {"groups": [{}, {"lr": False}]}, ValueError, [r"param group 1's lr"]),
    # rule hyperparameters: the argument and its allowed range
    ("rho_nan", {"rho": NAN}, ValueError, [r"rho must be a finite number > 0, got nan"]),
    ("rho_str", {"rho": "0.1"}, ValueError, [r"rho must be a finite number > 0, got '0\.1'"]),
    ("rho_bool", {"rho": True}, ValueError, [r"rho must be a finite number > 0, got True"]),
    (
        "theta_bool",
        {"perturbation": "vasso", "theta": True},
        ValueError,
        [r"theta must be in \(0(\.0)?, 1(\.0)?\], got True"],
    ),
    (
        "alpha_str",
        {"perturbation": "gsam", "alpha": "0.4"},
        ValueError,
        [r"alpha must be in \[0(\.0)?, 1(\.0)?\], got '0\.4'"],
    ),
    (
        "eta_inf",
        {"perturbation": "asam", "eta": INF},
        ValueError,
        [r"eta must be a finite number >= 0, got inf"],
    ),
    (
        "gamma_bool",
        {"perturbation": "ssam", "gamma": True},
        ValueError,
        [r"gamma must be a finite number >= 0, got True"],
    ),
    (
        "per_sample_int",
        {"perturbation": "asam", "per_sample": 1},
        ValueError,
        [r"per_sample must be True or False, got 1"],
    ),
    (
        "gsam_rho_min_str",
        {"perturbation": "gsam", "rho_min": "0.01", "lr_min": 0.0, "lr_max": 1.0},
        ValueError,
        [r"rho_min must be in \[0(\.0)?, 0\.05\], got '0\.01'"],
    ),
    (
        "gsam_lr_max_str",
        {"perturbation": "gsam", "rho_min": 0.01, "lr_min": 0.0, "lr_max": "1"},
        ValueError,
        [r"lr_max must be > lr_min=0(\.0)? and finite, got '1'"],
    ),
    (
        "gsam_lr_min_bool",
        {"perturbation": "gsam", "rho_min": 0.01, "lr_min": True, "lr_max": 2.0},
        ValueError,
        [r"lr_min must be a finite number >= 0, got True"],
    ),
]


@pytest.fixture
def built(monkeypatch):
    """Records every construction of SGD and Adam (their signatures stay as they are)."""
    calls: list[str] = []
    for cls in (torch.optim.SGD, torch.optim.Adam):
        original = cls.__init__

        @functools.wraps(original)
        def init(self, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append(_name)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)
    return calls


@pytest.mark.parametrize(
    ("arguments", "error", "patterns"),
    [case[1:] for case in BAD_ARGUMENTS],
    ids=[case[0] for case in BAD_ARGUMENTS],
)
def test_bad_arguments_raise_before_anything_is_built(arguments, error, patterns, built):
    gen = torch.Generator().manual_seed(0)
    P = [torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=F64))]
    Q = [torch.nn.Parameter(torch.tensor(0.1, dtype=F64))]
    before = clones(P + Q)
    arguments = dict(arguments)
    extra = arguments.pop("groups", [{}, {}])
    params = [{"params": P, **extra[0]}, {"params": Q, "perturb": False, **extra[1]}]
    arguments.setdefault("lr", 0.1)
    with pytest.raises(error) as info:
        SharpBilevelOptimizer(params, **arguments)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))
    assert built == []
    assert all_equal(P + Q, before)


def test_lr_checks_cover_instances_added_groups_and_tensor_lrs():
    P = [torch.nn.Parameter(torch.ones(2, dtype=F64))]
    extra = torch.nn.Parameter(torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"param group 0's lr " + LR):
        SharpBilevelOptimizer(base_optimizer=torch.optim.SGD(P, lr=NAN))
    opt = SharpBilevelOptimizer(P, lr=torch.tensor(0.1, dtype=F64))  # accepted, as torch does
    with pytest.raises(ValueError, match=r"param group 1's lr " + LR):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1
    for ok in (0, 0.0, 3, 1e-300):
        SharpBilevelOptimizer(P, lr=ok)


def test_hyperparameter_of_another_rule_with_a_base_optimizer_instance():
    P = [torch.nn.Parameter(torch.ones(2, dtype=F64))]
    with pytest.raises(TypeError, match=r"eta is a hyperparameter of 'asam', 'fsam', 'gsam'"):
        SharpBilevelOptimizer(base_optimizer=torch.optim.SGD(P, lr=0.1), eta=0.1)
    with pytest.raises(ValueError, match=r"already-built"):  # a base argument: set it there
        SharpBilevelOptimizer(base_optimizer=torch.optim.SGD(P, lr=0.1), momentum=0.9)


# ---------------------------------------------------------------------- "none" ignores rho
def _sweep_problem():
    gen = torch.Generator().manual_seed(1)
    P = [torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=F64))]
    objective = Objective([torch.randn(3, 2, generator=gen, dtype=F64)])
    return P, objective


@pytest.mark.parametrize("how", ["rho", "kwargs", "perturbation_kwargs"])
def test_none_accepts_rho_ignores_it_and_warns(how):
    P, objective = _sweep_problem()
    P_plain, _ = _sweep_problem()
    given = {
        "rho": {"rho": 0.05},
        "kwargs": {"perturbation_kwargs": None, "rho": 0.05},
        "perturbation_kwargs": {"perturbation_kwargs": {"rho": 0.05}},
    }[how]
    with pytest.warns(UserWarning, match=r"'none' has no rho: rho=0\.05 is ignored") as record:
        opt = SharpBilevelOptimizer(P, perturbation="none", lr=0.1, **given)
    assert record[0].filename == __file__  # the warning points at the caller's line
    plain = SharpBilevelOptimizer(P_plain, perturbation="none", lr=0.1)
    assert opt.perturbation == plain.perturbation
    opt.step(backward_closure(objective, P, []))
    plain.step(backward_closure(objective, P_plain, []))
    assert all_equal(P, P_plain)


def test_none_with_rho_none_does_not_warn_and_a_sweep_passes_one_rho():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SharpBilevelOptimizer(_sweep_problem()[0], perturbation="none", rho=None, lr=0.1)
        SharpBilevelOptimizer(_sweep_problem()[0], perturbation="mtt", lr=0.1)
        get_perturbation("none", rho=None)
    for name in ("none", "sam", "asam", "gsam", "vasso", "ssam"):
        P, objective = _sweep_problem()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            opt = SharpBilevelOptimizer(P, perturbation=name, rho=0.05, lr=0.1)
        assert len(record) == (name == "none")
        opt.step(backward_closure(objective, P, []))
        assert opt.steps_taken == 1
    # other hyperparameters stay refused for "none"
    with pytest.raises(TypeError, match=r"'none' has no hyperparameter\(s\) \['eta'\]"):
        get_perturbation("none", eta=0.1)


# ---------------------------------------------------------------------- what user rules return
@dataclass(frozen=True)
class Broken(PerturbationRule):
    """A user rule whose ascent or descent returns something wrong (``what``)."""

    what: str = "ok"

    def ascent(self, params, grads, state, lr):
        eps = [0.01 * g for g in grads]
        bad = {
            "eps_only": eps,
            "triple": (eps, state, None),
            "state_list": (eps, []),
            "eps_tensor": (torch.zeros(3), state),
            "eps_short": (eps[:-1], state),
            "eps_shape": ([eps[0].reshape(-1), *eps[1:]], state),
            "eps_dtype": ([eps[0].float(), *eps[1:]], state),
            "eps_number": ([0.0, *eps[1:]], state),
        }
        return bad.get(self.what, (eps, {**state, "seen": True}))

    def descent(self, grads, grads_adv, state):
        d = list(grads_adv)
        bad = {
            "d_tuple_of_one": (d[0],),
            "d_tensor": d[0],
            "d_shape": [d[0][:1], *d[1:]],
            "d_dtype": [d[0].to(torch.float32), *d[1:]],
            "d_none": None,
        }
        return bad.get(self.what, d)


BROKEN = [
    (
        "eps_only",
        TypeError,
        r"Broken\.ascent\(\) must return a pair \(eps, new_state\) with "
        r"new_state a dict, got a list of length 2 \(Tensor, Tensor\)",
    ),
    ("triple", TypeError, r"Broken\.ascent\(\) must return a pair .*tuple of length 3"),
    ("state_list", TypeError, r"new_state a dict, got a tuple of length 2 \(list, list\)"),
    ("eps_tensor", TypeError, r"Broken\.ascent\(\) must return eps as a list .*got a Tensor"),
    ("eps_short", ValueError, r"Broken\.ascent\(\) returned 1 tensors as eps for 2 perturbed"),
    ("eps_shape", ValueError, r"Broken\.ascent\(\): eps\[0\] has shape \(6,\).* shape \(3, 2\)"),
    ("eps_dtype", ValueError, r"Broken\.ascent\(\): eps\[0\] has .*torch\.float32.*float64"),
    ("eps_number", TypeError, r"Broken\.ascent\(\): eps\[0\] must be a tensor, got a float"),
    ("d_tuple_of_one", ValueError, r"Broken\.descent\(\) returned 1 tensors as the direction"),
    ("d_tensor", TypeError, r"Broken\.descent\(\) must return the direction as a list"),
    ("d_shape", ValueError, r"Broken\.descent\(\): the direction\[0\] has shape \(1, 2\)"),
    ("d_dtype", ValueError, r"Broken\.descent\(\): the direction\[0\] has .*float32"),
    ("d_none", TypeError, r"Broken\.descent\(\) must return the direction .*got a NoneType"),
]


@pytest.mark.parametrize(("what", "error", "pattern"), BROKEN, ids=[b[0] for b in BROKEN])
def test_what_a_user_rule_returns_is_checked_and_the_step_undone(what, error, pattern):
    gen = torch.Generator().manual_seed(2)
    P = [
        torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=F64)),
        torch.nn.Parameter(torch.randn(4, generator=gen, dtype=F64)),
    ]
    Q = [torch.nn.Parameter(torch.tensor(0.2, dtype=F64))]
    objective = Objective([torch.randn(p.shape, generator=gen, dtype=F64) for p in P])
    opt = SharpBilevelOptimizer(
        [{"params": P}, {"params": Q, "perturb": False}],
        perturbation=Broken(what),
        lr=0.1,
        momentum=0.9,
    )
    before = clones(P + Q)
    with pytest.raises(error, match=pattern):
        opt.step(backward_closure(objective, P, Q))
    assert all_equal(P + Q, before)
    assert opt.steps_taken == 0
    assert opt.state_dict()["sharp_bilevel"]["rule_state"] == {}
    assert len(opt.state) == 0
    # a rule returning well-formed values steps normally
    opt.perturbation = Broken("ok")
    opt.step(backward_closure(objective, P, Q))
    assert opt.steps_taken == 1
    assert opt.state_dict()["sharp_bilevel"]["rule_state"] == {"seen": True}


# ---------------------------------------------------------------------- sparse gradients
@pytest.mark.parametrize("rule", ["sam", "none"])
def test_sparse_gradients_are_refused_at_the_first_call_naming_the_parameter(rule):
    gen = torch.Generator().manual_seed(3)
    images = torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=F64))
    embedding = torch.nn.Embedding(10, 4, sparse=True).double()
    opt = SharpBilevelOptimizer(
        [{"params": [images, embedding.weight]}], perturbation=rule, lr=0.1, smooth=0.1, seed=0
    )
    before = clones([images, embedding.weight])
    phases = []

    def closure(ctx):
        phases.append(ctx.phase)
        loss = (images**2).sum() + embedding(torch.tensor([1, 4])).sum()
        loss.backward()
        return loss

    with pytest.raises(TypeError) as info:
        opt.step(closure)
    message = str(info.value)
    assert "param group 0, parameter 1 (shape (10, 4))" in message
    assert "sparse" in message
    assert "restored" in message
    assert phases == ["ascent"]  # refused before any ascent
    assert all_equal([images, embedding.weight], before)
    assert opt.steps_taken == 0
