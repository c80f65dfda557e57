"""The memory measure of every study: peak live bytes of saved-for-backward tensors
(DESIGN.md section 10), which does not depend on the device or the allocator."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class _Box:
    """What the pack hook stores. It holds a detached alias: holding the tensor itself (with its
    grad_fn) forms reference cycles through autograd nodes (seen with GroupNorm's double
    backward) that are never freed. Unpacking restores the grad_fn."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()


@contextmanager
def saved_bytes_meter() -> Iterator[dict[str, int]]:
    """Live bytes of the storages that saved-for-backward tensors keep alive, and their peak.

    A storage counts once however many saved tensors (views, repeats) share it; it stops
    counting when the last saved tensor on it is released (the box's finalizer runs)."""
    meter = {"live": 0, "peak": 0}
    refs: dict[int, int] = {}

    def release(key: int, nbytes: int) -> None:
        refs[key] -= 1
        if refs[key] == 0:
            del refs[key]
            meter["live"] -= nbytes

    def pack(tensor: torch.Tensor) -> _Box:
        box = _Box(tensor)
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key not in refs:
            refs[key] = 0
            meter["live"] += nbytes
            meter["peak"] = max(meter["peak"], meter["live"])
        refs[key] += 1
        weakref.finalize(box, release, key, nbytes)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        yield meter
