"""The command line's families of distillation objectives, one module of options each.

A family owns its ``--method`` names, an argument group of its own flags (titled by the family
in ``--help``), the checks of those flags that need no data, and the ``DistillConfig`` of a run.
The common options (data, output, seeds, threads, device, autocast, evaluation) are declared
once in `sharp_bilevel.cli.options`.

Adding a family (gradient/distribution matching: ``dc``, ``dsa``, ``dm``; performance
matching: ``pm``, ``krr``) is one new module that defines a `Family` and one line in
`FAMILIES`.
"""

from __future__ import annotations

from . import trajectory
from .base import Family

#: Every family the command line offers, in ``--help`` order (one line per family).
FAMILIES: tuple[Family, ...] = (trajectory.FAMILY,)


def all_methods() -> dict[str, str]:
    """``{method: help}`` over every family, in registration order."""
    return {name: text for family in FAMILIES for name, text in family.methods.items()}


def family_of(method: str) -> Family:
    """The family whose ``--method`` names include ``method``."""
    for family in FAMILIES:
        if method in family.methods:
            return family
    raise KeyError(f"no family has the method {method!r}")


__all__ = ["FAMILIES", "Family", "all_methods", "family_of"]
