"""The all-or-nothing step's bookkeeping: snapshots of parameters, of the base optimizer's state
and of the rule state, and their exact restoration in place (same dicts, same tensors), so a
step that raises leaves everything as before it, bit for bit (never ``phi - eps``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .perturbations.base import RuleState
from .scaler import _reset_scaler_stage


class _SavedTensor(NamedTuple):
    original: Tensor
    value: Tensor


_StateSnapshot = list[tuple[Any, dict[str, Any], dict[str, Any]]]


def _snapshot_state(state: Mapping[Any, dict[str, Any]]) -> _StateSnapshot:
    """Each entry of a base optimizer's state: its dict, and its values (tensors cloned)."""
    return [
        (
            key,
            entry,
            {
                name: _SavedTensor(v, v.clone()) if isinstance(v, Tensor) else copy.deepcopy(v)
                for name, v in entry.items()
            },
        )
        for key, entry in state.items()
    ]


def _restore_state(state: dict[Any, dict[str, Any]], snapshot: _StateSnapshot) -> None:
    """Put a base optimizer's state back as snapshotted, in place (same dicts and tensors)."""
    kept = {id(key) for key, _, _ in snapshot}
    for key in [k for k in state if id(k) not in kept]:
        del state[key]
    with torch.no_grad():
        for key, entry, values in snapshot:
            entry.clear()
            for name, value in values.items():
                if isinstance(value, _SavedTensor):
                    entry[name] = value.original.copy_(value.value)
                else:
                    entry[name] = value
            state[key] = entry


def _clone_state(state: RuleState) -> RuleState:
    out: RuleState = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            out[key] = value.detach().clone()
        elif isinstance(value, list | tuple):
            out[key] = [v.detach().clone() if isinstance(v, Tensor) else v for v in value]
        else:
            out[key] = value
    return out


def _state_like(state: RuleState, params: Sequence[Tensor]) -> RuleState:
    """Clone a saved rule state onto the devices/dtypes of the perturbed parameters."""
    out = _clone_state(state)
    for key, value in out.items():
        if isinstance(value, list) and len(value) == len(params):
            out[key] = [
                v.to(p.device, p.dtype) if isinstance(v, Tensor) else v
                for v, p in zip(value, params, strict=True)
            ]
    return out


def _copy_into(params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)


def _grads_or_zeros(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]


def _base_step(
    base_optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    saved: list[Tensor],
    scaler: Any,
    scale: float,
) -> None:
    """``base_optimizer.step()`` (through ``scaler`` when ``scale != 1``), all or nothing: if it
    raises (a step hook, say), ``params`` get their ``saved`` values back and the base
    optimizer's state is restored exactly, in place."""
    state_saved = _snapshot_state(base_optimizer.state)
    try:
        if scaler is None or scale == 1.0:
            base_optimizer.step()
        else:  # hand the scaler what it expects: scaled gradients (exact: a power of two)
            for p in params:
                if p.grad is not None:
                    p.grad = p.grad * scale
            scaler.step(base_optimizer)
            scaler.update()
    except BaseException:
        _copy_into(params, saved)
        _restore_state(base_optimizer.state, state_saved)
        _reset_scaler_stage(scaler)
        raise
