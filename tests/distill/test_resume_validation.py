"""Checkpoint and manifest contents are checked field by field before any work (issue 21.5).

Each bad checkpoint is a valid one with one field broken; `distill` must refuse it with a
`CheckpointContentError` naming the file and the field, without running an iteration or
touching the file. Each bad manifest is a valid one with one field broken; both expert loaders
must refuse it with an `ExpertFolderError` naming the file and the field, and a manifest never
makes the loader open a file outside its folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _pipeline_fixtures import CLASSES, config, tiny_data, tiny_experts
from test_expert_store import SETTINGS, Trainer, fake_expert

from sharp_bilevel.cli import app as cli
from sharp_bilevel.distill import expert_store
from sharp_bilevel.distill.checkpoint import CheckpointContentError, load_checkpoint
from sharp_bilevel.distill.expert_store import (
    MANIFEST_NAME,
    ExpertFolderError,
    describe_buffers,
    load_or_train_experts,
)
from sharp_bilevel.distill.experts import save_buffers
from sharp_bilevel.distill.pipeline import distill


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("good") / "ck.pt"
    images, labels = tiny_data()
    distill(config(iterations=2), images, labels, CLASSES, tiny_experts(), checkpoint=path)
    saved: dict[str, Any] = load_checkpoint(path)
    assert "momentum_buffer" in saved["optimizer"]["state"][0]  # the case below breaks it
    return saved


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(saved: dict[str, Any]) -> None:
        *outer, last = field.split(".")
        target = saved
        for key in outer:
            target = target[key]
        target[last] = value

    return change


def _drop(field: str) -> Callable[[dict[str, Any]], None]:
    def drop(saved: dict[str, Any]) -> None:
        del saved[field]

    return drop


def _nan_image(saved: dict[str, Any]) -> None:
    saved["images"][0, 0, 0, 0] = math.nan


def _momentum(saved: dict[str, Any]) -> None:
    saved["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(2, 2)


def _short_history(saved: dict[str, Any]) -> None:
    saved["history"]["loss"] = saved["history"]["loss"][:1]


def _shape(saved: dict[str, Any]) -> None:
    """A consistent checkpoint for 8x4 images (momentum too): only the data's shape differs."""
    saved["images"] = saved["images"][:, :, :4]
    state = saved["optimizer"]["state"][0]
    state["momentum_buffer"] = state["momentum_buffer"][:, :, :4]


GARBAGE_RNG = torch.arange(10, dtype=torch.uint8)

