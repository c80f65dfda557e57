"""ZCA whitening against a numpy float64 reference and its closed forms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from sharp_bilevel.distill.zca import ZCA, NotFittedError

F64 = torch.float64


def _data(n: int = 60, shape: tuple[int, int, int] = (2, 3, 3), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = shape[0] * shape[1] * shape[2]
    mix = torch.randn(d, d, generator=g, dtype=F64)  # correlated features
    z = torch.randn(n, d, generator=g, dtype=F64) @ mix + 3.0
    return z.reshape(n, *shape)


def _numpy_reference(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    flat = x.reshape(x.shape[0], -1)
    mu = flat.mean(axis=0)
    cov = np.cov(flat, rowvar=False)  # unbiased
    u, s, _ = np.linalg.svd(cov)
    t = u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T
    t_inv = u @ np.diag(np.sqrt(s + eps)) @ u.T
    return mu, t, t_inv


@pytest.mark.parametrize(("n", "eps"), [(60, 0.1), (10, 0.1), (200, 1e-3)])
def test_matches_numpy_reference(n: int, eps: float) -> None:
    x = _data(n=n)
    zca = ZCA().fit(x, eps=eps)
    mu, t, t_inv = _numpy_reference(x.numpy(), eps)
    np.testing.assert_allclose(zca.mean.numpy(), mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(zca.transform_matrix.numpy(), t, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(zca.inverse_matrix.numpy(), t_inv, rtol=1e-9, atol=1e-9)
    q = _data(n=7, seed=3)
    want = (q.numpy().reshape(7, -1) - mu) @ t
    np.testing.assert_allclose(zca.transform(q).numpy().reshape(7, -1), want, atol=1e-9)


def test_chunked_fit_equals_one_chunk() -> None:
    x = _data(n=50)
    a, b = ZCA().fit(x), ZCA().fit(x, chunk_size=7)
    torch.testing.assert_close(a.transform_matrix, b.transform_matrix, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-14, atol=1e-14)


def test_whitened_covariance_closed_form() -> None:
    eps = 0.1
    x = _data(n=80)
    z = ZCA().fit(x, eps=eps).transform(x).numpy().reshape(80, -1)
    flat = x.numpy().reshape(80, -1)
    s, u = np.linalg.eigh(np.cov(flat, rowvar=False))
    want = u @ np.diag(s / (s + eps)) @ u.T
    np.testing.assert_allclose(np.cov(z, rowvar=False), want, atol=1e-9)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-10)
    # Tiny eps whitens almost fully when N > D.
    z2 = ZCA().fit(x, eps=1e-9).transform(x).numpy().reshape(80, -1)
    np.testing.assert_allclose(np.cov(z2, rowvar=False), np.eye(18), atol=1e-6)


def test_inverse_round_trip_float64() -> None:
    x = _data(n=40)
    zca = ZCA().fit(x)
    q = _data(n=5, seed=9)
    torch.testing.assert_close(zca.inverse_transform(zca.transform(q)), q, rtol=0, atol=1e-10)
    torch.testing.assert_close(zca.transform(zca.inverse_transform(q)), q, rtol=0, atol=1e-10)


def test_dtype_preserved_and_float32_input() -> None:
    x = _data(n=40)
    zca = ZCA().fit(x.float())
    ref = ZCA().fit(x)
    q = x[:4].float()
    y = zca.transform(q)
    assert y.dtype == torch.float32
    assert y.shape == q.shape
    torch.testing.assert_close(y.double(), ref.transform(x[:4]), rtol=1e-4, atol=1e-4)
    assert zca.inverse_transform(y).dtype == torch.float32
    # uint8 images can be fitted (converted to float64 internally).
    u8 = (torch.rand(30, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    assert ZCA().fit(u8).transform(u8.float()).dtype == torch.float32


def test_gradcheck() -> None:
    zca = ZCA().fit(_data(n=30, shape=(1, 2, 3)))
    q = _data(n=3, shape=(1, 2, 3), seed=5).requires_grad_()
    assert torch.autograd.gradcheck(zca.transform, (q,))
    assert torch.autograd.gradcheck(zca.inverse_transform, (q,))


def test_fit_ignores_requires_grad() -> None:
    x = _data(n=20).requires_grad_()
    zca = ZCA().fit(x)
    assert not zca.transform_matrix.requires_grad


def test_state_dict_round_trip() -> None:
    x = _data(n=40)
    zca = ZCA().fit(x, eps=0.05)
    buf = io.BytesIO()
    torch.save(zca.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    back = ZCA.from_state(state)
    assert back.eps == 0.05
    assert back.feature_shape == (2, 3, 3)
    assert torch.equal(back.transform(x), zca.transform(x))
    assert torch.equal(back.inverse_transform(x), zca.inverse_transform(x))
    assert torch.equal(ZCA().load_state_dict(state).transform_matrix, zca.transform_matrix)


def test_errors() -> None:
    x = _data(n=10)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ZCA().fit(x.reshape(10, -1))
    with pytest.raises(ValueError, match="N >= 2"):
        ZCA().fit(x[:1])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            ZCA().fit(x, eps=bad)
    with pytest.raises(ValueError, match="NaN"):
        ZCA().fit(torch.full((3, 1, 2, 2), float("nan")))
    for call in (ZCA().transform, ZCA().inverse_transform):
        with pytest.raises(ValueError, match="before fit"):
            call(x)
    with pytest.raises(NotFittedError):
        ZCA().state_dict()
    zca = ZCA().fit(x)
    with pytest.raises(ValueError, match="fitted shape"):
        zca.transform(x[:, :1])
    with pytest.raises(ValueError, match="fitted shape"):
        zca.inverse_transform(x.reshape(10, -1))
    with pytest.raises(ValueError, match="floating"):
        zca.transform(x.long())
    state = zca.state_dict()
    with pytest.raises(ValueError, match="missing keys"):
        ZCA.from_state({k: v for k, v in state.items() if k != "mean"})
    with pytest.raises(ValueError, match="expected mean"):
        ZCA.from_state({**state, "mean": state["mean"][:-1]})
    with pytest.raises(ValueError, match="eps"):
        ZCA.from_state({**state, "eps": torch.tensor(0.0)})
