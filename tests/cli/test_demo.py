"""The main job's demo: its distillation loop is the optimizer on a real bilevel objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sharp_bilevel.cli import demo


@pytest.fixture(scope="module")
def digits() -> demo.Digits:
    return demo.load_digits_split(seed=0)


def test_digits_split_is_disjoint_and_complete(digits: demo.Digits) -> None:
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert digits.x_train.shape[1] == 64
    assert float(digits.x_train.max()) <= 1.0
    assert set(digits.y_test.tolist()) == set(range(10))


def test_train_linear_matches_a_hand_written_gradient_descent(digits: demo.Digits) -> None:
    x, y = digits.x_train[:50], digits.y_train[:50]
    lr = torch.tensor(0.7, dtype=torch.float64)
    w = demo.train_linear(x, y, lr, steps=4, num_classes=10)
    feats = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    ref = torch.zeros(65, 10, dtype=torch.float64)
    onehot = F.one_hot(y, 10).double()
    for _ in range(4):  # closed-form CE gradient: X^T (softmax(XW) - Y) / n
        ref = ref - 0.7 * feats.T @ (torch.softmax(feats @ ref, 1) - onehot) / len(x)
    torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-14)


def test_distil_none_equals_plain_sgd_on_the_same_objective(digits: demo.Digits) -> None:
    images, labels, lr = demo.distil(digits, "none", None, iterations=3, inner_steps=2, seed=1)
    x0, y0 = demo.random_real(digits, 1, 1)
    assert torch.equal(labels, y0)
    ref_images = x0.clone().requires_grad_(True)
    ref_log_lr = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD(
        [{"params": [ref_images]}, {"params": [ref_log_lr], "lr": 0.01}], lr=0.3, momentum=0.5
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = torch.randperm(len(digits.y_train), generator=gen)[:256]
        opt.zero_grad()
        w = demo.train_linear(ref_images, labels, ref_log_lr.exp(), 2, 10)
        feats = torch.cat([digits.x_train[batch], torch.ones(len(batch), 1).double()], 1)
        F.cross_entropy(feats @ w, digits.y_train[batch]).backward()
        opt.step()
    torch.testing.assert_close(images, ref_images.detach(), rtol=0, atol=0)
    torch.testing.assert_close(lr, ref_log_lr.detach().exp(), rtol=0, atol=0)


def test_main_prints_one_row_per_rule_with_valid_accuracies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert (
        demo.main(["--iterations", "2", "--inner-steps", "2", "--perturbations", "none,asam"]) == 0
    )
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line}
    for name in ("none", "asam"):
        assert 0.0 <= float(rows[name][1]) <= 1.0
    assert float(rows["random"][2]) <= 1.0  # "random real" row: accuracy column


def test_main_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        demo.main(["--iterations", "0"])
    with pytest.raises(ValueError, match="unknown perturbation"):
        demo.main(["--iterations", "1", "--perturbations", "nosuchrule"])
