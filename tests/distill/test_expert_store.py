"""Expert folders with a manifest: no silent reuse of other experts, no silent partial sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _pipeline_fixtures import CLASSES, config, tiny_data
from torch import Tensor

from sharp_bilevel.cli import app as cli
from sharp_bilevel.distill.expert_store import (
    MANIFEST_NAME,
    ExpertFolderError,
    ExpertSettingsError,
    describe_buffers,
    file_sha256,
    load_or_train_experts,
    read_manifest,
)
from sharp_bilevel.distill.experts import save_buffers
from sharp_bilevel.distill.pipeline import ResumeError, distill

SETTINGS = {"model": "ConvNet", "train_epochs": 2, "lr_teacher": 0.01}


def fake_expert(k: int, epochs: int = 2) -> list[list[Tensor]]:
    """A deterministic 'trajectory' for expert ``k`` (two parameters)."""
    gen = torch.Generator().manual_seed(100 + k)
    return [
        [torch.randn(3, generator=gen), torch.randn(2, 2, generator=gen)] for _ in range(epochs + 1)
    ]


class Trainer:
    """``train_one`` that records which experts it trained and can die at one of them."""

    def __init__(self, die_at: int | None = None) -> None:
        self.trained: list[int] = []
        self.die_at = die_at

    def __call__(self, k: int) -> list[list[Tensor]]:
        if k == self.die_at:
            raise KeyboardInterrupt
        self.trained.append(k)
        return fake_expert(k)


def same(a: list[list[list[Tensor]]], b: list[list[list[Tensor]]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y)
        for ea, eb in zip(a, b, strict=True)
        for sa, sb in zip(ea, eb, strict=True)
        for x, y in zip(sa, sb, strict=True)
    )


def test_trains_once_then_loads(tmp_path: Path) -> None:
    first = Trainer()
    experts, manifest = load_or_train_experts(tmp_path, SETTINGS, 3, first, save_interval=2)
    assert first.trained == [0, 1, 2]
    assert same(experts, [fake_expert(k) for k in range(3)])
    on_disk = read_manifest(tmp_path)
    assert on_disk == manifest
    assert [f.name for f in manifest.files] == ["replay_buffer_0.pt", "replay_buffer_1.pt"]
    for f in manifest.files:
        assert f.sha256 == file_sha256(tmp_path / f.name)
    again = Trainer()
    loaded, manifest2 = load_or_train_experts(tmp_path, SETTINGS, 3, again, save_interval=2)
    assert again.trained == []
    assert same(loaded, experts)
    assert manifest2.identity(3) == manifest.identity(3)


def test_kill_between_buffer_files_retrains_only_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        load_or_train_experts(tmp_path, SETTINGS, 12, Trainer(die_at=11), save_interval=10)
    manifest = read_manifest(tmp_path)
    assert manifest is not None
    assert manifest.num_experts == 10  # the first file was complete and is listed
    resume = Trainer()
    experts, manifest = load_or_train_experts(tmp_path, SETTINGS, 12, resume, save_interval=10)
    assert resume.trained == [10, 11]
    whole, whole_manifest = load_or_train_experts(
        tmp_path / "whole", SETTINGS, 12, Trainer(), save_interval=10
    )
    assert same(experts, whole)
    assert manifest.identity() == whole_manifest.identity()


def test_more_experts_extend_the_folder_and_fewer_use_the_first(tmp_path: Path) -> None:
    load_or_train_experts(tmp_path, SETTINGS, 3, Trainer(), save_interval=2)
    more = Trainer()
    experts, manifest = load_or_train_experts(tmp_path, SETTINGS, 5, more, save_interval=2)
    assert more.trained == [3, 4]
    assert same(experts, [fake_expert(k) for k in range(5)])
    assert [f.experts for f in manifest.files] == [2, 2, 1]
    fewer, _ = load_or_train_experts(tmp_path, SETTINGS, 2, Trainer(), save_interval=2)
    assert same(fewer, experts[:2])
    assert manifest.identity(2) != manifest.identity(5)


def test_other_settings_are_refused_by_name(tmp_path: Path) -> None:
    load_or_train_experts(tmp_path, SETTINGS, 2, Trainer())
    with pytest.raises(ExpertSettingsError, match=r"train_epochs=2 \(now 7\)") as info:
        load_or_train_experts(tmp_path, {**SETTINGS, "train_epochs": 7}, 2, Trainer())
    assert info.value.changes == {"train_epochs": (2, 7)}
    assert info.value.argument == "train_epochs"


def test_files_without_manifest_or_changed_files_are_refused(tmp_path: Path) -> None:
    save_buffers([fake_expert(0)], tmp_path)
    with pytest.raises(ExpertFolderError, match=r"no manifest\.json"):
        load_or_train_experts(tmp_path, SETTINGS, 1, Trainer())
    folder = tmp_path / "listed"
    load_or_train_experts(folder, SETTINGS, 2, Trainer())
    save_buffers([fake_expert(5), fake_expert(6)], folder, start_index=0)  # swapped behind its back
    with pytest.raises(ExpertFolderError, match="SHA-256 differs"):
        load_or_train_experts(folder, SETTINGS, 2, Trainer())
    (folder / "replay_buffer_0.pt").unlink()
    with pytest.raises(ExpertFolderError, match=r"listed .* but missing"):
        load_or_train_experts(folder, SETTINGS, 2, Trainer())
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not a readable expert manifest"):
        read_manifest(folder)


def test_foreign_buffers_are_described_by_their_hashes(tmp_path: Path) -> None:
    save_buffers([fake_expert(0), fake_expert(1), fake_expert(2)], tmp_path, save_interval=2)
    experts, manifest = describe_buffers(tmp_path)
    assert same(experts, [fake_expert(k) for k in range(3)])
    assert [f.sha256 for f in manifest.files] == [
        file_sha256(tmp_path / f"replay_buffer_{n}.pt") for n in (0, 1)
    ]


def test_checkpoint_refuses_other_experts(tmp_path: Path) -> None:
    from _pipeline_fixtures import tiny_experts

    images, labels = tiny_data()
    path = tmp_path / "ck.pt"
    distill(config(iterations=2), images, labels, CLASSES, tiny_experts(), checkpoint=path)
    other = tiny_experts()
    other[0][1][0] = other[0][1][0] + 1e-3
    with pytest.raises(ResumeError, match="experts=") as info:
        distill(config(iterations=3), images, labels, CLASSES, other, checkpoint=path)
    assert list(info.value.changes) == ["experts"]
    with pytest.raises(ResumeError, match="experts="):
        distill(
            config(iterations=3),
            images,
            labels,
            CLASSES,
            tiny_experts(),
            checkpoint=path,
            experts_id="another-id",
        )


# ------------------------------------------------------------------ through the command line
def _fake_train_expert(calls: list[int], die_at: int | None = None):
    """Stand-in for ``cli.train_expert``: shapes of the real network, values from the seed."""
    from sharp_bilevel.distill.networks import get_network

    def train(model, data, *, epochs, seed, network_kwargs, **_):  # type: ignore[no-untyped-def]
        if len(calls) == die_at:
            raise KeyboardInterrupt
        calls.append(seed)
        net = get_network(
            model, data.channels, data.num_classes, data.image_size, seed=seed, **network_kwargs
        )
        gen = torch.Generator().manual_seed(seed)
        snap = [p.detach().clone() for p in net.parameters()]
        out = [snap]
        for _ in range(epochs):
            snap = [t + 0.01 * torch.randn(t.shape, generator=gen) for t in snap]
            out.append(snap)
        return out

    return train


ARGV = [
    "--iterations", "1", "--syn-steps", "2", "--width", "4", "--train-epochs", "2",
    "--max-start-epoch", "1", "--expert-epochs", "1", "--eval-epochs", "1",
    "--eval-seeds", "0", "--eval-models", "ConvNet", "--perturbations", "none", "--quiet",
]  # fmt: skip


def test_cli_kill_between_buffer_files_then_rerun_uses_all_experts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [*ARGV, "--out", str(out), "--num-experts", "12"]
    calls: list[int] = []
    monkeypatch.setattr(cli, "train_expert", _fake_train_expert(calls, die_at=11))
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    assert sorted(p.name for p in (out / "experts").glob("*.pt")) == ["replay_buffer_0.pt"]
    calls.clear()
    monkeypatch.setattr(cli, "train_expert", _fake_train_expert(calls))
    assert cli.main(argv) == 0
    assert calls == [10, 11]  # seeds seed*1000 + k with seed 0
    assert "12 expert trajectories of 2 epochs (trained 2, loaded 10)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["experts"]["count"] == 12
    assert report["experts"]["manifest"]["num_experts"] == 12
    assert report["experts"]["manifest"]["settings"]["train_epochs"] == 2


def test_cli_other_expert_settings_refused_then_no_resume_retrains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    calls: list[int] = []
    monkeypatch.setattr(cli, "train_expert", _fake_train_expert(calls))
    assert cli.main([*ARGV, "--out", str(out), "--num-experts", "2"]) == 0
    capsys.readouterr()
    for flag, value in (("--train-epochs", "3"), ("--expert-optimizer", "gsam")):
        calls.clear()
        with pytest.raises(SystemExit) as info:
            cli.main([*ARGV, "--out", str(out), "--num-experts", "2", flag, value])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: differs from the experts in" in err
        assert "--no-resume" in err
        assert calls == []
    calls.clear()
    argv = [*ARGV, "--out", str(out), "--num-experts", "2", "--train-epochs", "3", "--no-resume"]
    assert cli.main(argv) == 0
    assert calls == [0, 1]
    report = json.loads((out / "report.json").read_text())
    assert report["experts"]["manifest"]["settings"]["train_epochs"] == 3
    assert report["experts"]["epochs"] == 3
    assert report["settings"]["train_epochs"] == 3
