"""Keyword routing and argument checks of `SharpBilevelOptimizer`: every argument is checked
before anything is built, and what a user function (a closure, a rule) returns is checked
before it is used, with an error naming the argument and what it must be."""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .perturbations.base import PerturbationRule, is_number
from .perturbations.registry import canonical_name, owners_hint, rule_parameters

Closure = Callable[..., Any]
_NONFINITE_POLICIES = ("raise", "skip")


def _check_options(
    base_optimizer: object,
    closure_options: object,
    perturbation_kwargs: object,
    seed: object,
    nonfinite: object,
) -> bool:
    """Check the constructor's plain options; returns whether ``base_optimizer`` is a class."""
    is_class = isinstance(base_optimizer, type) and issubclass(
        base_optimizer, torch.optim.Optimizer
    )
    if not (is_class or isinstance(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(
            "base_optimizer must be a torch.optim.Optimizer subclass or instance, "
            f"got {base_optimizer!r}"
        )
    for name, mapping in (
        ("closure_options", closure_options),
        ("perturbation_kwargs", perturbation_kwargs),
    ):
        if mapping is not None and not isinstance(mapping, Mapping):
            raise TypeError(f"{name} must be a mapping or None, got {type(mapping).__name__}")
    if seed is not None and not (
        isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= int(seed) < 2**63
    ):
        raise ValueError(f"seed must be an int in [0, 2**63 - 1] or None, got {seed!r}")
    if nonfinite not in _NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}, got {nonfinite!r}")
    return is_class


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _split_kwargs(
    perturbation: str | PerturbationRule,
    base_optimizer: Any,
    kwargs: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route keyword arguments: the rule's hyperparameters to the rule, the rest to the base.

    A name that neither takes is refused here, before anything is built, with what each accepts.
    """
    if isinstance(perturbation, str):
        rule_names, rule = rule_parameters(perturbation), canonical_name(perturbation)
    elif dataclasses.is_dataclass(perturbation):
        # Hyperparameters given beside an instance reach get_perturbation, which refuses them.
        rule_names = frozenset(f.name for f in dataclasses.fields(perturbation))
        rule = type(perturbation).__name__
    else:
        rule_names, rule = frozenset(), type(perturbation).__name__
    is_class = isinstance(base_optimizer, type)
    base_names: frozenset[str] = frozenset()
    open_signature = False  # a base class taking **kwargs
    if is_class:
        parameters = inspect.signature(base_optimizer).parameters.values()
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        base_names = frozenset(p.name for p in parameters if p.kind in named) - {"params"}
        open_signature = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    rule_kwargs: dict[str, Any] = {}
    base_kwargs: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in rule_names:
            if name in base_names:
                raise ValueError(
                    f"{name!r} is both a hyperparameter of the perturbation and an argument of "
                    f"{base_optimizer.__name__}; pass it in perturbation_kwargs or build the base "
                    "optimizer yourself"
                )
            rule_kwargs[name] = value
            continue
        if name in base_names or open_signature:
            base_kwargs[name] = value
            continue
        hint = owners_hint([name], rule)
        if not (is_class or hint):
            base_kwargs[name] = value  # an instance refuses these below, with its own message
            continue
        takes = f"perturbation {rule!r} (which accepts {', '.join(sorted(rule_names)) or 'none'})"
        if is_class:
            base = f"{base_optimizer.__name__} (which accepts {', '.join(sorted(base_names))})"
        else:
            base = "a base_optimizer instance (set its arguments on it)"
        raise TypeError(
            f"unexpected keyword argument {name!r}: not a hyperparameter of {takes} nor an "
            f"argument of {base}{hint}"
        )
    return rule_kwargs, base_kwargs


def _describe(value: object) -> str:
    """``"a tuple of length 2 (list, dict)"``, ``"a Tensor"``: what a user function returned."""
    if isinstance(value, list | tuple):
        items = f" ({', '.join(type(v).__name__ for v in value)})" if len(value) <= 4 else ""
        return f"a {type(value).__name__} of length {len(value)}{items}"
    return f"a {type(value).__name__}"


def _checked_tensors(where: str, what: str, values: object, params: list[Tensor]) -> list[Tensor]:
    """``values`` as a list of tensors shaped, typed and placed like ``params`` (or raise)."""
    if not isinstance(values, list | tuple):
        raise TypeError(
            f"{where} must return {what} as a list with one tensor per perturbed parameter, "
            f"got {_describe(values)}"
        )
    if len(values) != len(params):
        raise ValueError(
            f"{where} returned {len(values)} tensors as {what} for {len(params)} perturbed "
            "parameters"
        )
    for k, (v, p) in enumerate(zip(values, params, strict=True)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{where}: {what}[{k}] must be a tensor, got {_describe(v)}")
        if v.shape != p.shape or v.dtype != p.dtype or v.device != p.device:
            raise ValueError(
                f"{where}: {what}[{k}] has shape {tuple(v.shape)}, {v.dtype} on {v.device}, "
                f"but its parameter has shape {tuple(p.shape)}, {p.dtype} on {p.device}"
            )
    return list(values)


def _check_lr(lr: Any, what: str) -> None:
    """A learning rate must be a finite real number >= 0 (a one-element float tensor too)."""
    value = lr
    if isinstance(lr, Tensor) and lr.numel() == 1 and lr.is_floating_point():
        value = lr.item()
    if not (is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {lr!r}")


def _adopt_groups(
    base: torch.optim.Optimizer, params: Iterable[Any] | None
) -> list[dict[str, Any]]:
    """Take a built optimizer's groups; ``params`` (if given) must hold the same tensors and
    may carry ``perturb`` flags for them."""
    if params is not None:
        given = list(params)
        groups = given if given and isinstance(given[0], dict) else [{"params": given}]
        flags: dict[int, bool] = {}
        for group in groups:
            tensors = (
                [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
            )
            for t in tensors:
                flags[id(t)] = bool(group.get("perturb", True))
        owned = {id(p) for g in base.param_groups for p in g["params"]}
        if set(flags) != owned:
            raise ValueError(
                "params must hold exactly the tensors of the given base_optimizer instance"
            )
        for base_group in base.param_groups:
            values = {flags[id(p)] for p in base_group["params"]}
            if len(values) > 1:
                raise ValueError(
                    "tensors of one base_optimizer param group need the same perturb flag"
                )
            base_group["perturb"] = values.pop() if values else True
    return base.param_groups


def _takes_context(closure: Closure) -> bool:
    try:
        signature = inspect.signature(closure)
    except (TypeError, ValueError):
        return False
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    # A loop, not any(genexpr): a signal landing in a generator's finaliser would be swallowed.
    for parameter in signature.parameters.values():  # noqa: SIM110
        if parameter.kind in positional:
            return True
    return False
