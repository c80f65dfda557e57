"""Peak live saved-for-backward bytes of one objective call (a storage counts once)."""

from __future__ import annotations

import weakref
from typing import Any

import torch


class _Box:
    """Holds a detached alias: holding the tensor with its grad_fn makes reference cycles
    through autograd nodes (GroupNorm's double backward) that are never freed."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()


def peak_saved_bytes(closure: Any) -> int:
    live: dict[int, int] = {}
    refs: dict[int, int] = {}
    state = {"now": 0, "peak": 0}

    def release(key: int) -> None:
        refs[key] -= 1
        if refs[key] == 0:
            state["now"] -= live.pop(key)
            del refs[key]

    def pack(tensor: torch.Tensor) -> _Box:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in live:
            live[key] = storage.nbytes()
            refs[key] = 0
            state["now"] += live[key]
            state["peak"] = max(state["peak"], state["now"])
        refs[key] += 1
        box = _Box(tensor)
        weakref.finalize(box, release, key)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        closure()
    return state["peak"]
