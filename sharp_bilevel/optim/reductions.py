"""Reductions over a set of tensors, whole-set or per sample.

Every perturbation rule needs sums such as ``<a, b> = sum_k sum(a_k * b_k)`` over the perturbed
tensors. Two scopes exist:

* whole set (``per_sample=False``): one scalar shared by every tensor;
* per sample (``per_sample=True``): the leading dimension of each tensor indexes samples (one
  synthetic image), and each sample gets its own sum, returned with shape ``[n, 1, ..., 1]`` so it
  broadcasts against that tensor. A 0-d tensor is one sample.

Functions return one broadcastable tensor per input tensor, in that tensor's dtype, so callers
can write ``[rho * g / (n + XI) for g, n in zip(grads, norms)]`` for either scope and every
result keeps its parameter's dtype. A whole-set sum accumulates in the promoted dtype of the set
(at least float32) before it is cast back to each tensor's dtype: a float32 scalar beside a
float64 tensor gets a float32 result, a bfloat16 tensor beside float32 ones a bfloat16 result
from a float32 total.

Inside `sharp_bilevel.optim.distributed.RankLayout.scope` (a sharded step), whole-set sums
run over every rank's rows; per-sample sums stay local. User rules that build whole-set
quantities from `reduce_sum`, `dot` and `norm` are therefore exact across ranks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .distributed import current_layout

#: Denominator guard used by every built-in rule (DESIGN.md section 4).
XI = 1e-12


def _sample_sum(t: Tensor) -> Tensor:
    if t.dim() == 0:
        return t
    return t.reshape(t.shape[0], -1).sum(dim=1).reshape((t.shape[0],) + (1,) * (t.dim() - 1))


def reduce_sum(tensors: Sequence[Tensor], per_sample: bool) -> list[Tensor]:
    """Sum of all elements of the set (or of each sample), one broadcastable result per tensor."""
    if per_sample:
        return [_sample_sum(t) for t in tensors]
    if not tensors:
        return []
    acc = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    layout = current_layout()
    if layout is None:
        total = torch.stack([t.sum(dtype=acc) for t in tensors]).sum()
    else:  # a sharded set: the sum over every rank's rows, replicated tensors counted once
        if len(tensors) != len(layout.sharded):
            raise ValueError(
                f"a whole-set sum over ranks needs one tensor per perturbed parameter "
                f"({len(layout.sharded)}), got {len(tensors)}"
            )
        parts = [t.sum(dtype=acc) * layout.weight(k) for k, t in enumerate(tensors)]
        total = layout.all_reduce_sum(torch.stack(parts).sum())
    cast = {dtype: total.to(dtype) for dtype in {t.dtype for t in tensors}}
    return [cast[t.dtype] for t in tensors]


def dot(a: Sequence[Tensor], b: Sequence[Tensor], per_sample: bool) -> list[Tensor]:
    """Inner product ``<a, b>`` over the set (or per sample)."""
    return reduce_sum([x * y for x, y in zip(a, b, strict=True)], per_sample)


def norm(a: Sequence[Tensor], per_sample: bool) -> list[Tensor]:
    """Euclidean norm ``||a||_2`` over the set (or per sample)."""
    return [s.sqrt() for s in dot(a, a, per_sample)]


def centralized(grads: Sequence[Tensor]) -> list[Tensor]:
    r"""Gradient centralisation (Yong et al., 2020): each sample's mean removed.

    $$
    \operatorname{gc}(g)_j = g_j - \frac{1}{d_j} \sum_{i} (g_j)_i
    $$

    for every tensor with more than one dimension (sample $j$ is a slice along the leading
    dimension, of $d_j$ elements: one synthetic image, one output channel of a weight); vectors
    and scalars are returned unchanged. Each sample is its own, so a sharded set needs no
    communication.
    """
    return [
        g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True) if g.dim() > 1 else g for g in grads
    ]
