"""Inner optimizers for the unroll: MTT's plain SGD, or any torchopt functional optimizer.

Every inner optimizer is written as a *unit-rate direction* ``u_i`` and the learnable rate
``alpha`` (MTT's ``syn_lr``) scales it: ``w_{i+1} = w_i + alpha * u_i``. For SGD ``u_i = -g_i``;
for torchopt transforms ``u_i`` is the transform's update at learning rate 1 (momentum SGD:
``-buf_i``; Adam: ``-m_hat / (sqrt(v_hat) + eps)``). Writing it this way makes the first-order lr
gradient (SATM Eq. 10) the same formula for every inner optimizer:
``dL/dalpha ~= <dL/dw_N, sum_i u_i>``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor
from torch.utils._pytree import tree_map


@runtime_checkable
class InnerOptimizer(Protocol):
    """``init(w) -> state`` and ``direction(grad, state, w) -> (u, new_state)``, differentiable."""

    def init(self, w: Tensor) -> Any:
        """State before the first inner step."""
        ...

    def direction(self, grad: Tensor, state: Any, w: Tensor) -> tuple[Tensor, Any]:
        """The unit-rate update ``u`` (``w <- w + alpha * u``) and the new state."""
        ...


class PlainSGD:
    """MTT's inner step: ``w_{i+1} = w_i - alpha * g_i`` (no momentum, no weight decay)."""

    def init(self, w: Tensor) -> Any:
        return None

    def direction(self, grad: Tensor, state: Any, w: Tensor) -> tuple[Tensor, Any]:
        return -grad, state

    def __repr__(self) -> str:
        return "PlainSGD()"


class TorchoptInner:
    """A torchopt gradient transformation unrolled differentiably (``inplace=False``).

    Build the transform at learning rate 1; the learnable ``alpha`` scales its updates.

    Args:
        transform: e.g. ``torchopt.sgd(lr=1.0, momentum=0.9)`` or ``torchopt.adam(lr=1.0)``.

    Examples:
        >>> import torchopt
        >>> inner = TorchoptInner(torchopt.sgd(lr=1.0, momentum=0.9))
    """

    def __init__(self, transform: Any) -> None:
        if not (hasattr(transform, "init") and hasattr(transform, "update")):
            raise TypeError(
                "transform must be a torchopt GradientTransformation (with init and update), "
                f"got {transform!r}"
            )
        self.transform = transform

    def init(self, w: Tensor) -> Any:
        return self.transform.init(w)

    def direction(self, grad: Tensor, state: Any, w: Tensor) -> tuple[Tensor, Any]:
        update, new_state = self.transform.update(grad, state, params=w, inplace=False)
        return update, new_state

    def __repr__(self) -> str:
        return f"TorchoptInner({self.transform!r})"


def detach_state(state: Any) -> Any:
    """The same state with every tensor detached (for steps run without graph)."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, state)
