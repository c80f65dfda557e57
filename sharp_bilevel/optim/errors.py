"""Exceptions raised by sharp_bilevel."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """A closure call produced a NaN or infinite loss or gradient (``nonfinite="raise"``).

    The parameters were restored to their pre-step values before this was raised.
    """


class NoGradientWarning(UserWarning):
    """A closure call left no gradient on any perturbed tensor (it never called ``backward()``
    on a loss that depends on them): the step goes on with zero gradients, which is almost
    always a bug. A warning rather than an error: with ``perturb`` groups a pass may
    legitimately touch only unperturbed tensors, and torch.optim skips ``None`` gradients."""
