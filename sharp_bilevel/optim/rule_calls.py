"""Calls into a `PerturbationRule`, with what it returns checked: a user rule may return
anything, and a wrong shape must fail with the rule's method named, not deep in the step."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from .arguments import _checked_tensors, _describe
from .distributed import RankLayout
from .perturbations.base import PerturbationRule, RuleState
from .smoothing import smoothing_noise, standard_normal


def _scope(layout: RankLayout | None) -> contextlib.AbstractContextManager[None]:
    """Whole-set reductions span the ranks inside (nothing to do in one process)."""
    return contextlib.nullcontext() if layout is None else layout.scope()


def _pair(where: str, result: object, first: str) -> tuple[Any, RuleState]:
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise TypeError(f"{where} must return a pair ({first}, new_state), got {_describe(result)}")
    value, new_state = result
    if not isinstance(new_state, dict):
        raise TypeError(
            f"{where} must return a pair ({first}, new_state) with new_state a dict, got "
            f"{_describe(result)}"
        )
    return value, new_state


def wants_second_pass(rule: PerturbationRule, state: RuleState) -> bool:
    wanted: object = rule.wants_second_pass(state)
    if not isinstance(wanted, bool):
        raise TypeError(
            f"{type(rule).__name__}.wants_second_pass() must return True or False, got "
            f"{_describe(wanted)}"
        )
    return wanted


def ascent(
    rule: PerturbationRule,
    layout: RankLayout | None,
    perturbed: list[Tensor],
    grads: list[Tensor],
    state: RuleState,
    lr: float,
) -> tuple[list[Tensor], RuleState]:
    """The rule's ``(eps, new_state)``, checked."""
    where = f"{type(rule).__name__}.ascent()"
    with _scope(layout):
        result: object = rule.ascent([p.detach() for p in perturbed], grads, state, lr)
    eps, new_state = _pair(where, result, "eps")
    return _checked_tensors(where, "eps", eps, perturbed), new_state


def descent(
    rule: PerturbationRule,
    layout: RankLayout | None,
    perturbed: list[Tensor],
    grads: list[Tensor],
    grads_adv: list[Tensor],
    state: RuleState,
) -> tuple[list[Tensor], RuleState]:
    """The rule's descent direction and its state after the step (``after_descent``), checked."""
    where = f"{type(rule).__name__}.descent()"
    with _scope(layout):
        direction: object = rule.descent(grads, grads_adv, state)
    checked = _checked_tensors(where, "the direction", direction, perturbed)
    with _scope(layout):
        new_state: object = rule.after_descent(grads, grads_adv, state)
    if not isinstance(new_state, dict):
        raise TypeError(
            f"{type(rule).__name__}.after_descent() must return a dict, got {_describe(new_state)}"
        )
    return checked, new_state


def reuse(
    rule: PerturbationRule,
    layout: RankLayout | None,
    perturbed: list[Tensor],
    grads: list[Tensor],
    state: RuleState,
) -> tuple[list[Tensor], RuleState]:
    """The rule's direction for a step without a second pass, checked."""
    where = f"{type(rule).__name__}.reuse()"
    with _scope(layout):
        result: object = rule.reuse(grads, state)
    direction, new_state = _pair(where, result, "direction")
    return _checked_tensors(where, "the direction", direction, perturbed), new_state


def first_pass_noise(
    rule: PerturbationRule,
    layout: RankLayout | None,
    perturbed: list[Tensor],
    state: RuleState,
    generator: torch.Generator,
    smooth: float,
    per_element: bool,
) -> list[list[Tensor]]:
    """The first pass's ``Delta`` terms, to add to ``phi`` in order: SATM's smoothing noise
    (``smooth > 0``), then the rule's own (Bayesian SAM), both from ``generator``; with a
    layout, each sharded tensor's noise is its rows of the whole set's."""
    rows = None
    if layout is not None:
        rows = [layout.noise_rows(k) for k in range(len(perturbed))]
    parts = []
    if smooth > 0:
        parts.append(smoothing_noise(perturbed, smooth, generator, rows, per_element=per_element))
    if rule.draws_noise:
        z = standard_normal(perturbed, generator, rows)
        where = f"{type(rule).__name__}.first_pass_noise()"
        noise = rule.first_pass_noise([p.detach() for p in perturbed], z, state)
        parts.append(_checked_tensors(where, "the noise", noise, perturbed))
    return parts
