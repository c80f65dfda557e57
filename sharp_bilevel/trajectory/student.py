"""A functional student: any ``nn.Module`` driven by one flat parameter vector.

MTT's student is a ``ReparamModule`` that rewrites the module's parameters into one
``flat_param``. Here the user's module is left untouched: the flat vector is split into views in
``net.parameters()`` order (the order MTT's expert buffers use) and handed to
``torch.func.functional_call``. So ``flatten(snapshot)`` of an expert epoch is the student's
vector, one to one.

Buffers (batch-norm running statistics) are read from the module and copied at the start of each
unroll (`FunctionalStudent.fresh_buffers`); the in-place statistic updates of a training
forward land in that copy and are discarded, so the module never changes and both passes of a
step (and any rerun) see the same inner problem. In train mode batch norm normalises with batch
statistics, so the running values never enter the unroll anyway. Instance norm (MTT's default,
``GroupNorm(C, C)``) has no buffers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call


@runtime_checkable
class Student(Protocol):
    """What the unroll needs from a student: a flat layout and a forward ``f(x; w)``."""

    num_params: int
    dtype: torch.dtype

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-parameter tensors (``net.parameters()`` order) -> ``[num_params]``."""
        ...

    def fresh_buffers(self) -> dict[str, Tensor]:
        """Buffers for one unroll (copies; may be empty)."""
        ...

    def __call__(self, x: Tensor, flat: Tensor, buffers: dict[str, Tensor] | None = None) -> Tensor:
        """The network's output at parameters ``flat``."""
        ...


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
        self.dtype = named[0][1].dtype

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


class ReparamStudent:
    """MTT's ``ReparamModule`` student (``net(x, flat_param=w)``), used as it is.

    The module already holds one ``flat_param`` of length ``P``; expert snapshots flatten by
    concatenation in the wrapped network's ``parameters()`` order, as MTT's ``distill.py`` does.
    Its buffers are not reparametrised by MTT: a batch-norm student updates them in place.
    """

    def __init__(self, module: nn.Module) -> None:
        flat = getattr(module, "flat_param", None)
        if not isinstance(flat, Tensor) or flat.dim() != 1:
            raise TypeError("module must be MTT's ReparamModule (with a 1-D flat_param)")
        self.module = module
        self.num_params = flat.numel()
        self.dtype = flat.dtype

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if flat.numel() != self.num_params:
            raise ValueError(
                f"the tensors hold {flat.numel()} values, the student has {self.num_params} "
                "parameters"
            )
        return flat

    def fresh_buffers(self) -> dict[str, Tensor]:
        return {}

    def __call__(self, x: Tensor, flat: Tensor, buffers: dict[str, Tensor] | None = None) -> Tensor:
        out: Tensor = self.module(x, flat_param=flat)
        return out


def as_student(net: nn.Module | Student) -> Student:
    """A ``Student`` for ``net``: MTT's ``ReparamModule`` as is, any other module functionally."""
    if isinstance(net, FunctionalStudent | ReparamStudent):
        return net
    if isinstance(net, nn.DataParallel):  # MTT's multi-GPU wrapper: drive the inner module
        return as_student(net.module)
    original = getattr(net, "_orig_mod", None)
    if isinstance(net, nn.Module) and isinstance(original, nn.Module):
        # torch.compile(net): functional calls through the wrapper would recompile (or fall back
        # to eager) on every new flat vector; drive the original module and say what compiles.
        warnings.warn(
            "a torch.compile'd network was given as the student: it is driven through its "
            "original module (eager); pass compile_inner=True to the objective to compile the "
            "inner steps that need no graph",
            UserWarning,
            stacklevel=2,
        )
        return as_student(original)
    if isinstance(net, nn.Module):
        if isinstance(getattr(net, "flat_param", None), Tensor) and hasattr(net, "module"):
            return ReparamStudent(net)
        return FunctionalStudent(net)
    if isinstance(net, Student):
        return net
    raise TypeError(f"expected an nn.Module or a Student, got {type(net).__name__}")
