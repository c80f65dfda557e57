"""A folder of expert buffers that knows what it holds: ``manifest.json`` beside the files.

MTT's ``replay_buffer_{n}.pt`` files say nothing about how they were made, so a rerun with
other settings would silently distil against stale experts, and a run killed between two files
would silently use fewer. The manifest records the settings the experts were trained with, how
many there are, and a SHA-256 per file. It is rewritten atomically after every buffer file, so
it never lists a file that is not complete.

`load_or_train_experts` loads what a folder holds when the settings match, trains only the
missing experts (expert ``k`` is seeded by its index, so a resumed folder equals an
uninterrupted one), and refuses with `ExpertSettingsError`, naming each differing setting,
when the folder was made with other settings. `ExpertManifest.identity` is the hash a
distillation checkpoint records, so a run never resumes against other experts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .checkpoint import atomic_write_text
from .checkpoint import file_sha256 as file_sha256  # its home before 0.x: kept importable
from .experts import Expert, load_buffer_file, save_buffers
from .validation import ConfigError

MANIFEST_NAME = "manifest.json"
_VERSION = 1


class ExpertFolderError(ValueError):
    """An expert folder's files do not agree with its manifest (or it has none)."""


class ExpertSettingsError(ConfigError):
    """A folder's experts were made with other settings.

    Attributes:
        changes: setting name -> ``(recorded value, requested value)``.
    """

    def __init__(self, folder: Path, changes: Mapping[str, tuple[Any, Any]]) -> None:
        self.changes = dict(changes)
        said = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in self.changes.items())
        super().__init__(
            next(iter(self.changes)),
            f"differs from the experts in {folder}, which were trained with {said}; retrain "
            "them (CLI: --no-resume) or write to another folder",
        )


@dataclass(frozen=True)
class BufferFile:
    """One ``replay_buffer_{n}.pt``: its name, how many experts it holds, its SHA-256."""

    name: str
    experts: int
    sha256: str


