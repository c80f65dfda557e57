"""Checks of user settings that fail early, each naming the setting and its allowed values.

Every check raises `ConfigError`, a ``ValueError`` that carries the setting's name in
``argument`` and the rest of the message in ``detail``, so a front end can say the same thing
in its own words (the command line names ``--lr-img`` where Python code says ``lr_img``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

#: Largest seed a ``torch.Generator`` accepts for every use here (a signed 64-bit int).
SEED_MAX = 2**63 - 1


class ConfigError(ValueError):
    """A setting holds a value it does not allow.

    Attributes:
        argument: the setting's name (``"lr_img"``).
        detail: what is allowed and what was given (``"must be a finite number > 0, got nan"``).
    """

    def __init__(self, argument: str, detail: str) -> None:
        super().__init__(f"{argument} {detail}")
        self.argument = argument
        self.detail = detail


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_int(
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    *,
    optional: bool = False,
) -> None:
    """``value`` must be an int (not a bool) in ``[low, high]`` (or None when ``optional``)."""
    if optional and value is None:
        return
    ok = _is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        if low is not None and high is not None:
            allowed = f"an int in [{low}, {high}]"
        elif low is not None:
            allowed = f"an int >= {low}"
        else:
            allowed = "an int"
        raise ConfigError(name, f"must be {allowed}{' or None' if optional else ''}, got {value!r}")


def check_real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """``value`` must be a finite int or float (not a bool, not a string) within the bounds.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``.
    """
    if optional and value is None:
        return
    ok = _is_real(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            allowed = f"a finite number in {left}{low}, {high}{right}"
        elif low is not None:
            allowed = f"a finite number {'>' if low_open else '>='} {low}"
        elif high is not None:
            allowed = f"a finite number {'<' if high_open else '<='} {high}"
        else:
            allowed = "a finite number"
        raise ConfigError(name, f"must be {allowed}{' or None' if optional else ''}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """``value`` must be True or False."""
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be True or False, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """``value`` must be one of ``choices``."""
    allowed = tuple(choices)
    if value not in allowed:
        raise ConfigError(name, f"must be one of {', '.join(allowed)}; got {value!r}")


def check_seed(name: str, value: Any) -> None:
    """``value`` must be an int in ``[0, 2**63 - 1]`` (what ``torch.Generator`` takes)."""
    check_int(name, value, 0, SEED_MAX)
