"""A functional student: any ``nn.Module`` driven by one flat parameter vector.

MTT's student is a ``ReparamModule`` that rewrites the module's parameters into one
``flat_param``. Here the user's module is left untouched: the flat vector is split into views in
``net.parameters()`` order (the order MTT's expert buffers use) and handed to
``torch.func.functional_call``. So ``flatten(snapshot)`` of an expert epoch is the student's
vector, one to one.

Buffers (batch-norm running statistics) are read from the module and copied at the start of each
unroll (:meth:`FunctionalStudent.fresh_buffers`); the in-place statistic updates of a training
forward land in that copy and are discarded, so the module never changes and both passes of a
step (and any rerun) see the same inner problem. In train mode batch norm normalises with batch
statistics, so the running values never enter the unroll anyway. Instance norm (MTT's default,
``GroupNorm(C, C)``) has no buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call


class FunctionalStudent:
    """Run ``module`` with parameters taken from a flat vector ``w`` of length ``num_params``.

    Args:
        module: the network; its parameters fix the layout ``(name, shape)`` of ``w`` in
            ``module.named_parameters()`` order. It is never modified.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2)
        >>> student = FunctionalStudent(net)
        >>> w = student.flat_parameters()
        >>> student.num_params
        8
        >>> torch.allclose(student(torch.ones(1, 3), w), net(torch.ones(1, 3)))
        True
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        named = list(module.named_parameters())
        if not named:
            raise ValueError("module has no parameters to drive")
        self.module = module
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (``net.parameters()`` order) into ``[num_params]``."""
        if len(tensors) != len(self.shapes):
            raise ValueError(
                f"expected {len(self.shapes)} tensors (one per parameter of the network), "
                f"got {len(tensors)}"
            )
        for i, (t, shape) in enumerate(zip(tensors, self.shapes, strict=True)):
            if t.shape != shape:
                raise ValueError(
                    f"tensor {i} ({self.names[i]}) has shape {tuple(t.shape)}, the network "
                    f"expects {tuple(shape)}"
                )
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` shaped like the module's parameters, keyed by name."""
        if flat.dim() != 1 or flat.numel() != self.num_params:
            raise ValueError(
                f"flat parameters must have shape [{self.num_params}], got {tuple(flat.shape)}"
            )
        chunks = torch.split(flat, self.numels)
        return {
            name: chunk.view(shape)
            for name, chunk, shape in zip(self.names, chunks, self.shapes, strict=True)
        }

    def flat_parameters(self) -> Tensor:
        """The module's current parameters as a detached flat vector (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).clone()

    def fresh_buffers(self) -> dict[str, Tensor]:
        """Copies of the module's buffers, for one unroll."""
        return {name: b.detach().clone() for name, b in self.module.named_buffers()}

    def __call__(self, x: Tensor, flat: Tensor, buffers: dict[str, Tensor] | None = None) -> Tensor:
        """``module(x)`` with parameters ``unflatten(flat)``, differentiable in both."""
        state = {**(self.fresh_buffers() if buffers is None else buffers), **self.unflatten(flat)}
        out: Tensor = functional_call(self.module, state, (x,))
        return out
