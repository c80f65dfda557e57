"""The name -> rule registry behind ``perturbation="..."``.

Names are case-insensitive; aliases resolve to a canonical name. A registered entry is a factory:
a ``PerturbationRule`` subclass (called with the rule's hyperparameters as keyword arguments) or
any callable returning a ``PerturbationRule``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from .asam import ASAM
from .base import PerturbationRule
from .bsam import BayesianSAM
from .friendly import FriendlySAM
from .gcsam import GCSAM
from .gsam import GSAM
from .looksam import LookSAM
from .none import NoPerturbation
from .sam import SAM
from .smoothed import SmoothedSAM
from .vasso import VaSSO
from .wsam import WSAM

RuleFactory = Callable[..., PerturbationRule]
F = TypeVar("F", bound=RuleFactory)

_FACTORIES: dict[str, RuleFactory] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a perturbation name must be a non-empty string, got {name!r}")
    return name.strip().lower()


@overload
def register_perturbation(
    name: str, rule: None = None, *, aliases: Iterable[str] = (), overwrite: bool = False
) -> Callable[[F], F]: ...
@overload
def register_perturbation(
    name: str, rule: F, *, aliases: Iterable[str] = (), overwrite: bool = False
) -> F: ...
def register_perturbation(
    name: str,
    rule: RuleFactory | None = None,
    *,
    aliases: Iterable[str] = (),
    overwrite: bool = False,
) -> Any:
    """Register a rule under ``name`` (and ``aliases``); usable as a call or a class decorator.

    Examples:
        >>> from dataclasses import dataclass
        >>> from sharp_bilevel.optim.perturbations import PerturbationRule
        >>> @register_perturbation("sign_sam_demo")
        ... @dataclass(frozen=True)
        ... class SignSAM(PerturbationRule):
        ...     rho: float = 0.05
        ...     def ascent(self, params, grads, state, lr):
        ...         return [self.rho * g.sign() for g in grads], state
        >>> "sign_sam_demo" in available_perturbations()
        True

    Raises:
        ValueError: the name or an alias is taken (pass ``overwrite=True`` to replace it).
        TypeError: ``rule`` is not a ``PerturbationRule`` subclass or a callable.
    """
    if rule is None:

        def decorator(factory: F) -> F:
            register_perturbation(name, factory, aliases=aliases, overwrite=overwrite)
            return factory

        return decorator
    if not callable(rule) or isinstance(rule, PerturbationRule):
        raise TypeError(
            f"rule must be a PerturbationRule subclass or a callable returning one, got {rule!r}"
        )
    keys = list(dict.fromkeys([_key(name), *(_key(a) for a in aliases)]))  # drop repeats
    if not overwrite:
        taken = [k for k in keys if k in _FACTORIES or k in _ALIASES]
        if taken:
            raise ValueError(
                f"perturbation name(s) {taken} already registered; pass overwrite=True to replace"
            )
    canonical = keys[0]
    _ALIASES.pop(canonical, None)
    _FACTORIES[canonical] = rule
    for alias in keys[1:]:
        _FACTORIES.pop(alias, None)
        _ALIASES[alias] = canonical
    return rule


def available_perturbations() -> list[str]:
    """Sorted canonical names of the registered rules (aliases not included)."""
    return sorted(_FACTORIES)


def canonical_name(name: str) -> str:
    """The registered name ``name`` resolves to (case, spaces and aliases removed)."""
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in _FACTORIES:
        aliases = ", ".join(f"{a!r} -> {c!r}" for a, c in sorted(_ALIASES.items()))
        raise ValueError(
            f"unknown perturbation {name!r}; known: {available_perturbations()} "
            f"(aliases: {aliases})"
        )
    return key


def _hyperparameters(factory: RuleFactory) -> frozenset[str]:
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        return frozenset(f.name for f in dataclasses.fields(factory) if f.init)
    params = inspect.signature(factory).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in kinds)


def _ignored(factory: RuleFactory) -> frozenset[str]:
    ignored: object = getattr(factory, "ignored_hyperparameters", frozenset())
    return frozenset(ignored) if isinstance(ignored, frozenset) else frozenset()


def rule_parameters(name: str) -> frozenset[str]:
    """Keyword arguments the rule registered as ``name`` accepts (its hyperparameters, and
    those it accepts only to ignore, such as ``rho`` for ``"none"``)."""
    factory = _FACTORIES[canonical_name(name)]
    return _hyperparameters(factory) | _ignored(factory)


def owners_hint(names: Iterable[str], rule: str) -> str:
    """``"; eta is a hyperparameter of 'asam', 'gsam', not of 'sam'"`` for the ``names`` that
    other registered rules have (empty when none has them)."""
    hints = []
    for name in sorted(names):
        owners = [k for k, f in sorted(_FACTORIES.items()) if name in _hyperparameters(f)]
        if owners:
            listed = ", ".join(repr(k) for k in owners)
            hints.append(f"; {name} is a hyperparameter of {listed}, not of {rule!r}")
    return "".join(hints)


def _outside_package_stacklevel() -> int:
    """``stacklevel`` of the first caller outside sharp_bilevel (where a warning should point)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back
    return level


