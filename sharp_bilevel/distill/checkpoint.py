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
* Checking: `validate_checkpoint` checks a loaded distillation checkpoint field by field
  (`CheckpointContentError` names the file and the field), before anything is restored.
* Agreeing: `agree_on_checkpoint` makes the ranks of a process group compare what each read
  (one all-gather of a hash per rank) so that a missing, older or different copy on one rank
  stops every rank at once with `CheckpointDisagreementError`, instead of a hang.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
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


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
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


class CheckpointContentError(UnreadableFileError):
    """A checkpoint loads as data, but one of its fields is missing or holds an impossible value.

    Attributes:
        path: the checkpoint.
        field: the field (``"iteration"``, ``"optimizer.state[0].momentum_buffer"``).
        detail: what the field must hold and what it holds.
    """

    def __init__(self, path: str | Path, field: str, detail: str) -> None:
        self.path = Path(path)
        self.field = field
        self.detail = detail
        super().__init__(
            f"{path} is not a usable sharp_bilevel checkpoint: field {field!r} {detail}"
        )


#: The fields `validate_checkpoint` requires (``threads`` and ``experts_id`` may be absent).
CHECKPOINT_FIELDS = (
    "config",
    "iteration",
    "images",
    "syn_lr",
    "labels",
    "optimizer",
    "generator",
    "ema",
    "history",
    "diagnostics",
    "seconds",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _generator_state_error(state: object) -> str | None:
    if not isinstance(state, Tensor) or state.dtype != torch.uint8:
        return f"must be a torch.Generator state (a uint8 tensor), got {_describe(state)}"
    try:
        torch.Generator().set_state(state.clone())
    except (RuntimeError, ValueError) as err:
        return f"is not a torch.Generator state ({str(err).splitlines()[0]})"
    return None


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:80]


def validate_checkpoint(saved: Any, path: str | Path) -> dict[str, Any]:
    """Check a loaded distillation checkpoint field by field; return it unchanged.

    Checked: every field of `CHECKPOINT_FIELDS` is there; ``iteration`` is an int ``>= 0``;
    ``images`` a finite float tensor ``[n, C, H, W]``; ``labels`` ``n`` integer labels or
    ``[n, classes]`` finite logits; ``syn_lr`` one finite float; ``optimizer`` a
    `SharpBilevelOptimizer` state whose momentum buffers have their parameter's shape and whose
    noise generator state is valid; ``generator`` a valid ``torch.Generator`` state; ``ema``
    None or a dict; ``history`` lists of ``iteration`` numbers; ``diagnostics`` the
    `RunDiagnostics` counts; ``seconds`` a finite number ``>= 0``.

    Raises:
        CheckpointContentError: (a ``ValueError``) naming the file and the first bad field.
    """

    def bad(field: str, detail: str) -> CheckpointContentError:
        return CheckpointContentError(path, field, detail)

    if not isinstance(saved, dict):
        raise bad("(top level)", f"must be a dict of fields, got {type(saved).__name__}")
    for key in CHECKPOINT_FIELDS:
        if key not in saved:
            raise bad(key, "is missing")
    if not isinstance(saved["config"], dict):
        raise bad("config", f"must be a dict of settings, got {_describe(saved['config'])}")
    iteration = saved["iteration"]
    if not _is_int(iteration) or iteration < 0:
        raise bad("iteration", f"must be an int >= 0, got {_describe(iteration)}")
    images, labels, syn_lr = saved["images"], saved["labels"], saved["syn_lr"]
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise bad("images", f"must be a float tensor [n, C, H, W], got {_describe(images)}")
    if not bool(torch.isfinite(images).all()):
        raise bad("images", f"holds {int((~torch.isfinite(images)).sum())} NaN or inf values")
    hard = isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point()
    soft = isinstance(labels, Tensor) and labels.dim() == 2 and labels.is_floating_point()
    if not (hard or soft) or labels.shape[0] != images.shape[0]:
        raise bad(
            "labels",
            f"must be {images.shape[0]} integer labels or [{images.shape[0]}, classes] logits "
            f"(one per image), got {_describe(labels)}",
        )
    if soft and not bool(torch.isfinite(labels).all()):
        raise bad("labels", "holds NaN or inf values")
    if not isinstance(syn_lr, Tensor) or syn_lr.numel() != 1 or not syn_lr.is_floating_point():
        raise bad("syn_lr", f"must be a one-element float tensor, got {_describe(syn_lr)}")
    if not math.isfinite(float(syn_lr)):
        raise bad("syn_lr", f"must be finite, got {float(syn_lr)}")
    _validate_optimizer(saved["optimizer"], (images, syn_lr, labels), bad)
    if (problem := _generator_state_error(saved["generator"])) is not None:
        raise bad("generator", problem)
    if saved["ema"] is not None and not isinstance(saved["ema"], dict):
        raise bad("ema", f"must be None or a dict, got {_describe(saved['ema'])}")
    history = saved["history"]
    if not isinstance(history, dict):
        raise bad("history", f"must be a dict of lists, got {_describe(history)}")
    for key, values in history.items():
        if not isinstance(values, list) or len(values) != iteration:
            raise bad(
                f"history.{key}", f"must be a list of {iteration} numbers (one per iteration)"
            )
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise bad(f"history.{key}", "must hold numbers only")
    _validate_diagnostics(saved["diagnostics"], bad)
    if not _is_real(saved["seconds"]) or saved["seconds"] < 0:
        raise bad("seconds", f"must be a finite number >= 0, got {_describe(saved['seconds'])}")
    return saved


