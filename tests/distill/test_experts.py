"""Expert training and MTT's replay-buffer files."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharp_bilevel.distill.data import ImageDataset, load_digits, sample_per_class
from sharp_bilevel.distill.experts import (
    expert_params,
    expert_window,
    load_buffer_file,
    load_buffers,
    mtt_buffer_dir,
    save_buffers,
    train_expert,
    validate_expert,
)
from sharp_bilevel.distill.networks import get_network
from sharp_bilevel.optim.errors import NonFiniteError
from sharp_bilevel.trajectory.augment import DSAParams
from sharp_bilevel.trajectory.student import FunctionalStudent

NET_KW = {"width": 8}
TRAIN_KW = {"epochs": 4, "seed": 5, "lr": 0.1, "batch_size": 25, "network_kwargs": NET_KW}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny convolutions run faster on one thread (and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    """200 digits (20 per class), normalised."""
    split = load_digits(seed=0)
    images, labels = sample_per_class(split.train, 20, torch.Generator().manual_seed(0))
    return ImageDataset(images, labels, 10, "digits-200")


@pytest.fixture(scope="module")
def trajectory(digits: ImageDataset) -> list[list[Tensor]]:
    return train_expert("ConvNet", digits, **TRAIN_KW)  # type: ignore[arg-type]


def _net(digits: ImageDataset, seed: int = 5) -> nn.Module:
    return get_network("ConvNet", 1, 10, (8, 8), seed=seed, **NET_KW)


def _flat_loss(net: nn.Module, flat: Tensor, data: ImageDataset) -> float:
    student = FunctionalStudent(net)
    with torch.no_grad():
        return float(F.cross_entropy(student(data.images, flat), data.labels))


# ------------------------------------------------------------------------------ training
def test_trajectory_shape_and_init(digits: ImageDataset, trajectory: list[list[Tensor]]) -> None:
    net = _net(digits)
    assert len(trajectory) == 5  # E + 1
    params = list(net.parameters())
    for snap in trajectory:
        assert len(snap) == len(params)
        for t, p in zip(snap, params, strict=True):
            assert t.device.type == "cpu"
            assert t.shape == p.shape
            assert not t.requires_grad
    for t, p in zip(trajectory[0], params, strict=True):
        assert torch.equal(t, p.detach())
    # Every epoch is its own copy (no aliasing of the live parameters).
    for a, b in itertools.pairwise(trajectory):
        assert not torch.equal(a[0], b[0])
    validate_expert(trajectory, net)


def test_loss_decreases(digits: ImageDataset, trajectory: list[list[Tensor]]) -> None:
    net = _net(digits)
    losses = [_flat_loss(net, expert_params(trajectory, e, net), digits) for e in range(5)]
    assert losses[-1] < losses[0] - 0.15, losses
    assert losses[-1] == min(losses), losses


def test_same_seed_bit_identical_and_global_rng_untouched(
    digits: ImageDataset, trajectory: list[list[Tensor]]
) -> None:
    state = torch.get_rng_state()
    seen: list[tuple[int, float]] = []
    again = train_expert(
        "ConvNet",
        digits,
        on_epoch=lambda e, loss: seen.append((e, loss)),
        **TRAIN_KW,  # type: ignore[arg-type]
    )
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(trajectory, again, strict=True):
        for ta, tb in zip(a, b, strict=True):
            assert torch.equal(ta, tb)
    assert [e for e, _ in seen] == [1, 2, 3, 4]
    other = train_expert("ConvNet", digits, epochs=1, seed=6, network_kwargs=NET_KW)
    assert not torch.equal(other[0][0], trajectory[0][0])


def test_gsam_differs_from_sgd(digits: ImageDataset, trajectory: list[list[Tensor]]) -> None:
    gsam = train_expert(
        "ConvNet",
        digits,
        epochs=1,
        seed=5,
        lr=0.1,
        batch_size=25,
        network_kwargs=NET_KW,
        optimizer="gsam",
        rho=0.05,
    )
    assert all(torch.equal(a, b) for a, b in zip(gsam[0], trajectory[0], strict=True))
    assert not torch.equal(expert_params(gsam, 1), expert_params(trajectory, 1))
    assert torch.isfinite(expert_params(gsam, 1)).all()


def _tiny_factory() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def _grad(net: nn.Module, params: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    with torch.no_grad():
        for p, v in zip(net.parameters(), params, strict=True):
            p.copy_(v)
    loss = F.cross_entropy(net(x), y)
    return list(torch.autograd.grad(loss, list(net.parameters())))


def test_gsam_matches_hand_written_update(digits: ImageDataset) -> None:
    rho, alpha, lr, wd = 0.1, 0.4, 0.5, 0.01
    traj = train_expert(
        _tiny_factory,
        digits,
        epochs=1,
        seed=0,
        lr=lr,
        weight_decay=wd,
        batch_size=len(digits),  # one full batch: one step
        dsa=None,
        optimizer="gsam",
        rho=rho,
        alpha=alpha,
    )
    w = traj[0]
    net = _tiny_factory()
    g = _grad(net, w, digits.images, digits.labels)
    g_norm = torch.sqrt(sum((t * t).sum() for t in g))
    eps = [rho * t / (g_norm + 1e-12) for t in g]
    g_adv = _grad(net, [a + b for a, b in zip(w, eps, strict=True)], digits.images, digits.labels)
    inner = sum((a * b).sum() for a, b in zip(g, g_adv, strict=True))
    adv_sq = sum((t * t).sum() for t in g_adv)
    expected = []
    for wi, gi, gai in zip(w, g, g_adv, strict=True):
        g_perp = gi - inner / (adv_sq + 1e-12) * gai
        d = gai - alpha * g_perp
        expected.append(wi - lr * (d + wd * wi))
    for got, want in zip(traj[1], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The factory's initialisation is seeded too.
    again = train_expert(_tiny_factory, digits, epochs=1, seed=0, batch_size=500, dsa=None)
    assert torch.equal(again[0][0], w[0])


def test_sgd_matches_hand_written_update(digits: ImageDataset) -> None:
    lr, wd = 0.3, 0.05
    traj = train_expert(
        _tiny_factory, digits, epochs=1, seed=1, lr=lr, weight_decay=wd, batch_size=500, dsa=None
    )
    g = _grad(_tiny_factory(), traj[0], digits.images, digits.labels)
    for got, w, gi in zip(traj[1], traj[0], g, strict=True):
        torch.testing.assert_close(got, w - lr * (gi + wd * w), rtol=1e-5, atol=1e-6)


def test_dsa_changes_the_trajectory(digits: ImageDataset) -> None:
    kw = {"epochs": 1, "seed": 2, "batch_size": 100, "lr": 0.1}
    plain = train_expert(_tiny_factory, digits, dsa=None, **kw)  # type: ignore[arg-type]
    flips = train_expert(_tiny_factory, digits, dsa=DSAParams(strategy="flip"), **kw)  # type: ignore[arg-type]
    assert torch.equal(plain[0][0], flips[0][0])
    assert not torch.equal(plain[1][0], flips[1][0])


def test_train_expert_errors(digits: ImageDataset) -> None:
    with pytest.raises(ValueError, match="epochs"):
        train_expert("ConvNet", digits, epochs=0, seed=0)
    with pytest.raises(ValueError, match="optimizer"):
        train_expert("ConvNet", digits, epochs=1, seed=0, optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="factory"):
        train_expert(_tiny_factory(), digits, epochs=1, seed=0)  # type: ignore[arg-type]
    bad = ImageDataset(digits.images.clone(), digits.labels, 10)
    bad.images[7, 0, 2, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="epoch 1"):
        train_expert(_tiny_factory, bad, epochs=1, seed=0, batch_size=20, dsa=None)
    with pytest.raises(NonFiniteError, match="epoch 1"):
        train_expert(_tiny_factory, bad, epochs=1, seed=0, batch_size=20, optimizer="gsam")


# ------------------------------------------------------------------------------ buffers
def _experts(n: int, epochs: int = 3, seed: int = 0) -> list[list[list[Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [[torch.randn(4, 3, generator=g), torch.randn(4, generator=g)] for _ in range(epochs + 1)]
        for _ in range(n)
    ]


def _same(a: list[list[list[Tensor]]], b: list[list[list[Tensor]]]) -> bool:
    return len(a) == len(b) and all(
        len(ea) == len(eb)
        and all(
            len(sa) == len(sb)
            and all(
                ta.dtype == tb.dtype and torch.equal(ta, tb) for ta, tb in zip(sa, sb, strict=True)
            )
            for sa, sb in zip(ea, eb, strict=True)
        )
        for ea, eb in zip(a, b, strict=True)
    )


def test_save_load_round_trip_mtt_format(tmp_path: Path) -> None:
    experts = _experts(3)
    paths = save_buffers(experts, tmp_path / "buf", save_interval=2)
    assert [p.name for p in paths] == ["replay_buffer_0.pt", "replay_buffer_1.pt"]
    # What MTT's distill.py does: a plain torch.load of each file.
    first = torch.load(paths[0])
    last = torch.load(paths[1])
    for content, n in ((first, 2), (last, 1)):  # the partial last file is written
        assert type(content) is list
        assert len(content) == n
        for expert in content:
            assert type(expert) is list
            assert len(expert) == 4
            for snap in expert:
                assert type(snap) is list
                assert all(type(t) is Tensor for t in snap)
    assert _same(first + last, experts)
    assert _same(load_buffers(tmp_path / "buf"), experts)
    assert not [p for p in os.listdir(tmp_path / "buf") if not p.startswith("replay_buffer_")]


def test_save_appends_or_replaces(tmp_path: Path) -> None:
    a, b = _experts(1, seed=1), _experts(2, seed=2)
    save_buffers(a, tmp_path)
    paths = save_buffers(b, tmp_path, save_interval=1)
    assert [p.name for p in paths] == ["replay_buffer_1.pt", "replay_buffer_2.pt"]
    assert _same(load_buffers(tmp_path), a + b)
    save_buffers(b[:1], tmp_path, start_index=0)
    assert _same(load_buffers(tmp_path), b[:1] + b)


def test_views_are_saved_compactly(tmp_path: Path) -> None:
    big = torch.zeros(100_000)
    expert = [[big[:3], big[3:5]], [big[5:8], big[8:10]]]
    (path,) = save_buffers([expert], tmp_path)
    assert path.stat().st_size < 20_000  # not the 400 kB storage behind the views
    assert torch.load(path)[0][1][0].shape == (3,)


def test_reads_hand_built_mtt_files_in_numeric_order(tmp_path: Path) -> None:
    for n in range(12):  # replay_buffer_10.pt must come after replay_buffer_9.pt
        expert = [[torch.full((2,), float(n))], [torch.full((2,), n + 0.5)]]
        torch.save([expert], tmp_path / f"replay_buffer_{n}.pt")
    (tmp_path / "notes.txt").write_text("ignored")
    experts = load_buffers(tmp_path)
    assert [float(e[0][0][0]) for e in experts] == [float(n) for n in range(12)]
    assert len(load_buffer_file(tmp_path / "replay_buffer_3.pt")) == 1


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"experts": []}, "expected a list of experts"),
        ([], "holds no experts"),
        ([[]], "expert 0 must be a non-empty list"),
        ([[[torch.zeros(2)], [[1.0, 2.0]]]], "expert 0, epoch 1, parameter 0 is a list"),
        ([[[torch.zeros(2)], []]], "epoch 1 must be a non-empty list"),
        ([[[torch.zeros(2)], [torch.zeros(3)]]], r"shape \(3,\) but \(2,\) at epoch 0"),
        ([[[torch.zeros(2)], [torch.zeros(2), torch.zeros(1)]]], "2 tensors but epoch 0 has 1"),
        (
            [[[torch.zeros(2)]], [[torch.zeros(2)], [torch.tensor([0.0, float("nan")])]]],
            "expert 1, epoch 1, parameter 0 holds NaN or infinite values",
        ),
        ([[[torch.tensor([float("inf")])]]], "expert 0, epoch 0, parameter 0 holds NaN"),
    ],
)
def test_malformed_buffer_files(tmp_path: Path, content: object, match: str) -> None:
    path = tmp_path / "replay_buffer_0.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=match) as info:
        load_buffers(tmp_path)
    assert str(path) in str(info.value)


def test_unreadable_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "replay_buffer_0.pt"
    path.write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match="not a readable torch expert buffer") as info:
        load_buffer_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no replay_buffer"):
        load_buffers(tmp_path / "..")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_buffers(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no experts"):
        save_buffers([], tmp_path)


def test_atomic_write_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_buffers(_experts(1, seed=1), tmp_path, start_index=0)
    before = (tmp_path / "replay_buffer_0.pt").read_bytes()

    def broken_save(obj: object, f: object) -> None:
        assert hasattr(f, "write")
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_buffers(_experts(1, seed=2), tmp_path, start_index=0)
    assert os.listdir(tmp_path) == ["replay_buffer_0.pt"]  # no temp file left behind
    assert (tmp_path / "replay_buffer_0.pt").read_bytes() == before


# ------------------------------------------------------------------------------ checks
def test_validate_expert_messages() -> None:
    net = get_network("ConvNet", 1, 10, (8, 8), seed=0, width=8)
    good = [[p.detach().clone() for p in net.parameters()] for _ in range(3)]
    validate_expert(good, net)
    validate_expert(good, FunctionalStudent(net))
    wrong_count = [good[0], good[1][:-1]]
    with pytest.raises(ValueError, match="epoch 1 has 13 tensors but the network has 14"):
        validate_expert(wrong_count, net)
    other = get_network("ConvNet", 1, 10, (8, 8), seed=0, width=16)
    with pytest.raises(ValueError, match="different network") as info:
        validate_expert(good, other)
    message = str(info.value)
    assert "epoch 0, parameter 0 (features.conv0.weight)" in message
    assert "expected shape (16, 1, 3, 3), got (8, 1, 3, 3)" in message
    with pytest.raises(ValueError, match="no snapshots"):
        validate_expert([], net)


def test_expert_params_and_window() -> None:
    net = get_network("ConvNet", 1, 10, (8, 8), seed=3, width=8)
    student = FunctionalStudent(net)
    snap = [p.detach().clone() for p in net.parameters()]
    expert = [snap, [t + 1 for t in snap], [t + 2 for t in snap]]
    assert torch.equal(expert_params(expert, 0, student), student.flat_parameters())
    assert torch.equal(expert_params(expert, 2), student.flat_parameters() + 2)
    with pytest.raises(ValueError, match=r"epoch 3 is out of range.*epochs 0\.\.2"):
        expert_params(expert, 3)
    start, target = expert_window(expert, 1, 1, net)
    assert torch.equal(start, expert_params(expert, 1))
    assert torch.equal(target, expert_params(expert, 2))
    with pytest.raises(ValueError, match="start_epoch \\+ expert_epochs = 2 \\+ 1 = 3 exceeds"):
        expert_window(expert, 2, 1)
    with pytest.raises(ValueError, match="expert_epochs"):
        expert_window(expert, 0, 0)


def test_mtt_buffer_dir() -> None:
    assert mtt_buffer_dir("b", "CIFAR10", "ConvNet", zca=False) == Path("b/CIFAR10_NO_ZCA/ConvNet")
    assert mtt_buffer_dir("b", "CIFAR10", "ConvNet", zca=True) == Path("b/CIFAR10/ConvNet")
    assert mtt_buffer_dir("b", "FashionMNIST", "ConvNet", zca=False) == Path(
        "b/FashionMNIST/ConvNet"
    )
