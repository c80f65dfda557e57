"""The step plan: every inner step's minibatch and augmentation randomness, fixed in advance.

A sharpness-aware step evaluates the outer objective twice (at ``phi`` and ``phi + eps``), and
trajectory reusing restarts the second unroll mid-way. Both must replay *the same* inner problem:
the same minibatch indices and the same augmentation at every step. The plan draws all of it once,
from its own generator (never torch's global RNG, which MTT's helpers reseed), before the first
pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Augmentation(Protocol):
    """A replayable augmentation: randomness drawn by ``sample``, applied by ``apply``."""

    def sample(self, batch_shape: tuple[int, ...], generator: torch.Generator) -> Any:
        """Draw the randomness for one batch of shape ``[B, C, H, W]`` from ``generator``."""
        ...

    def apply(self, x: Tensor, draw: Any) -> Tensor:
        """Apply the drawn transformation to ``x``; deterministic, differentiable in ``x``."""
        ...


@dataclass(frozen=True)
class StepPlan:
    """Per inner step ``i``: ``indices[i]`` (a ``LongTensor`` of synthetic sample indices, on
    CPU) and ``draws[i]`` (the augmentation's randomness, or None).

    Build with `mtt` (MTT's schedule) or directly from explicit indices.
    """

    indices: tuple[Tensor, ...]
    draws: tuple[Any, ...]

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.draws):
            raise ValueError(
                f"indices ({len(self.indices)} steps) and draws ({len(self.draws)}) differ"
            )

    @property
    def num_steps(self) -> int:
        """``N``, the number of inner steps."""
        return len(self.indices)

    @classmethod
    def mtt(
        cls,
        num_samples: int,
        num_steps: int,
        batch_size: int | None = None,
        *,
        generator: torch.Generator,
        sample_shape: Sequence[int] | None = None,
        augmentation: Augmentation | None = None,
    ) -> StepPlan:
        """MTT's minibatch schedule: when the pool of chunks is empty, a fresh permutation of the
        ``num_samples`` synthetic samples is split into chunks of ``batch_size`` (the last may be
        shorter) and one chunk is taken from the end per step; so every sample is visited once per
        ``ceil(num_samples / batch_size)`` steps.

        Args:
            num_samples: synthetic samples (``classes * ipc``).
            num_steps: ``N = syn_steps``.
            batch_size: ``batch_syn`` (all samples per step when None, MTT's default).
            generator: the only source of randomness.
            sample_shape: shape of one sample ``[C, H, W]`` (needed with ``augmentation``).
            augmentation: drawn once per step for that step's batch shape.
        """
        batch = num_samples if batch_size is None else batch_size
        for name, value in (("num_samples", num_samples), ("num_steps", num_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(batch, int) or not 1 <= batch <= num_samples:
            raise ValueError(
                f"batch_size must be an integer in [1, num_samples={num_samples}], got {batch!r}"
            )
        if augmentation is not None and sample_shape is None:
            raise ValueError("sample_shape is required when an augmentation is given")
        pool: list[Tensor] = []
        indices: list[Tensor] = []
        draws: list[Any] = []
        for _ in range(num_steps):
            if not pool:
                pool = list(torch.split(torch.randperm(num_samples, generator=generator), batch))
            chunk = pool.pop()
            indices.append(chunk)
            if augmentation is None:
                draws.append(None)
            else:
                assert sample_shape is not None
                draws.append(augmentation.sample((len(chunk), *sample_shape), generator))
        return cls(tuple(indices), tuple(draws))