def _validate_optimizer(
    state: Any, params: tuple[Tensor, ...], bad: Callable[[str, str], CheckpointContentError]
) -> None:
    """An optimizer ``state_dict``: its parts, momentum shapes and noise generator state."""
    if not isinstance(state, dict):
        raise bad("optimizer", f"must be an optimizer state dict, got {_describe(state)}")
    for key, kind in (("state", dict), ("param_groups", list), ("sharp_bilevel", dict)):
        if not isinstance(state.get(key), kind):
            raise bad(
                f"optimizer.{key}", f"must be a {kind.__name__}, got {_describe(state.get(key))}"
            )
    for index, param in enumerate(params):
        entry = state["state"].get(index)
        buffer = entry.get("momentum_buffer") if isinstance(entry, dict) else None
        if isinstance(buffer, Tensor) and buffer.shape != param.shape:
            raise bad(
                f"optimizer.state[{index}].momentum_buffer",
                f"must have its parameter's shape {tuple(param.shape)}, got {_describe(buffer)}",
            )
    extra = state["sharp_bilevel"]
    if "noise_rng" not in extra:
        raise bad("optimizer.sharp_bilevel.noise_rng", "is missing")
    if (problem := _generator_state_error(extra["noise_rng"])) is not None:
        raise bad("optimizer.sharp_bilevel.noise_rng", problem)


def _validate_diagnostics(value: Any, bad: Callable[[str, str], CheckpointContentError]) -> None:
    from .diagnostics import RunDiagnostics

    fields = dataclasses.fields(RunDiagnostics)
    names = {f.name for f in fields}
    optional = {f.name for f in fields if f.default is None}  # e.g. loss_scale without a scaler
    if not isinstance(value, dict) or set(value) - names:
        got = sorted(value) if isinstance(value, dict) else _describe(value)
        raise bad("diagnostics", f"must be a dict with the keys {sorted(names)}, got {got}")
    for key, number in value.items():
        if not _is_real(number) and not (number is None and key in optional):
            raise bad(f"diagnostics.{key}", f"must be a finite number, got {_describe(number)}")


