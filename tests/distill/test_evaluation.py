"""Evaluation: MTT's training schedule against hand-written loops, soft labels, statistics, API."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sharp_bilevel.distill.evaluation as ev
from sharp_bilevel.distill.evaluation import (
    EvalResult,
    accuracy,
    evaluate_synthetic,
    random_real_baseline,
    sample_class_balanced,
    soft_cross_entropy,
    train_on_synthetic,
)
from sharp_bilevel.distill.networks import get_network
from sharp_bilevel.trajectory.augment import DSAParams, apply_dsa, sample_dsa

F64 = torch.float64
SHAPE: dict[str, Any] = {"num_classes": 10, "channels": 1, "image_size": (8, 8)}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny networks: one intra-op thread is several times faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _net(seed: int = 0, width: int = 8, dtype: torch.dtype = F64) -> nn.Module:
    return get_network("ConvNet", 1, 10, (8, 8), seed=seed, width=width).to(dtype)


def _data(n: int = 12, seed: int = 0, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.arange(n) % 10
    return x, y


def _params(net: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _assert_same(a: list[Tensor], b: list[Tensor]) -> None:
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def _hand_train(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    epochs: int,
    batch: int,
    seed: int,
    soft: bool = False,
    dsa: DSAParams | None = None,
    decay_after: int | None = None,
    reset_momentum: bool = True,
) -> None:
    """MTT's evaluate_synset written out: ``epoch_eval_train = E = epochs - 1``, decay after
    pass ``E // 2 + 1`` with a new SGD; shuffling and DSA drawn from one generator."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if decay_after is None:
        decay_after = (epochs - 1) // 2 + 1
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    net.train()
    for e in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch):
            idx = perm[start : start + batch]
            xb = x[idx]
            if dsa is not None:
                xb = apply_dsa(xb, sample_dsa(len(idx), (8, 8), dsa, g), dsa)
            out = net(xb)
            if soft:
                t = y[idx]
                p = torch.exp(t) / torch.exp(t).sum(1, keepdim=True)
                logp = out - torch.logsumexp(out, 1, keepdim=True)
                loss = -(p * logp).sum() / len(idx)
            else:
                loss = F.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if e == decay_after:
            lr = lr * 0.1
            if reset_momentum:
                opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            else:
                for group in opt.param_groups:
                    group["lr"] = lr


# ------------------------------------------------------------------- the training schedule
def test_one_full_batch_epoch_equals_one_hand_written_sgd_step() -> None:
    x, y = _data(n=12)
    net = _net()
    ref = copy.deepcopy(net)
    train_on_synthetic(
        net, x, y, lr=0.05, epochs=1, dsa=None, generator=torch.Generator().manual_seed(3)
    )
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    loss = F.cross_entropy(ref(x[perm]), y[perm])
    opt.zero_grad()
    torch.autograd.backward(loss)
    opt.step()
    _assert_same(_params(net), _params(ref))
    assert not all(torch.equal(p, q) for p, q in zip(_params(net), _params(_net()), strict=True))


