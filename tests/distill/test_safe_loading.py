"""Every file sharp_bilevel reads is data: a pickle that carries code never runs (issue 8.1).

Each test plants a payload whose unpickling would create a marker file, hands the file to the
reader that the library or the CLI uses, and checks that the marker does not exist afterwards
and that the error says why the file was refused.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch
from _pipeline_fixtures import CLASSES, config, tiny_data, tiny_experts

from sharp_bilevel import ZCA
from sharp_bilevel.cli import app as cli
from sharp_bilevel.distill.checkpoint import load_checkpoint, load_data, load_synthetic
from sharp_bilevel.distill.expert_store import describe_buffers
from sharp_bilevel.distill.experts import load_buffer_file, load_buffers, save_buffers
from sharp_bilevel.distill.pipeline import distill

SOURCE = Path(__file__).resolve().parents[2] / "sharp_bilevel"


class Payload:
    """Unpickling calls ``os.mkdir(marker)``, which creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def plant(path: Path, marker: Path, *, bare: bool = False, around: object = None) -> Path:
    """Write a file whose unpickling creates ``marker``: a torch file (or a bare pickle)."""
    obj = {"payload": Payload(marker)} if around is None else [around, Payload(marker)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if bare:
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)
    return path


REFUSED = "not a readable"


def test_the_payload_is_real(tmp_path: Path) -> None:
    """Sanity: an unrestricted load of a planted file does run the payload."""
    marker = tmp_path / "ran"
    torch.load(plant(tmp_path / "f.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("bare", [False, True], ids=["torch-file", "bare-pickle"])
def test_checkpoint_payload_never_runs(tmp_path: Path, bare: bool) -> None:
    marker = tmp_path / "ran"
    path = plant(tmp_path / "checkpoint.pt", marker, bare=bare)
    with pytest.raises(ValueError, match=REFUSED):
        load_checkpoint(path)
    images, labels = tiny_data()
    with pytest.raises(ValueError, match=REFUSED):
        distill(config(), images, labels, CLASSES, tiny_experts(), checkpoint=path)
    assert not marker.exists()


def test_cli_rerun_with_planted_checkpoint_refuses_without_running_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    out = tmp_path / "run"
    plant(out / "mtt-none" / "checkpoint.pt", marker)
    argv = ["--out", str(out), "--perturbations", "none", "--quiet", "--iterations", "1"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is not a readable sharp_bilevel checkpoint" in err
    assert "data only" in err
    assert not marker.exists()
    assert not (out / "experts").exists()  # refused before any expert was trained


@pytest.mark.parametrize("bare", [False, True], ids=["torch-file", "bare-pickle"])
def test_synthetic_set_payload_never_runs(tmp_path: Path, bare: bool) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match=REFUSED):
        load_synthetic(plant(tmp_path / "synthetic.pt", marker, bare=bare))
    assert not marker.exists()


def test_replay_buffer_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    expert = [[torch.zeros(2)], [torch.ones(2)]]
    folder = tmp_path / "buffers"
    path = plant(folder / "replay_buffer_0.pt", marker, around=expert)
    for read in (
        load_buffer_file,
        lambda _: load_buffers(folder),
        lambda _: describe_buffers(folder),
    ):
        with pytest.raises(ValueError, match=REFUSED):
            read(path)
    assert not marker.exists()


def test_cli_buffers_payload_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    folder = tmp_path / "buffers"
    plant(folder / "replay_buffer_0.pt", marker, around=[[torch.zeros(2)]])
    with pytest.raises(SystemExit):
        cli.main(["--buffers", str(folder), "--out", str(tmp_path / "o"), "--quiet"])
    assert "argument --buffers:" in capsys.readouterr().err
    assert not marker.exists()


def test_zca_file_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match=REFUSED):
        ZCA.load(plant(tmp_path / "zca.pt", marker))
    assert not marker.exists()


def test_files_the_library_writes_load_as_data(tmp_path: Path) -> None:
    zca = ZCA().fit(torch.randn(20, 1, 2, 2, generator=torch.Generator().manual_seed(0)))
    again = ZCA.load(zca.save(tmp_path / "zca.pt"))
    assert torch.equal(again.transform_matrix, zca.transform_matrix)
    save_buffers(tiny_experts(count=1), tmp_path / "b")
    assert len(load_buffers(tmp_path / "b")) == 1


@pytest.mark.parametrize("method", ["mtt", "ftd", "datm"])
@pytest.mark.parametrize("perturbation", ["none", "satm", "vasso", "gsam"])
def test_every_pipeline_checkpoint_loads_with_weights_only(
    tmp_path: Path, method: str, perturbation: str
) -> None:
    images, labels = tiny_data()
    path = tmp_path / "ck.pt"
    cfg = config(method=method, perturbation=perturbation, iterations=2)
    distill(cfg, images, labels, CLASSES, tiny_experts(), checkpoint=path)
    saved = torch.load(path, weights_only=True)  # what load_checkpoint does
    assert saved["iteration"] == 2
    assert saved["experts_id"]


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """``(dotted name, node)`` of every call in ``tree`` (``torch.load``, ``pickle.loads``)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value
            if isinstance(base, ast.Name):
                out.append((f"{base.id}.{node.func.attr}", node))
    return out


def test_no_reader_bypasses_load_data() -> None:
    """Only ``checkpoint.load_data`` calls ``torch.load``, always with ``weights_only=True``;
    the only ``pickle`` reader is CIFAR's restricted unpickler."""
    seen = []
    for path in sorted(SOURCE.rglob("*.py")):
        for name, node in _calls(ast.parse(path.read_text())):
            if name == "torch.load":
                seen.append(path.name)
                flags = {k.arg: k.value for k in node.keywords}
                value = flags.get("weights_only")
                assert isinstance(value, ast.Constant), path
                assert value.value is True, path
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                assert path.relative_to(SOURCE).as_posix() == "distill/datasets/cifar.py", (
                    f"{path} unpickles"
                )
    assert seen == ["checkpoint.py"]
    data = (SOURCE / "distill" / "datasets" / "cifar.py").read_text()
    assert "class _NumpyOnlyUnpickler(pickle.Unpickler)" in data


def test_load_data_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_data(tmp_path / "missing.pt", "checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt is not a readable checkpoint"):
        load_data(tmp_path / "junk.pt", "checkpoint")
