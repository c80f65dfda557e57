"""The main job's distillation loop: resume, atomic checkpoints, early errors, outputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from _pipeline_fixtures import CLASSES, config, tiny_data, tiny_experts

from sharp_bilevel.cli import app as cli
from sharp_bilevel.distill.checkpoint import atomic_save, load_checkpoint
from sharp_bilevel.distill.pipeline import distill


class Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    ("method", "perturbation"), [("mtt", "satm"), ("ftd", "asam"), ("datm", "vasso")]
)
def test_interrupted_run_resumes_bit_identically(
    tmp_path: Path, method: str, perturbation: str
) -> None:
    images, labels = tiny_data()
    experts = tiny_experts()
    cfg = config(method=method, perturbation=perturbation)
    whole = distill(cfg, images, labels, CLASSES, experts, checkpoint=tmp_path / "a.pt")

    def stop_after_two(it: int, values: dict[str, float]) -> None:
        if it == 2:  # the checkpoint of iteration 2 exists; iteration 3 ran but was not saved
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(
            cfg,
            images,
            labels,
            CLASSES,
            experts,
            checkpoint=tmp_path / "b.pt",
            progress=stop_after_two,
        )
    assert load_checkpoint(tmp_path / "b.pt")["iteration"] == 2
    resumed = distill(cfg, images, labels, CLASSES, experts, checkpoint=tmp_path / "b.pt")
    assert torch.equal(whole.images, resumed.images)
    assert torch.equal(whole.labels, resumed.labels)
    assert whole.syn_lr == resumed.syn_lr
    assert whole.history == resumed.history
    if method == "ftd":
        assert whole.ema_images is not None
        assert resumed.ema_images is not None
        assert torch.equal(whole.ema_images, resumed.ema_images)
    fresh = distill(cfg, images, labels, CLASSES, experts)
    assert not torch.equal(fresh.images, images[:0])  # sanity: a run without checkpoint works
    assert torch.equal(fresh.images, whole.images)  # and is itself deterministic


def test_checkpoint_write_is_atomic_when_the_writer_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ck.pt"
    atomic_save({"iteration": 1}, path)

    def dying_save(obj: object, handle: object) -> None:
        handle.write(b"partial bytes")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"iteration": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"iteration": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(path)


def test_bad_input_fails_early_with_a_clear_message(tmp_path: Path) -> None:
    images, labels = tiny_data()
    experts = tiny_experts(epochs=3)
    with pytest.raises(ValueError, match="class 0 has 6 images, fewer than ipc=7"):
        distill(config(ipc=7), images, labels, CLASSES, experts)
    with pytest.raises(ValueError, match="start_epoch \\+ expert_epochs reaches epoch 4"):
        distill(config(max_start_epoch=3, expert_epochs=2), images, labels, CLASSES, experts)
    with pytest.raises(ValueError, match="lr_img"):
        config(lr_img=0.0)
    with pytest.raises(ValueError, match="method"):
        config(method="tesla")
    with pytest.raises(ValueError, match="no expert"):
        distill(config(), images, labels, CLASSES, [])
    ck = tmp_path / "c.pt"
    distill(config(iterations=2), images, labels, CLASSES, experts, checkpoint=ck)
    with pytest.raises(ValueError, match=r"written with lr_img=10.0 \(now 5.0\)"):
        distill(config(iterations=2, lr_img=5.0), images, labels, CLASSES, experts, checkpoint=ck)


def test_satm_config_maps_to_the_preset_and_others_to_their_settings() -> None:
    satm = config(perturbation="satm").unroll_settings()
    assert (satm.keep, satm.reuse, satm.lr_gradient) == (1 / 3, True, "first_order")
    plain = config(perturbation="sam", keep=2, reuse=True).unroll_settings()
    assert (plain.keep, plain.reuse, plain.lr_gradient) == (2, True, "exact")
    assert dataclasses.asdict(config())["method"] == "mtt"


def test_main_job_writes_every_output_and_compares_the_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [
        "--iterations",
        "2",
        "--num-experts",
        "1",
        "--train-epochs",
        "3",
        "--max-start-epoch",
        "2",
        "--expert-epochs",
        "1",
        "--syn-steps",
        "2",
        "--width",
        "4",
        "--eval-epochs",
        "2",
        "--eval-seeds",
        "0,1",
        "--eval-models",
        "ConvNet,MLP",
        "--out",
        str(out),
        "--quiet",
    ]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    for row in ("random real", "initial images", "mtt-none", "mtt-satm"):
        assert row in text
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"random real", "initial images", "mtt-none", "mtt-satm"}
    for results in report["accuracy"].values():
        assert set(results) == {"ConvNet", "MLP"}
        for r in results.values():
            assert len(r["accuracies"]) == 2
            assert 0.0 <= r["mean"] <= 1.0
    assert report["runs"]["mtt-satm"]["config"]["perturbation"] == "satm"
    satm = report["runs"]["mtt-satm"]["resolved"]  # what ran, not the unset fields
    syn_steps = 2
    keep = max(1, syn_steps // 3)
    assert (satm["perturbation"], satm["smooth"], satm["rho"]) == ("ssam", 0.01, 0.05)
    assert (satm["keep_steps"], satm["iota"], satm["tau"]) == (keep, syn_steps - keep, 1)
    assert satm["lr_gradient"] == "first_order"
    plain = report["runs"]["mtt-none"]["resolved"]
    assert (plain["keep_steps"], plain["iota"], plain["tau"]) == (syn_steps, 0, None)
    for name in ("mtt-none", "mtt-satm"):
        saved = torch.load(out / name / "synthetic.pt")
        assert saved["images"].shape == (10, 1, 8, 8)
        assert (out / name / "images.png").stat().st_size > 0
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "accuracy.png").stat().st_size > 0
    assert "initial images" in report["accuracy"]
    assert sorted(p.name for p in (out / "experts").iterdir()) == [
        "manifest.json",
        "replay_buffer_0.pt",
    ]
    # A second run reuses the experts and the finished checkpoints.
    assert cli.main([*argv, "--perturbations", "none"]) == 0


def test_main_job_rejects_missing_buffers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--buffers", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--quiet"])
    assert info.value.code == 2
    assert "argument --buffers:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("method", ["mtt", "ftd", "datm"])
def test_fixed_fraction_keeps_each_classs_last_images_and_resumes(
    tmp_path: Path, method: str
) -> None:
    """SelMatch-style partial updates: per class the last floor(f * ipc) images (and labels)
    end as they started, in place; the others are learned; a resumed run is bit-identical."""
    images, labels = tiny_data()
    experts = tiny_experts()
    cfg = config(method=method, perturbation="sam", ipc=3, fixed_fraction=0.4)  # 1 of 3 fixed
    whole = distill(cfg, images, labels, CLASSES, experts, checkpoint=tmp_path / "a.pt")
    start = whole.initial_images.reshape(CLASSES, 3, *whole.initial_images.shape[1:])
    end = whole.images.reshape(CLASSES, 3, *whole.images.shape[1:])
    assert torch.equal(end[:, 2], start[:, 2])  # the fixed ones, in their places
    assert not torch.equal(end[:, :2], start[:, :2])  # the learnable ones moved
    end_labels = whole.labels.reshape(CLASSES, 3, *whole.labels.shape[1:])
    start_labels = whole.initial_labels.reshape(CLASSES, 3, *whole.initial_labels.shape[1:])
    assert torch.equal(end_labels[:, 2], start_labels[:, 2])
    if method == "ftd":
        assert whole.ema_images is not None
        ema = whole.ema_images.reshape(CLASSES, 3, *whole.ema_images.shape[1:])
        assert torch.equal(ema[:, 2], start[:, 2])

    def stop(it: int, values: dict[str, float]) -> None:
        if it == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(cfg, images, labels, CLASSES, experts, checkpoint=tmp_path / "b.pt", progress=stop)
    resumed = distill(cfg, images, labels, CLASSES, experts, checkpoint=tmp_path / "b.pt")
    assert torch.equal(resumed.images, whole.images)


@pytest.mark.parametrize(
    "variant",
    [
        {"hypergradient": "tesla", "lr_gradient": "first_order"},
        {"pad": "loss_rank", "pad_ratio": 0.5},
        {"match_step": "closest"},
        {"keep": (1, 3)},
        {"autocast": "bfloat16"},
        {"hypergradient": "checkpointed", "pad": "depth"},  # checkpointed alone equals BPTT
        {"autocast": "float16"},  # with the GradScaler the run builds (CPU autocast has fp16)
    ],
    ids=lambda v: ",".join(v),
)
def test_every_variant_changes_the_run_and_resumes(tmp_path: Path, variant: dict) -> None:
    images, labels = tiny_data()
    experts = tiny_experts()
    base = distill(config(perturbation="sam"), images, labels, CLASSES, experts)
    cfg = config(perturbation="sam", **variant)
    run = distill(cfg, images, labels, CLASSES, experts, checkpoint=tmp_path / "a.pt")
    assert not torch.equal(run.images, base.images)  # the option reached the objective

    def stop(it: int, values: dict[str, float]) -> None:
        if it == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(cfg, images, labels, CLASSES, experts, checkpoint=tmp_path / "b.pt", progress=stop)
    resumed = distill(cfg, images, labels, CLASSES, experts, checkpoint=tmp_path / "b.pt")
    assert torch.equal(resumed.images, run.images)