@pytest.mark.parametrize("epochs", [3, 4, 6])
def test_minibatches_and_lr_decay_point_match_mttschedule(epochs: int) -> None:
    """12 images in batches of 5 (last one partial); decay after pass (epochs - 1) // 2 + 1."""
    x, y = _data(n=12)
    net, ref = _net(), _net()
    train_on_synthetic(
        net,
        x,
        y,
        lr=0.05,
        epochs=epochs,
        batch_size=5,
        dsa=None,
        generator=torch.Generator().manual_seed(7),
    )
    _hand_train(ref, x, y, lr=0.05, epochs=epochs, batch=5, seed=7)
    _assert_same(_params(net), _params(ref))

    # The check is sharp: a decay one pass earlier, or keeping the momentum, differs.
    early = _net()
    _hand_train(early, x, y, lr=0.05, epochs=epochs, batch=5, seed=7, decay_after=(epochs - 1) // 2)
    assert any(
        (p - q).abs().max() > 1e-9 for p, q in zip(_params(net), _params(early), strict=True)
    )
    if (epochs - 1) // 2 + 1 < epochs - 1:  # a decayed pass exists
        kept = _net()
        _hand_train(kept, x, y, lr=0.05, epochs=epochs, batch=5, seed=7, reset_momentum=False)
        assert any(
            (p - q).abs().max() > 1e-9 for p, q in zip(_params(net), _params(kept), strict=True)
        )


def test_dsa_is_drawn_per_batch_from_the_generator_only() -> None:
    x, y = _data(n=12)
    net, again, ref = _net(), _net(), _net()
    state = torch.get_rng_state()
    for model in (net, again):
        train_on_synthetic(
            model, x, y, lr=0.05, epochs=2, batch_size=5, generator=torch.Generator().manual_seed(1)
        )
    assert torch.equal(torch.get_rng_state(), state)
    _hand_train(ref, x, y, lr=0.05, epochs=2, batch=5, seed=1, dsa=DSAParams())
    _assert_same(_params(net), _params(ref))
    for p, q in zip(_params(net), _params(again), strict=True):
        assert torch.equal(p, q)


def test_float32_training_matches_hand_loop() -> None:
    x, y = _data(n=12, dtype=torch.float32)
    net, ref = _net(dtype=torch.float32), _net(dtype=torch.float32)
    train_on_synthetic(
        net, x, y, lr=0.05, epochs=4, batch_size=5, generator=torch.Generator().manual_seed(2)
    )
    _hand_train(ref, x, y, lr=0.05, epochs=4, batch=5, seed=2, dsa=DSAParams())
    for p, q in zip(_params(net), _params(ref), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ soft labels
def test_soft_cross_entropy_equals_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=F64)
    t = torch.randn(5, 4, generator=g, dtype=F64) * 3
    expected = 0.0
    for b in range(5):
        norm_t = sum(math.exp(float(v)) for v in t[b])
        log_norm_z = math.log(sum(math.exp(float(v)) for v in z[b]))
        for k in range(4):
            expected -= math.exp(float(t[b, k])) / norm_t * (float(z[b, k]) - log_norm_z)
    expected /= 5
    assert float(soft_cross_entropy(z, t)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_soft_label_training_matches_hand_loop() -> None:
    x, _ = _data(n=12)
    logits = torch.randn(12, 10, generator=torch.Generator().manual_seed(4), dtype=F64)
    net, ref = _net(), _net()
    train_on_synthetic(
        net,
        x,
        logits,
        lr=0.05,
        epochs=4,
        batch_size=5,
        soft_labels=True,
        generator=torch.Generator().manual_seed(5),
    )
    _hand_train(ref, x, logits, lr=0.05, epochs=4, batch=5, seed=5, soft=True, dsa=DSAParams())
    _assert_same(_params(net), _params(ref))


def test_one_hot_logits_times_large_equal_hard_label_training() -> None:
    x, y = _data(n=12)
    soft, hard = _net(), _net()
    for model, labels, is_soft in (
        (soft, F.one_hot(y, 10).to(F64) * 200.0, True),
        (hard, y, False),
    ):
        train_on_synthetic(
            model,
            x,
            labels,
            lr=0.05,
            epochs=4,
            batch_size=5,
            soft_labels=is_soft,
            generator=torch.Generator().manual_seed(6),
        )
    for p, q in zip(_params(soft), _params(hard), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


# ------------------------------------------------------------------- accuracy and statistics
def test_accuracy_equals_a_hand_count_and_restores_the_mode() -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 3).to(F64)
    net = nn.Sequential(nn.Flatten(), lin)
    x = torch.randn(11, 1, 8, 8, generator=g, dtype=F64)
    y = torch.randint(0, 3, (11,), generator=g)
    w, b = lin.weight.detach(), lin.bias.detach()
    hits = 0
    for i in range(11):
        scores = [float(w[k] @ x[i].flatten() + b[k]) for k in range(3)]
        hits += int(max(range(3), key=lambda k: scores[k]) == int(y[i]))
    net.train()
    assert accuracy(net, x, y, batch_size=4) == hits / 11
    assert net.training
    net.eval()
    assert accuracy(net, x, y) == hits / 11
    assert not net.training


def test_eval_result_mean_and_population_std() -> None:
    r = EvalResult.from_accuracies("ConvNet", [0, 1, 2], [0.5, 0.7, 0.6])
    assert r.mean == pytest.approx(0.6, abs=1e-15)
    assert r.std == pytest.approx(math.sqrt((0.1**2 + 0.1**2 + 0.0) / 3), abs=1e-15)
    assert r.accuracies == [0.5, 0.7, 0.6]
    assert r.seeds == [0, 1, 2]
    assert EvalResult.from_accuracies("MLP", [4], [0.25]).std == 0.0
    # what a JSON report records, and it survives a round trip
    as_json = json.loads(json.dumps(r.as_dict()))
    assert as_json == {"accuracies": [0.5, 0.7, 0.6], "mean": r.mean, "std": r.std}
    with pytest.raises(ValueError, match="one accuracy per seed"):
        EvalResult.from_accuracies("MLP", [0, 1], [0.25])


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.int64)
    return x[:1000], y[:1000], x[1000:], y[1000:]


def test_evaluate_synthetic_learns_from_ten_real_digits_per_class(
    digits: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    x_tr, y_tr, x_te, y_te = digits
    x, y = sample_class_balanced(
        x_tr, y_tr, 10, num_classes=10, generator=torch.Generator().manual_seed(0)
    )
    res = evaluate_synthetic(
        x, y, 0.05, x_te, y_te, **SHAPE, seeds=(0,), epochs=100, width=16, device="cpu"
    )
    assert res["ConvNet"].mean > 0.7  # chance is 0.1; 0.84 to 0.93 observed over 8 runs


def test_several_architectures_are_separate_runs_and_seeds_reproduce(
    digits: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    x_tr, y_tr, x_te, y_te = digits
    x, y, x_te, y_te = x_tr[:30], y_tr[:30], x_te[:100], y_te[:100]
    kw: dict[str, Any] = {"epochs": 2, "width": 8, "seeds": (0, 1)}
    state = torch.get_rng_state()
    both = evaluate_synthetic(
        x, y, 0.05, x_te, y_te, **SHAPE, architectures=("ConvNet", "MLP"), **kw
    )
    assert list(both) == ["ConvNet", "MLP"]
    for name, r in both.items():
        assert r.architecture == name
        assert r.seeds == [0, 1]
        assert len(r.accuracies) == 2
        assert r.mean == pytest.approx(sum(r.accuracies) / 2, abs=1e-15)
        assert r.std == pytest.approx(abs(r.accuracies[0] - r.accuracies[1]) / 2, abs=1e-15)
    alone = evaluate_synthetic(x, y, 0.05, x_te, y_te, **SHAPE, architectures=("MLP",), **kw)
    assert alone["MLP"].accuracies == both["MLP"].accuracies
    assert torch.equal(torch.get_rng_state(), state)


def test_random_real_baseline_draws_class_balanced_subsets(
    digits: tuple[Tensor, Tensor, Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    x_tr, y_tr, x_te, y_te = digits
    seen: list[tuple[Tensor, Tensor, tuple[int, ...]]] = []

    def spy(images: Tensor, labels: Tensor, *args: Any, **kw: Any) -> dict[str, EvalResult]:
        seeds = tuple(kw["seeds"])
        seen.append((images, labels, seeds))
        return {"ConvNet": EvalResult.from_accuracies("ConvNet", seeds, [0.1 * s for s in seeds])}

    monkeypatch.setattr(ev, "evaluate_synthetic", spy)
    res = random_real_baseline(x_tr, y_tr, 3, x_te, y_te, **SHAPE, seeds=(1, 2))
    assert [s for _, _, s in seen] == [(1,), (2,)]
    assert res["ConvNet"].accuracies == [0.1, 0.2]
    assert res["ConvNet"].seeds == [1, 2]
    flat = x_tr.flatten(1)
    for images, labels, _ in seen:
        assert torch.equal(labels, torch.arange(10).repeat_interleave(3))
        rows = [int((flat == img.flatten()).all(1).nonzero()[0]) for img in images]
        assert len(set(rows)) == 30
        assert all(int(y_tr[r]) == int(lab) for r, lab in zip(rows, labels, strict=True))
    assert not torch.equal(seen[0][0], seen[1][0])  # each seed its own subset

    seen.clear()
    random_real_baseline(x_tr, y_tr, 3, x_te, y_te, **SHAPE, seeds=(1, 2), subset_seed=9)
    assert len(seen) == 1
    assert seen[0][2] == (1, 2)


def test_random_real_baseline_names_a_class_with_too_few_images() -> None:
    x, _ = _data(n=12, dtype=torch.float32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6])  # class 3 has one image
    with pytest.raises(ValueError, match="class 3 has 1 images, fewer than ipc=2"):
        random_real_baseline(x, labels, 2, x, labels, **SHAPE, epochs=1)


# -------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("lr", [0.0, -0.01, math.nan, math.inf, torch.tensor(-1.0)])
def test_a_non_positive_or_non_finite_lr_is_rejected(lr: float | Tensor) -> None:
    x, y = _data(n=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="lr"):
        evaluate_synthetic(x, y, lr, x, y, **SHAPE, epochs=1)
    with pytest.raises(ValueError, match="lr"):
        train_on_synthetic(
            _net(dtype=torch.float32), x, y, lr=lr, epochs=1, generator=torch.Generator()
        )


def test_bad_shapes_and_names_are_rejected_by_argument() -> None:
    x, y = _data(n=4, dtype=torch.float32)
    kw: dict[str, Any] = {"epochs": 1, **SHAPE}

    def call(**over: object) -> None:
        args: dict[str, Any] = {
            "images": x,
            "labels": y,
            "lr": 0.01,
            "test_images": x,
            "test_labels": y,
        }
        args.update({k: v for k, v in over.items() if k in args})
        rest = {**kw, **{k: v for k, v in over.items() if k not in args}}
        evaluate_synthetic(**args, **rest)

    cases: list[tuple[dict[str, object], str]] = [
        ({"images": torch.randn(4, 3, 8, 8)}, "images"),
        ({"labels": y[:3]}, "labels"),
        ({"labels": y + 10}, "labels"),
        ({"labels": torch.randn(4, 9), "soft_labels": True}, "labels"),
        ({"test_images": torch.randn(4, 1, 7, 7)}, "test_images"),
        ({"test_labels": y[:2]}, "test_labels"),
        ({"architectures": ("ConvNet", "NoSuchNet")}, "architectures"),
        ({"architectures": "ConvNet"}, "architectures"),
        ({"seeds": (0, 0)}, "seeds"),
        ({"epochs": 0}, "epochs"),
    ]
    for over, name in cases:
        with pytest.raises(ValueError, match=name):
            call(**over)


def test_soft_one_hot_labels_evaluate_like_hard_labels_and_baseline_reproduces(
    digits: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    x_tr, y_tr, x_te, y_te = digits
    x, y, x_te, y_te = x_tr[:40], y_tr[:40], x_te[:200], y_te[:200]
    kw: dict[str, Any] = {"epochs": 20, "width": 8, "seeds": (0, 1), **SHAPE}
    hard = evaluate_synthetic(x, y, 0.1, x_te, y_te, **kw)["ConvNet"]
    soft_labels = F.one_hot(y, 10).float() * 200.0
    soft = evaluate_synthetic(x, soft_labels, 0.1, x_te, y_te, soft_labels=True, **kw)["ConvNet"]
    for a, b in zip(hard.accuracies, soft.accuracies, strict=True):
        assert a > 0.2  # above chance (0.27 and 0.30 observed)
        assert a == pytest.approx(b, abs=0.02)

    kw["epochs"] = 2

    runs = [
        random_real_baseline(x_tr, y_tr, 2, x_te, y_te, **kw, subset_seed=s)["ConvNet"]
        for s in (3, 3)
    ]
    assert runs[0].accuracies == runs[1].accuracies
    assert all(0.0 <= a <= 1.0 for a in runs[0].accuracies)