#: case id -> (how the checkpoint is broken, the field the error must name)
BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "negative-iteration": (_set("iteration", -1), "iteration"),
    "float-iteration": (_set("iteration", 2.0), "iteration"),
    "no-optimizer": (_drop("optimizer"), "optimizer"),
    "no-images": (_drop("images"), "images"),
    "images-wrong-shape": (_shape, "images"),
    "images-3d": (lambda s: s.update(images=s["images"][0]), "images"),
    "nan-image": (_nan_image, "images"),
    "labels-one-short": (lambda s: s.update(labels=s["labels"][:-1]), "labels"),
    "nan-syn-lr": (_set("syn_lr", torch.tensor(math.nan)), "syn_lr"),
    "garbage-generator": (_set("generator", GARBAGE_RNG), "generator"),
    "generator-not-a-tensor": (_set("generator", "state"), "generator"),
    "garbage-noise-rng": (
        _set("optimizer.sharp_bilevel.noise_rng", GARBAGE_RNG),
        "optimizer.sharp_bilevel.noise_rng",
    ),
    "momentum-wrong-shape": (_momentum, "optimizer.state[0].momentum_buffer"),
    "optimizer-other-rule": (_set("optimizer.sharp_bilevel.perturbation", "GSAM"), "optimizer"),
    "history-short": (_short_history, "history.loss"),
    "diagnostics-unknown": (_set("diagnostics", {"bogus": 1}), "diagnostics"),
    "diagnostics-text": (_set("diagnostics.loss_scale", "big"), "diagnostics.loss_scale"),
    "diagnostics-none-count": (
        _set("diagnostics.nonfinite_skipped", None),
        "diagnostics.nonfinite_skipped",
    ),
    "negative-seconds": (_set("seconds", -1.0), "seconds"),
    "ema-not-a-dict": (_set("ema", [1]), "ema"),
    "not-a-dict": (lambda s: s.clear(), "config"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_checkpoint_is_refused_naming_file_and_field(
    tmp_path: Path, good_checkpoint: dict[str, Any], case: str
) -> None:
    break_it, field = BROKEN[case]
    saved = torch.load(_save(good_checkpoint, tmp_path / "copy.pt"), weights_only=True)  # a copy
    break_it(saved)
    path = _save(saved, tmp_path / "ck.pt")
    before = path.read_bytes()
    images, labels = tiny_data()
    ran: list[int] = []
    with pytest.raises(CheckpointContentError) as info:
        distill(
            config(iterations=4), images, labels, CLASSES, tiny_experts(), checkpoint=path,
            progress=lambda it, values: ran.append(it),
        )  # fmt: skip
    message = str(info.value)
    assert str(path) in message
    assert f"field {field!r}" in message, message
    assert (info.value.path, info.value.field) == (path, field)
    assert not ran  # refused before any iteration
    assert path.read_bytes() == before


def _save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_cli_reports_a_broken_checkpoint_in_one_line(
    tmp_path: Path, good_checkpoint: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    saved = dict(good_checkpoint, iteration=-1)
    (out / "mtt-none").mkdir(parents=True)
    _save(saved, out / "mtt-none" / "checkpoint.pt")
    argv = ["--out", str(out), "--perturbations", "none", "--quiet", "--iterations", "1"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is not a usable sharp_bilevel checkpoint: field 'iteration'" in err
    assert "Traceback" not in err
    assert not (out / "experts").exists()  # refused before any expert was trained


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "run" / "experts"
    load_or_train_experts(folder, SETTINGS, 2, Trainer(), save_interval=1)
    return folder


def _edit(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = json.loads((folder / MANIFEST_NAME).read_text())
        change(data)
        (folder / MANIFEST_NAME).write_text(json.dumps(data))

    return edit


def _write(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / MANIFEST_NAME).write_text(text) and None


def _symlink(folder: Path) -> None:
    outside = folder.parent.parent / "elsewhere.pt"
    (folder / "replay_buffer_1.pt").replace(outside)
    os.symlink(outside, folder / "replay_buffer_1.pt")


#: case id -> (how the folder's manifest is broken, the field the error must name)
BAD_MANIFESTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "not-json": (_write("{not json"), "not JSON"),
    "not-utf8": (lambda f: (f / MANIFEST_NAME).write_bytes(b"\xff\xfe") and None, "not JSON"),
    "a-list": (_write("[]"), "field '(top level)'"),
    "version": (_edit(lambda d: d.update(version=2)), "field 'version'"),
    "settings": (_edit(lambda d: d.update(settings=[1])), "field 'settings'"),
    "files": (_edit(lambda d: d.update(files="replay_buffer_0.pt")), "field 'files'"),
    "file-entry": (_edit(lambda d: d["files"].__setitem__(0, 3)), "field 'files[0]'"),
    "experts-str": (_edit(lambda d: d["files"][0].update(experts="1")), "field 'files[0].experts'"),
    "experts-zero": (_edit(lambda d: d["files"][1].update(experts=0)), "field 'files[1].experts'"),
    "sha": (_edit(lambda d: d["files"][0].update(sha256=12)), "field 'files[0].sha256'"),
    "name-missing": (_edit(lambda d: d["files"][0].pop("name")), "field 'files[0].name'"),
    "name-twice": (
        _edit(lambda d: d["files"][1].update(name="replay_buffer_0.pt")),
        "field 'files[1].name'",
    ),
    "dot-dot": (_edit(lambda d: d["files"][0].update(name="../../outside.pt")), "files[0].name"),
    "absolute": (_edit(lambda d: d["files"][0].update(name="/etc/passwd")), "files[0].name"),
    "symlink-out": (_symlink, "field 'files[1].name'"),
    "num-experts": (_edit(lambda d: d.update(num_experts=5)), "field 'num_experts'"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_a_bad_manifest_is_refused_naming_file_and_field(tmp_path: Path, case: str) -> None:
    break_it, field = BAD_MANIFESTS[case]
    folder = _folder(tmp_path)
    break_it(folder)
    for load in (
        lambda: load_or_train_experts(folder, SETTINGS, 2, Trainer(), save_interval=1),
        lambda: describe_buffers(folder),
    ):
        with pytest.raises(ExpertFolderError) as info:
            load()
        assert str(folder / MANIFEST_NAME) in str(info.value)
        assert field in str(info.value), str(info.value)


def test_a_manifest_never_makes_the_loader_open_a_file_outside_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outside file is a valid buffer listed with its true hash: before the check it was
    loaded as the first expert."""
    folder = _folder(tmp_path)
    (outside,) = save_buffers([fake_expert(7)], tmp_path / "out", 1)
    outside = outside.replace(tmp_path / "outside.pt")
    sha = expert_store.file_sha256(outside)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["files"][0] = {"name": "../../outside.pt", "experts": 1, "sha256": sha}
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    opened: list[Path] = []

    def spy(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            opened.append(Path(path).resolve())
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(expert_store, "file_sha256", spy(expert_store.file_sha256))
    monkeypatch.setattr(expert_store, "load_buffer_file", spy(expert_store.load_buffer_file))
    monkeypatch.setattr(torch, "load", spy(torch.load))
    for load in (
        lambda: load_or_train_experts(folder, SETTINGS, 2, Trainer(), save_interval=1),
        lambda: describe_buffers(folder),
    ):
        with pytest.raises(ExpertFolderError, match=r"files\[0\]\.name"):
            load()
    assert outside.resolve() not in opened
    assert not opened  # refused while reading the manifest, before any file