@dataclass(frozen=True)
class ExpertManifest:
    """What an expert folder holds: the training settings and the files, in order."""

    settings: dict[str, Any]
    files: tuple[BufferFile, ...] = ()

    @property
    def num_experts(self) -> int:
        """Experts in all listed files."""
        return sum(f.experts for f in self.files)

    def identity(self, count: int | None = None) -> str:
        """SHA-256 naming the first ``count`` experts (all when None) and their settings."""
        count = self.num_experts if count is None else count
        used, total = [], 0
        for f in self.files:
            if total >= count:
                break
            used.append([f.name, f.experts, f.sha256])
            total += f.experts
        text = json.dumps(
            {"settings": self.settings, "files": used, "count": count}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (also what ``report.json`` records)."""
        return {
            "version": _VERSION,
            "settings": self.settings,
            "num_experts": self.num_experts,
            "files": [vars(f) for f in self.files],
        }


def _manifest_error(path: Path, field: str, detail: str) -> ExpertFolderError:
    return ExpertFolderError(f"{path} is not a readable expert manifest: field {field!r} {detail}")


def listed_path(folder: str | Path, name: str) -> Path:
    """``folder / name`` for a file a manifest lists, refused unless it stays inside ``folder``.

    ``name`` must be a relative path without ``..`` (neither absolute, nor with a drive), and
    the resolved path (symbolic links followed) must lie inside the resolved ``folder``.

    Raises:
        ExpertFolderError: the path leaves the folder.
    """
    folder = Path(folder)
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (
        not name
        or PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
        or ".." in parts
    ):
        raise ExpertFolderError(
            f"{name!r} is not a plain relative path inside {folder} (absolute paths and '..' "
            "are refused)"
        )
    target = (folder / name).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise ExpertFolderError(
            f"{name!r} resolves to {target}, outside {folder} (a symbolic link?): refused"
        )
    return folder / name


def _parse_manifest(path: Path, data: Any) -> ExpertManifest:
    """Check a manifest's JSON field by field (`ExpertFolderError` naming the first bad one)."""
    if not isinstance(data, dict):
        raise _manifest_error(path, "(top level)", f"must be an object, got {type(data).__name__}")
    if data.get("version") != _VERSION:
        raise _manifest_error(path, "version", f"must be {_VERSION}, got {data.get('version')!r}")
    if not isinstance(data.get("settings"), dict):
        raise _manifest_error(path, "settings", "must be an object of settings")
    listed = data.get("files")
    if not isinstance(listed, list):
        raise _manifest_error(path, "files", f"must be a list, got {type(listed).__name__}")
    files, names = [], set()
    for i, f in enumerate(listed):
        if not isinstance(f, dict):
            raise _manifest_error(path, f"files[{i}]", "must be an object")
        name, count, sha = f.get("name"), f.get("experts"), f.get("sha256")
        if not isinstance(name, str) or name in names:
            raise _manifest_error(
                path, f"files[{i}].name", f"must be a new file name, got {name!r}"
            )
        try:
            listed_path(path.parent, name)
        except ExpertFolderError as err:
            raise _manifest_error(path, f"files[{i}].name", str(err)) from None
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise _manifest_error(
                path, f"files[{i}].experts", f"must be an int >= 1, got {count!r}"
            )
        if not isinstance(sha, str) or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
            raise _manifest_error(
                path, f"files[{i}].sha256", f"must be 64 lowercase hex digits, got {sha!r}"
            )
        names.add(name)
        files.append(BufferFile(name, count, sha))
    total = sum(f.experts for f in files)
    if "num_experts" in data and data["num_experts"] != total:
        raise _manifest_error(
            path,
            "num_experts",
            f"must be {total} (the files' experts), got {data['num_experts']!r}",
        )
    return ExpertManifest(data["settings"], tuple(files))


def read_manifest(folder: str | Path) -> ExpertManifest | None:
    """The folder's manifest, or None when it has none.

    Every field is checked, and every listed file must stay inside the folder (`listed_path`).

    Raises:
        ExpertFolderError: (a ``ValueError``) not valid JSON, or a field of the wrong form
            (named in the message with the file).
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExpertFolderError(
            f"{path} is not a readable expert manifest: not JSON ({err})"
        ) from None
    return _parse_manifest(path, data)


def write_manifest(folder: str | Path, manifest: ExpertManifest) -> Path:
    """Write ``manifest.json`` atomically."""
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    return atomic_write_text(text, Path(folder) / MANIFEST_NAME)


def _buffer_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("replay_buffer_*.pt"))


def clear_experts(folder: str | Path) -> None:
    """Remove the buffer files and the manifest of ``folder`` (nothing else)."""
    folder = Path(folder)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for path in _buffer_paths(folder) if folder.is_dir() else []:
        path.unlink()


def _load_listed(folder: Path, manifest: ExpertManifest) -> list[Expert]:
    experts: list[Expert] = []
    for f in manifest.files:
        path = listed_path(folder, f.name)
        if not path.is_file():
            raise ExpertFolderError(f"{path} is listed in {folder / MANIFEST_NAME} but missing")
        if file_sha256(path) != f.sha256:
            raise ExpertFolderError(
                f"{path} changed since {MANIFEST_NAME} was written (SHA-256 differs): "
                "retrain the experts (CLI: --no-resume)"
            )
        loaded = load_buffer_file(path)
        if len(loaded) != f.experts:
            raise ExpertFolderError(
                f"{path} holds {len(loaded)} experts, the manifest says {f.experts}"
            )
        experts.extend(loaded)
    return experts


def describe_buffers(folder: str | Path) -> tuple[list[Expert], ExpertManifest]:
    """Load a folder of buffers made elsewhere (MTT's, say): verified against its manifest when
    it has one, otherwise described by a manifest of the files' hashes (settings unknown)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None:
        return _load_listed(folder, manifest), manifest
    paths = sorted(_buffer_paths(folder), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not paths:
        raise FileNotFoundError(f"no replay_buffer_{{n}}.pt files in {folder}")
    experts: list[Expert] = []
    files = []
    for path in paths:
        loaded = load_buffer_file(path)
        experts.extend(loaded)
        files.append(BufferFile(path.name, len(loaded), file_sha256(path)))
    return experts, ExpertManifest({"source": str(folder)}, tuple(files))


def load_or_train_experts(
    folder: str | Path,
    settings: Mapping[str, Any],
    count: int,
    train_one: Callable[[int], Expert],
    *,
    save_interval: int = 10,
) -> tuple[list[Expert], ExpertManifest]:
    """``count`` experts made with ``settings``, loaded from ``folder`` or trained into it.

    Args:
        folder: the expert folder (created if missing).
        settings: JSON-able values that determine the experts (data, network, epochs, lr, ...).
        count: experts wanted; a folder holding more gives its first ``count``.
        train_one: ``train_one(k)`` trains expert ``k`` (seeded by ``k``).
        save_interval: experts per ``replay_buffer_{n}.pt`` (MTT's 10).

    Raises:
        ExpertSettingsError: the folder's manifest records other settings.
        ExpertFolderError: buffer files without a manifest (made elsewhere, or by an older
            version), or a listed file that is missing or changed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, Any] = json.loads(json.dumps(dict(settings)))  # as it will be compared
    manifest = read_manifest(folder)
    if manifest is None:
        if _buffer_paths(folder):
            raise ExpertFolderError(
                f"{folder} holds replay_buffer files but no {MANIFEST_NAME}, so what they were "
                "trained with is unknown; retrain them (CLI: --no-resume) or use them as they "
                "are (CLI: --buffers FOLDER)"
            )
        manifest = ExpertManifest(wanted)
    changes = {
        k: (manifest.settings.get(k), wanted.get(k))
        for k in sorted(manifest.settings.keys() | wanted.keys())
        if manifest.settings.get(k) != wanted.get(k)
    }
    if changes:
        raise ExpertSettingsError(folder, changes)
    experts = _load_listed(folder, manifest)
    files = list(manifest.files)
    for k in range(len(experts), count):
        experts.append(train_one(k))
        if (k + 1) % save_interval and k + 1 != count:
            continue
        index = k // save_interval
        first = index * save_interval
        (path,) = save_buffers(experts[first : k + 1], folder, save_interval, start_index=index)
        entry = BufferFile(path.name, k + 1 - first, file_sha256(path))
        files = [*files[:index], entry]
        manifest = ExpertManifest(wanted, tuple(files))
        write_manifest(folder, manifest)
    return experts[:count], manifest