def get_perturbation(
    perturbation: str | PerturbationRule, **hyperparameters: Any
) -> PerturbationRule:
    """Build a rule from its name and hyperparameters, or return a given rule instance as is.

    Hyperparameters a rule accepts only to ignore them (``rho`` for ``"none"``, so that a sweep
    over rules can pass one ``rho``) are dropped, with a ``UserWarning`` unless they are None.

    Raises:
        ValueError: unknown name (the message lists the known ones), bad hyperparameter values,
            or hyperparameters given together with an instance.
        TypeError: a hyperparameter the rule does not have.
    """
    if isinstance(perturbation, PerturbationRule):
        if hyperparameters:
            raise ValueError(
                f"hyperparameters {sorted(hyperparameters)} given with a rule instance "
                f"{perturbation!r}; set them on the instance instead"
            )
        return perturbation
    if not isinstance(perturbation, str):
        raise TypeError(
            f"perturbation must be a name or a PerturbationRule, got {type(perturbation).__name__}"
        )
    name = canonical_name(perturbation)
    factory = _FACTORIES[name]
    for key in sorted(_ignored(factory) & set(hyperparameters)):
        value = hyperparameters.pop(key)
        if value is not None:
            warnings.warn(
                f"perturbation {name!r} has no {key}: {key}={value!r} is ignored",
                UserWarning,
                stacklevel=_outside_package_stacklevel(),
            )
    accepted = _hyperparameters(factory)
    unknown = sorted(set(hyperparameters) - accepted)
    if unknown:
        raise TypeError(
            f"perturbation {name!r} has no hyperparameter(s) {unknown}; "
            f"it accepts {sorted(accepted)}{owners_hint(unknown, name)}"
        )
    rule = factory(**hyperparameters)
    if not isinstance(rule, PerturbationRule):
        raise TypeError(
            f"the factory registered as {name!r} returned {rule!r}, not a PerturbationRule"
        )
    return rule


register_perturbation("none", NoPerturbation, aliases=("mtt", "plain"))
register_perturbation("sam", SAM)
register_perturbation("asam", ASAM)
register_perturbation("gsam", GSAM)
register_perturbation("vasso", VaSSO)
register_perturbation("wsam", WSAM)
register_perturbation("bsam", BayesianSAM, aliases=("bayesian_sam", "bayes_sam"))
register_perturbation("gcsam", GCSAM, aliases=("gc_sam",))
register_perturbation("looksam", LookSAM, aliases=("look_sam", "lsam"))
register_perturbation("fsam", FriendlySAM, aliases=("friendly", "friendly_sam", "friendlysam"))
register_perturbation("ssam", SmoothedSAM, aliases=("smoothed", "smooth", "smoothed_sam"))
