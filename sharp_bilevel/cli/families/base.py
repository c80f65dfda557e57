"""`Family`: what one family of objectives adds to the command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ...distill.config import DistillConfig


@dataclass(frozen=True)
class Family:
    """One family of objectives as the command line sees it.

    Attributes:
        title: the ``--help`` group's title (``"trajectory matching (--method mtt|ftd|datm)"``).
        methods: ``{method name: one-line help}`` for ``--method``.
        add_options: adds the family's flags to its argument group.
        check: checks the family's flags that need no data (raises ``ConfigError``).
        config: the ``DistillConfig`` of one run, ``(args, rule name) -> config``.
    """

    title: str
    methods: Mapping[str, str]
    add_options: Callable[[argparse._ArgumentGroup], None]
    check: Callable[[argparse.Namespace], None]
    config: Callable[[argparse.Namespace, str], DistillConfig]
