"""The contract every perturbation rule follows.

A rule is a small frozen dataclass: validated hyperparameters as fields, explicit state, and two
pure functions. It never touches ``.grad`` or the parameters: the optimizer perturbs, restores and
steps. With ``phi`` the perturbed tensors and ``g`` the gradient of the outer objective at ``phi``:

* ``init(params) -> state``: the state before the first step (a dict of tensors / lists of tensors);
* ``ascent(params, grads, state, lr) -> (eps, new_state)``: the perturbation ``eps`` added to
  ``phi`` before the second closure call; ``lr`` is the learning rate of the first perturbed
  parameter group this step (for schedules such as GSAM's);
* ``descent(grads, grads_adv, state) -> d``: the update direction handed to the base optimizer,
  from ``g`` and ``g' = grad F(phi + eps)``; the default is ``d = g'`` (SAM and most variants);
* optionally ``wants_second_pass(state)``, ``reuse(grads, state)`` and
  ``after_descent(grads, grads_adv, state)``: rules that skip the second pass on some steps
  (LookSAM) and keep state from ``g'``;
* optionally ``draws_noise = True`` and ``first_pass_noise(params, z, state)``: rules whose
  first pass runs at a random point ``phi + Delta`` (Bayesian SAM), ``Delta`` built from
  standard normal draws ``z`` of the optimizer's seeded generator.

The optimizer commits ``new_state`` only when the step is taken, so a skipped step (non-finite
values, a gate) leaves the rule state as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

#: A rule's state: names mapped to tensors, lists of tensors (aligned with the perturbed
#: parameters) or plain numbers. It is saved in the optimizer's ``state_dict``.
RuleState = dict[str, Any]


class PerturbationRule:
    """Base class of perturbation rules (subclass it as a ``@dataclass(frozen=True)``)."""

    #: Rules whose ``two_pass`` is False ("none") make the optimizer call the closure once.
    two_pass: ClassVar[bool] = True
    #: Rules whose first pass runs at ``phi + first_pass_noise(...)`` (Bayesian SAM).
    draws_noise: ClassVar[bool] = False
    #: Hyperparameters the registry accepts for this rule and drops with a warning.
    ignored_hyperparameters: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the argument and its allowed range for bad values."""

    @property
    def default_smooth(self) -> float:
        """Relative smoothing noise size ``gamma`` used when the optimizer is given none."""
        return 0.0

    def init(self, params: Sequence[Tensor]) -> RuleState:
        """State before the first step (empty by default)."""
        return {}

    def ascent(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], state: RuleState, lr: float
    ) -> tuple[list[Tensor], RuleState]:
        """Return ``(eps, new_state)``: one perturbation tensor per parameter."""
        raise NotImplementedError(f"{type(self).__name__} must implement ascent()")

    def descent(
        self, grads: Sequence[Tensor], grads_adv: Sequence[Tensor], state: RuleState
    ) -> list[Tensor]:
        """Update direction from ``g`` and ``g'``; ``g'`` itself by default."""
        return list(grads_adv)

    def first_pass_noise(
        self, params: Sequence[Tensor], z: Sequence[Tensor], state: RuleState
    ) -> list[Tensor]:
        """``Delta`` added to ``phi`` for the first pass (only when ``draws_noise``), from
        standard normal draws ``z`` shaped like ``params``; removed again before the ascent."""
        raise NotImplementedError(
            f"{type(self).__name__}.draws_noise is True but first_pass_noise() is missing"
        )

    def wants_second_pass(self, state: RuleState) -> bool:
        """Whether this step evaluates the objective at ``phi + eps`` (True by default).

        A rule that answers False on some steps (LookSAM between its ``k``-steps) makes those
        steps cost one closure call; the optimizer then calls ``reuse`` instead of
        ``ascent``/``descent``.
        """
        return True

    def reuse(self, grads: Sequence[Tensor], state: RuleState) -> tuple[list[Tensor], RuleState]:
        """``(d, new_state)`` of a step without a second pass, from ``g`` alone."""
        raise NotImplementedError(
            f"{type(self).__name__}.wants_second_pass() returned False but reuse() is missing"
        )

    def after_descent(
        self, grads: Sequence[Tensor], grads_adv: Sequence[Tensor], state: RuleState
    ) -> RuleState:
        """The state to commit after a two-pass step, from ``g`` and ``g'`` (unchanged by
        default); LookSAM keeps the part of ``g'`` orthogonal to ``g`` here."""
        return state


def is_number(value: object) -> bool:
    """A real ``int`` or ``float`` (bools are refused although they are ints)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_positive(name: str, value: float) -> None:
    """``value`` must be a finite number > 0."""
    if not (is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    """``value`` must be a finite number >= 0."""
    if not (is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_interval(
    name: str, value: float, low: float, high: float, *, low_open: bool = False
) -> None:
    """``value`` must lie in ``[low, high]`` (or ``(low, high]`` when ``low_open``)."""
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")


def check_bool(name: str, value: object) -> None:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_int_at_least(name: str, value: object, least: int) -> None:
    """``value`` must be an int (not a bool) >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
