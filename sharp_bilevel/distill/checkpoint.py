"""Files a run writes and reads: written atomically, read as data only.

* Writing: `atomic_write` (and `atomic_save`, `atomic_write_text` on top of
  it) writes to a temporary file beside the target, fsyncs and moves it into place, so a run
  killed mid-write leaves the previous complete file, never a torn one. Temporaries a killed
  writer left behind are removed by `remove_stale_temporaries` on the next start.
* Reading: `load_data` is ``torch.load(..., weights_only=True)``: tensors, numbers,
  strings and plain containers only. A pickle that would import or call anything (a planted
  payload, a foreign object) is refused with a ``ValueError`` and nothing in it runs. Every
  file sharp_bilevel reads goes through it: checkpoints, ``synthetic.pt``, replay buffers,
  ZCA states.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


class UnreadableFileError(ValueError):
    """A file is not a readable torch file of data (torn, foreign, or carrying code)."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(handle)`` on a temporary file in ``path``'s folder, fsync, ``os.replace``.

    ``os.replace`` is atomic on POSIX and Windows, so ``path`` holds either the previous complete
    file or the new complete one, whatever moment the process dies at. The file gets the mode
    ``open`` would give it, ``0o666 & ~umask`` (``mkstemp`` creates its temporaries 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's umask (read from ``/proc`` where it can be, without changing it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it, then put it back
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` through `atomic_write`."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write UTF-8 ``text`` to ``path`` through `atomic_write`."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def remove_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Delete the temporaries (``.<name>.<random>.tmp``) that killed writers left in ``folder``
    and its subfolders (only those of the file ``name`` when given); returns what was removed.

    Call it when a run starts, before any writer of this process is active.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{name}.*.tmp" if name is not None else ".*.tmp"
    found = folder.glob(pattern) if name is not None else folder.rglob(pattern)
    removed = []
    for path in found:
        if path.is_file() and _TEMPORARY.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def tensors_sha256(tensors: Iterable[Tensor]) -> str:
    """SHA-256 over each tensor's shape, dtype and values, in order."""
    digest = hashlib.sha256()
    for t in tensors:
        flat = t.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_data(path: str | Path, what: str = "torch file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors.

    Args:
        path: the file.
        what: what the file should be, for the error message (``"checkpoint"``).

    Raises:
        FileNotFoundError: no such file.
        UnreadableFileError: (a ``ValueError``) not a torch file, a torn file, or a pickle
            that needs code to load (refused before anything in it runs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = (
                "it holds objects that only code can rebuild, and sharp_bilevel loads data "
                f"only (weights_only=True); nothing in it was run ({reason})"
            )
        raise UnreadableFileError(f"{path} is not a readable {what}: {reason}") from err


def load_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint written by `atomic_save` (data only, see `load_data`)."""
    return load_data(path, "sharp_bilevel checkpoint")


_SYNTHETIC_KEYS = ("images", "labels", "syn_lr", "ema_images")


def save_synthetic(
    path: str | Path,
    images: Tensor,
    labels: Tensor,
    syn_lr: float,
    ema_images: Tensor | None = None,
) -> Path:
    """Write a learned synthetic set as ``synthetic.pt`` (atomically, tensors and a float).

    The file is ``{"images": [n, C, H, W], "labels": [n] or DATM's logits [n, classes],
    "syn_lr": float, "ema_images": [n, C, H, W] or None}``, readable by a plain ``torch.load``.
    """
    return atomic_save(
        {
            "images": images.detach().cpu(),
            "labels": labels.detach().cpu(),
            "syn_lr": float(syn_lr),
            "ema_images": None if ema_images is None else ema_images.detach().cpu(),
        },
        path,
    )


def load_synthetic(path: str | Path) -> dict[str, Any]:
    """Read a ``synthetic.pt`` written by `save_synthetic` (data only).

    Raises:
        ValueError: unreadable, code-carrying, or not the expected keys and types.
    """
    data = load_data(path, "synthetic set")
    if not isinstance(data, dict) or set(data) != set(_SYNTHETIC_KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected the keys {list(_SYNTHETIC_KEYS)}, found {found}")
    for key in ("images", "labels"):
        if not isinstance(data[key], Tensor):
            raise ValueError(f"{path}: {key} must be a tensor, got {type(data[key]).__name__}")
    if not isinstance(data["ema_images"], Tensor | None):
        raise ValueError(f"{path}: ema_images must be a tensor or None")
    data["syn_lr"] = float(data["syn_lr"])
    return data