class CheckpointDisagreementError(ValueError):
    """The ranks of a process group did not read the same checkpoint.

    Attributes:
        path: the checkpoint path every rank was given.
        readings: rank -> what it read (``"no such file"``, ``"iteration 4, SHA-256 ..."``, or
            the error it met), one sentence each.
    """

    def __init__(self, path: Path, readings: dict[int, str], groups: list[list[int]]) -> None:
        self.path = path
        self.readings = readings
        said = "; ".join(
            f"{'ranks' if len(g) > 1 else 'rank'} {', '.join(map(str, g))}: {readings[g[0]]}"
            for g in groups
        )
        super().__init__(
            f"the ranks did not read the same checkpoint {path} ({said}); every rank must resume "
            "from the same file: use a folder all ranks share, copy rank 0's file to every node, "
            "or remove it on every rank to start over"
        )


def _reading(
    path: Path, load: Callable[[Path], Any]
) -> tuple[dict[str, Any], Any, BaseException | None]:
    """What this rank read at ``path``: a short record to compare, ``load``'s result, its error."""
    if not path.exists():
        return {"found": False, "iteration": None, "sha256": None, "error": None}, None, None
    record: dict[str, Any] = {"found": True, "iteration": None, "sha256": None, "error": None}
    try:
        record["sha256"] = file_sha256(path)
        result = load(path)
    except Exception as err:
        record["error"] = f"{type(err).__name__}: {err}"
        return record, None, err
    iteration = result.get("iteration") if isinstance(result, dict) else None
    record["iteration"] = iteration if _is_int(iteration) else None
    return record, result, None


def _say(record: dict[str, Any], first: dict[str, Any]) -> str:
    if not record["found"]:
        return "no such file"
    if record["error"] is not None:
        return f"cannot use it ({record['error']})"
    said = f"iteration {record['iteration']}, SHA-256 {str(record['sha256'])[:12]}"
    if first is record or not first["found"] or first["error"] is not None:
        return said
    if record["iteration"] != first["iteration"]:
        older = (record["iteration"] or 0) < (first["iteration"] or 0)
        return f"{said} ({'older' if older else 'newer'} than rank 0's)"
    return f"{said} (same iteration as rank 0, different contents)"


def agree_on_checkpoint(
    path: str | Path,
    load: Callable[[Path], Any] = load_checkpoint,
    process_group: Any = None,
) -> Any:
    """Read the checkpoint at ``path`` on every rank of ``process_group`` and make sure all ranks
    read the same one, before anything else of the resume runs.

    Each rank records what it found: no file, or the SHA-256 of the file's bytes with the
    ``iteration`` that ``load(path)`` returned, or the error ``load`` raised. One
    ``all_gather_object`` of these short records follows (every rank must call this function,
    before any other collective of the run). Then either

    * every rank read the same: each returns ``load``'s result (None when no rank has the file)
      or raises ``load``'s error, exactly as one process would; or
    * they differ: every rank raises the same `CheckpointDisagreementError`, which names the
      file and what each rank read (no file, an older or newer iteration, the same iteration
      with other contents, an error), within the time of one all-gather, never a hang.

    Without ``process_group`` (or on one rank) this is ``load(path)``, None when the file is
    missing. The pipeline calls it on every resume; a library user writing their own loop over
    ranks calls it the same way, with their own ``load``.

    Args:
        path: the checkpoint (a shared file, or each rank's own copy at the same path).
        load: reads and checks the file; `load_checkpoint` by default.
        process_group: a ``torch.distributed`` group (``dist.group.WORLD`` for all ranks).

    Raises:
        CheckpointDisagreementError: the ranks read different things (on every rank).
    """
    path = Path(path)
    record, result, error = _reading(path, load)
    if process_group is None or dist.get_world_size(group=process_group) == 1:
        every: list[Any] = [record]
    else:
        every = [None] * dist.get_world_size(group=process_group)
        dist.all_gather_object(every, record, group=process_group)
    if all(r == record for r in every):
        if error is not None:
            raise error
        return result
    records: list[dict[str, Any]] = every
    readings = {rank: _say(r, records[0]) for rank, r in enumerate(records)}
    groups: list[list[int]] = []
    for rank, r in enumerate(records):
        same = next((g for g in groups if records[g[0]] == r), None)
        if same is None:
            groups.append([rank])
        else:
            same.append(rank)
    raise CheckpointDisagreementError(path, readings, groups) from error
