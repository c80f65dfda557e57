"""Expert buffer files: MTT's ``replay_buffer_{n}.pt``, written and read both ways.

A buffer file holds ``list[expert]`` written with ``torch.save``, each expert the list of its
parameter snapshots (``expert[e]`` after ``e`` epochs, ``expert[0]`` the initialisation), each
snapshot a list of CPU tensors in ``net.parameters()`` order: exactly what MTT's ``buffer.py``
(and FTD's and DATM's) write and what their ``distill.py`` reads. Files are data
(``weights_only=True``), checked before use, and written atomically.

* `save_buffers`, `load_buffers`, `load_buffer_file`, `mtt_buffer_dir`: the files.
* `experts_fingerprint`: one SHA-256 over a list of experts (checkpoints record it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import atomic_save, load_data, tensors_sha256

__all__ = [
    "Expert",
    "experts_fingerprint",
    "load_buffer_file",
    "load_buffers",
    "mtt_buffer_dir",
    "save_buffers",
]

#: One trajectory: ``expert[epoch][parameter index]``, CPU tensors.
Expert = list[list[Tensor]]

_BUFFER_NAME = re.compile(r"^replay_buffer_(\d+)\.pt$")


def mtt_buffer_dir(buffer_path: str | Path, dataset: str, model: str, *, zca: bool) -> Path:
    """The folder MTT's scripts use: ``{buffer_path}/{dataset}[_NO_ZCA]/{model}``.

    ``_NO_ZCA`` is appended for ``"CIFAR10"``/``"CIFAR100"`` without ZCA (MTT's spelling of the
    data set names; ImageNet subsets are not covered).
    """
    folder = dataset + ("_NO_ZCA" if dataset in ("CIFAR10", "CIFAR100") and not zca else "")
    return Path(buffer_path) / folder / model


def _check_experts(experts: object, where: str) -> list[Expert]:
    """Structure check: a non-empty list of experts, each a non-empty list of non-empty lists
    of tensors, every snapshot of an expert with the shapes of its epoch 0."""
    if not isinstance(experts, (list, tuple)):
        raise ValueError(
            f"{where}: expected a list of experts (list[expert] of list[epoch] of "
            f"list[Tensor]), got {type(experts).__name__}"
        )
    if not experts:
        raise ValueError(f"{where}: holds no experts (an empty list)")
    out: list[Expert] = []
    for i, expert in enumerate(experts):
        if not isinstance(expert, (list, tuple)) or not expert:
            kind = "an empty list" if isinstance(expert, (list, tuple)) else type(expert).__name__
            raise ValueError(f"{where}: expert {i} must be a non-empty list of epochs, got {kind}")
        snapshots: Expert = []
        for e, snap in enumerate(expert):
            if not isinstance(snap, (list, tuple)) or not snap:
                kind = "an empty list" if isinstance(snap, (list, tuple)) else type(snap).__name__
                raise ValueError(
                    f"{where}: expert {i}, epoch {e} must be a non-empty list of tensors, "
                    f"got {kind}"
                )
            for k, t in enumerate(snap):
                if not isinstance(t, Tensor):
                    raise ValueError(
                        f"{where}: expert {i}, epoch {e}, parameter {k} is a "
                        f"{type(t).__name__}, not a Tensor"
                    )
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"{where}: expert {i}, epoch {e}, parameter {k} holds NaN or infinite "
                        "values: that expert diverged or the file is corrupt (retrain it or "
                        "drop it)"
                    )
            if e > 0:
                first = snapshots[0]
                if len(snap) != len(first):
                    raise ValueError(
                        f"{where}: expert {i}, epoch {e} has {len(snap)} tensors but epoch 0 "
                        f"has {len(first)}"
                    )
                for k, (t, t0) in enumerate(zip(snap, first, strict=True)):
                    if t.shape != t0.shape:
                        raise ValueError(
                            f"{where}: expert {i}, epoch {e}, parameter {k} has shape "
                            f"{tuple(t.shape)} but {tuple(t0.shape)} at epoch 0"
                        )
            snapshots.append(list(snap))
        out.append(snapshots)
    return out


def experts_fingerprint(experts: Sequence[Sequence[Sequence[Tensor]]]) -> str:
    """SHA-256 over the trajectories' lengths and every snapshot's shapes, dtypes and values:
    equal fingerprints mean the same experts (a checkpoint records it to refuse others)."""
    lengths = torch.tensor([len(expert) for expert in experts])
    return tensors_sha256([lengths, *(t for expert in experts for snap in expert for t in snap)])


def _own_cpu(t: Tensor) -> Tensor:
    """A detached CPU tensor that owns exactly its storage (torch.save writes whole storages)."""
    t = t.detach().cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _buffer_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for p in directory.iterdir():
        m = _BUFFER_NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_buffers(
    experts: Sequence[Expert],
    directory: str | Path,
    save_interval: int = 10,
    *,
    start_index: int | None = None,
) -> list[Path]:
    """Write experts as MTT's ``replay_buffer_{n}.pt`` files.

    Each file is ``torch.save(list[expert])`` with ``save_interval`` experts; unlike MTT's
    ``buffer.py``, the last, partial file is written too (3 experts, interval 2: two files).
    Tensors are saved as detached CPU tensors. Every file is written to a temporary file in
    ``directory`` and moved into place with ``os.replace``, so a crash never leaves a truncated
    buffer.

    Args:
        experts: ``list[expert]``, see `Expert`.
        directory: created if missing.
        save_interval: experts per file (MTT/FTD/DATM: 10, TESLA: 1).
        start_index: ``n`` of the first file. Default: one past the highest existing
            ``replay_buffer_{n}.pt`` (0 in an empty folder), so a second call appends, as a
            rerun of MTT's script does. With an int, files of the same names are replaced.

    Returns:
        The paths written, in order.
    """
    if isinstance(save_interval, bool) or not isinstance(save_interval, int) or save_interval < 1:
        raise ValueError(f"save_interval must be a positive int, got {save_interval!r}")
    checked = _check_experts(list(experts) if isinstance(experts, Sequence) else experts, "experts")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if start_index is None:
        existing = _buffer_files(directory)
        start_index = existing[-1][0] + 1 if existing else 0
    elif isinstance(start_index, bool) or not isinstance(start_index, int) or start_index < 0:
        raise ValueError(f"start_index must be a non-negative int or None, got {start_index!r}")
    written: list[Path] = []
    for k, first in enumerate(range(0, len(checked), save_interval)):
        chunk = [
            [[_own_cpu(t) for t in snap] for snap in expert]
            for expert in checked[first : first + save_interval]
        ]
        path = directory / f"replay_buffer_{start_index + k}.pt"
        atomic_save(chunk, path)
        written.append(path)
    return written


def load_buffer_file(path: str | Path) -> list[Expert]:
    """Read one ``replay_buffer_{n}.pt`` (``weights_only=True``, onto the CPU) and check it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a torch file, or not ``list[expert]`` of non-empty lists of tensors with
            consistent shapes (the message names the file, expert, epoch and parameter).
    """
    obj = load_data(path, "torch expert buffer")
    return _check_experts(obj, str(path))


def load_buffers(directory: str | Path) -> list[Expert]:
    """All experts of the ``replay_buffer_{n}.pt`` files in ``directory``, in order of ``n``.

    ``n`` is compared as a number (``replay_buffer_10.pt`` after ``replay_buffer_9.pt``).

    Raises:
        FileNotFoundError: no such folder, or no buffer file in it.
        ValueError: a malformed file (see `load_buffer_file`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"expert buffer folder not found: {directory}")
    files = _buffer_files(directory)
    if not files:
        raise FileNotFoundError(f"no replay_buffer_{{n}}.pt files in {directory}")
    experts: list[Expert] = []
    for _, path in files:
        experts.extend(load_buffer_file(path))
    return experts
