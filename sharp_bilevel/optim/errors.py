"""Exceptions raised by sharp_bilevel."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """A closure call produced a NaN or infinite loss or gradient (``nonfinite="raise"``).

    The parameters were restored to their pre-step values before this was raised.
    """
