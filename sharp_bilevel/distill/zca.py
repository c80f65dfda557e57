"""ZCA whitening in plain torch (the fit in float64).

MTT, FTD and DATM fit ZCA on the whole training set (``eps = 0.1``) and store train and test sets
already whitened; synthetic images then live in ZCA space. With images flattened to
``X in R^{N x D}`` (``D = C H W``):

$$
\\mu = \\tfrac1N \\sum_n x_n, \\quad
\\Sigma = \\tfrac{1}{N-1} (X - \\mu)^\\top (X - \\mu) = U \\operatorname{diag}(S) U^\\top,
$$

$$
T = U \\operatorname{diag}\\big((S + \\epsilon)^{-1/2}\\big) U^\\top, \\quad
T^{-1} = U \\operatorname{diag}\\big((S + \\epsilon)^{1/2}\\big) U^\\top,
$$

$$
\\operatorname{transform}(x) = (x - \\mu) T, \\quad
\\operatorname{inverse\\_transform}(z) = z T^{-1} + \\mu.
$$

The whitened training data has covariance ``T Sigma T = U diag(S / (S + eps)) U^T``. These are the
formulas of ``kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)`` as MTT uses it (unbiased
covariance, ``T`` from the covariance's decomposition, ``T`` symmetric); kornia computes in the
input's dtype with an SVD, here a float64 ``eigh`` (eigenvalues clamped at 0), so results agree to
kornia's float32 rounding. ``kornia`` is not a dependency.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import atomic_save, load_data

__all__ = ["ZCA", "NotFittedError"]


class NotFittedError(RuntimeError, ValueError):
    """A `ZCA` was used before ``fit`` or ``load_state_dict`` (both a ``ValueError`` and a
    ``RuntimeError``)."""


_STATE_KEYS = ("mean", "eigenvalues", "eigenvectors", "eps", "feature_shape")


class ZCA:
    """ZCA whitening fitted on ``[N, C, H, W]`` images; see the module docstring for the maths.

    ``transform``/``inverse_transform`` are differentiable in their input and return its dtype and
    device. The fitted statistics are kept in float64 on the fitting device; casts to other
    dtypes/devices are cached.
    """

    def __init__(self) -> None:
        self._mean: Tensor | None = None
        self._eigenvalues: Tensor | None = None
        self._eigenvectors: Tensor | None = None
        self._t: Tensor | None = None
        self._t_inv: Tensor | None = None
        self._eps: float | None = None
        self._shape: tuple[int, int, int] | None = None
        self._cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    # ------------------------------------------------------------------ fitting
    def fit(self, x: Tensor, eps: float = 0.1, *, chunk_size: int = 4096) -> ZCA:
        """Fit on ``x`` (``[N, C, H, W]``, ``N >= 2``, treated as a constant); returns ``self``.

        The mean and covariance are accumulated in float64 over ``chunk_size`` rows at a time, so
        peak extra memory is ``O(D^2 + chunk_size * D)``.
        """
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"ZCA.fit needs a [N, C, H, W] tensor, got {shape}")
        if x.shape[0] < 2:
            raise ValueError(f"ZCA.fit needs N >= 2 images (unbiased covariance), got {x.shape[0]}")
        if x.numel() == 0:
            raise ValueError(f"ZCA.fit got an empty tensor of shape {tuple(x.shape)}")
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"ZCA.fit needs a real-valued tensor, got {x.dtype}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise ValueError(f"eps must be a positive finite float, got {eps!r}")
        if not (math.isfinite(float(eps)) and eps > 0):
            raise ValueError(f"eps must be a positive finite float, got {eps!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        n = int(x.shape[0])
        flat = x.detach().reshape(n, -1)
        d = flat.shape[1]
        total = torch.zeros(d, dtype=torch.float64, device=x.device)
        for start in range(0, n, chunk_size):
            total += flat[start : start + chunk_size].to(torch.float64).sum(dim=0)
        mean = total / n
        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for start in range(0, n, chunk_size):
            c = flat[start : start + chunk_size].to(torch.float64) - mean
            cov += c.T @ c
        cov /= n - 1
        cov = 0.5 * (cov + cov.T)
        if not torch.isfinite(cov).all():
            raise ValueError("ZCA.fit: the data contain NaN or infinite values")
        s, u = torch.linalg.eigh(cov)
        self._set(mean, s.clamp_min(0.0), u, float(eps), tuple(x.shape[1:]))
        return self

    def _set(self, mean: Tensor, s: Tensor, u: Tensor, eps: float, shape: tuple[int, ...]) -> None:
        self._mean = mean
        self._eigenvalues = s
        self._eigenvectors = u
        self._t = (u * torch.rsqrt(s + eps)) @ u.T
        self._t_inv = (u * torch.sqrt(s + eps)) @ u.T
        self._eps = eps
        self._shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self._cache = {}

    # ----------------------------------------------------------------- applying
    @property
    def is_fitted(self) -> bool:
        return self._mean is not None

    def _need(self, what: str) -> None:
        if self._mean is None:
            raise NotFittedError(f"ZCA.{what} called before fit (or load_state_dict)")

    def _get(self, name: str, like: Tensor) -> Tensor:
        key = (name, like.device, like.dtype)
        hit = self._cache.get(key)
        if hit is None:
            src = {"mean": self._mean, "t": self._t, "t_inv": self._t_inv}[name]
            assert src is not None
            hit = src.to(device=like.device, dtype=like.dtype)
            self._cache[key] = hit
        return hit

    def _flat(self, x: Tensor, what: str) -> Tensor:
        self._need(what)
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self._shape:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"ZCA.{what} needs [M, *{self._shape}] (the fitted shape), got {shape}"
            )
        if not x.is_floating_point():
            raise ValueError(f"ZCA.{what} needs a floating-point tensor, got {x.dtype}")
        return x.reshape(x.shape[0], -1)

    def transform(self, x: Tensor) -> Tensor:
        """Whiten: ``(x - mu) T``, reshaped back to ``x.shape``."""
        flat = self._flat(x, "transform")
        return ((flat - self._get("mean", x)) @ self._get("t", x)).reshape(x.shape)

    def inverse_transform(self, x: Tensor) -> Tensor:
        """Un-whiten: ``x T^{-1} + mu``, reshaped back to ``x.shape``."""
        flat = self._flat(x, "inverse_transform")
        return (flat @ self._get("t_inv", x) + self._get("mean", x)).reshape(x.shape)

    def __call__(self, x: Tensor) -> Tensor:
        return self.transform(x)

    # ------------------------------------------------------------ fitted values
    def _fitted(self, t: Tensor | None) -> Tensor:
        if t is None:
            raise NotFittedError("ZCA is not fitted")
        return t

    @property
    def mean(self) -> Tensor:
        """``mu``, float64 ``[D]``."""
        return self._fitted(self._mean)

    @property
    def transform_matrix(self) -> Tensor:
        """``T``, float64 ``[D, D]`` (symmetric)."""
        return self._fitted(self._t)

    @property
    def inverse_matrix(self) -> Tensor:
        """``T^{-1}``, float64 ``[D, D]``."""
        return self._fitted(self._t_inv)

    @property
    def eigenvalues(self) -> Tensor:
        """``S``, the covariance's eigenvalues (ascending, clamped at 0), float64 ``[D]``."""
        return self._fitted(self._eigenvalues)

    @property
    def eigenvectors(self) -> Tensor:
        """``U``, float64 ``[D, D]``, columns the eigenvectors."""
        return self._fitted(self._eigenvectors)

    @property
    def eps(self) -> float:
        if self._eps is None:
            raise NotFittedError("ZCA is not fitted")
        return self._eps

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the fitted images."""
        if self._shape is None:
            raise NotFittedError("ZCA is not fitted")
        return self._shape

    # ------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (``torch.load(..., weights_only=True)`` safe): ``mean``, ``eigenvalues``,
        ``eigenvectors``, ``eps`` (0-d float64), ``feature_shape`` (int64 ``[3]``)."""
        self._need("state_dict")
        return {
            "mean": self.mean.clone(),
            "eigenvalues": self.eigenvalues.clone(),
            "eigenvectors": self.eigenvectors.clone(),
            "eps": torch.tensor(self.eps, dtype=torch.float64),
            "feature_shape": torch.tensor(self.feature_shape, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> ZCA:
        """Restore from `state_dict` (``T``, ``T^{-1}`` recomputed); returns ``self``."""
        missing = [k for k in _STATE_KEYS if k not in state]
        extra = [k for k in state if k not in _STATE_KEYS]
        if missing or extra:
            raise ValueError(f"ZCA state: missing keys {missing}, unexpected keys {extra}")
        shape_t = torch.as_tensor(state["feature_shape"])
        if shape_t.shape != (3,) or bool((shape_t < 1).any()):
            raise ValueError(f"ZCA state: feature_shape must be 3 positive ints, got {shape_t}")
        shape = tuple(int(v) for v in shape_t.tolist())
        d = shape[0] * shape[1] * shape[2]
        mean = torch.as_tensor(state["mean"]).to(torch.float64)
        s = torch.as_tensor(state["eigenvalues"]).to(torch.float64)
        u = torch.as_tensor(state["eigenvectors"]).to(device=mean.device, dtype=torch.float64)
        s = s.to(mean.device)
        if mean.shape != (d,) or s.shape != (d,) or u.shape != (d, d):
            raise ValueError(
                f"ZCA state: expected mean [{d}], eigenvalues [{d}], eigenvectors [{d}, {d}], got "
                f"{tuple(mean.shape)}, {tuple(s.shape)}, {tuple(u.shape)}"
            )
        eps = float(torch.as_tensor(state["eps"]).item())
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"ZCA state: eps must be positive and finite, got {eps}")
        self._set(mean, s, u, eps, shape)
        return self

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ZCA:
        """A new `ZCA` from `state_dict`."""
        return cls().load_state_dict(state)

    def save(self, path: str | Path) -> Path:
        """Write `state_dict` to ``path`` (atomically; tensors only)."""
        return atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> ZCA:
        """A `ZCA` from a file written by `save`, read as data only
        (``weights_only=True``: a file that would run code is refused)."""
        state = load_data(path, "ZCA state")
        if not isinstance(state, dict):
            raise ValueError(
                f"{path}: a ZCA state is a dict of tensors, got {type(state).__name__}"
            )
        return cls.from_state(state)

    def __repr__(self) -> str:
        if self._shape is None:
            return "ZCA(unfitted)"
        return f"ZCA(feature_shape={self._shape}, eps={self._eps})"
