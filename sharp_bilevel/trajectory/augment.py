"""Differentiable Siamese Augmentation (DSA) with randomness drawn apart from application.

MTT, FTD and DATM augment every inner-loop batch with DSA (Zhao & Bilen, 2021): per call, one
*family* is chosen uniformly from the strategy's ``_``-separated list (MTT's mode ``'S'``) and
applied with fresh per-image randomness. MTT draws that randomness from torch's global RNGs inside
the transform, so an unroll cannot be replayed. Here the two halves are separate:

* `sample_dsa` draws a `DSADraw` (the family and every random tensor it needs, on CPU)
  from a caller-owned ``torch.Generator`` only; the global RNG is never touched;
* `apply_dsa` is a deterministic, differentiable function of ``x`` given the draw.

A step plan samples one draw per inner step before the first pass and replays them bit-identically
in later passes (at ``phi + eps``, or from a restart). One draw applied to two batches of the same
shape applies the same transformation to both (the "Siamese" property).

Families (``x`` is ``[B, C, H, W]``; ``u ~ U[0, 1)`` i.i.d. per image; MTT's sampling ranges):

* ``color``: brightness, then saturation, then contrast, each with its own ``u``:
  ``x <- x + (u_b - 1/2) * brightness``;
  ``x <- (x - m_c) * (u_s * saturation) + m_c`` with ``m_c`` the mean over channels (per pixel);
  ``x <- (x - m) * (u_c + contrast) + m`` with ``m`` the mean over ``C, H, W`` (per image).
* ``crop``: integer shifts ``(d_h, d_w)`` uniform on ``{-s_h, ..., s_h} x {-s_w, ..., s_w}``,
  ``s_h = int(H * crop + 1/2)``; ``y[i, j] = x[i + d_h, j + d_w]``, zero outside the image.
* ``cutout``: side ``k_h = int(H * cutout + 1/2)`` (likewise ``k_w``), centre ``c_h`` uniform on
  ``{0, ..., H - (k_h mod 2)}``; rows ``c_h - k_h // 2 <= i < c_h - k_h // 2 + k_h`` (clipped to
  the image) times the analogous columns are set to zero.
* ``flip``: ``y = x[..., ::-1]`` (horizontal) where ``u < flip``, else ``y = x``.
* ``scale``: ``s_x = u_x (scale - 1/scale) + 1/scale``, independent ``s_y`` likewise; the output at
  normalised coordinates ``(p_x, p_y)`` samples ``x`` at ``(s_x p_x, s_y p_y)``.
* ``rotate``: ``a = (2u - 1) * rotate`` degrees; the output at ``p`` samples ``x`` at
  ``[[cos a, -sin a], [sin a, cos a]] p``; on a square image ``a = 90`` equals
  ``torch.rot90(x, 1, (2, 3))``.

``scale`` and ``rotate`` use ``affine_grid``/``grid_sample`` with ``align_corners=True``,
bilinear interpolation and zero padding (as MTT), so a zero angle or unit scale is the identity up
to rounding. MTT's draw order within a family is kept (``s_x`` for all images, then ``s_y``; the
three colour factors in turn), but the numbers differ from MTT's for the same seed since MTT mixes
the CPU and device generators. With one channel, ``saturation`` is a no-op (``x = m_c``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DSA",
    "DSA_FAMILIES",
    "DSADraw",
    "DSAParams",
    "apply_dsa",
    "dsa",
    "sample_dsa",
]

#: Every family a strategy may name.
DSA_FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")

# Per family: the draw's tensor keys -> (trailing shape after [B], dtype kind).
_FLOAT, _LONG, _BOOL = "float", "long", "bool"
_DRAW_KEYS: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {
    "color": {
        "brightness_shift": ((), _FLOAT),
        "saturation_factor": ((), _FLOAT),
        "contrast_factor": ((), _FLOAT),
    },
    "crop": {"crop_shift": ((2,), _LONG)},
    "cutout": {"cutout_center": ((2,), _LONG)},
    "flip": {"flip_mask": ((), _BOOL)},
    "scale": {"scale_factors": ((2,), _FLOAT)},
    "rotate": {"rotate_angle": ((), _FLOAT)},
}

_INF = math.inf


def _check_number(name: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"DSAParams.{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and lo <= v <= hi):
        hi_txt = "inf)" if hi == _INF else f"{hi:g}]"
        raise ValueError(f"DSAParams.{name} must be finite and in [{lo:g}, {hi_txt}, got {value!r}")
    return v


@dataclass(frozen=True)
class DSAParams:
    """DSA strengths; defaults are MTT's ``ParamDiffAug`` (mode ``'S'``).

    Attributes (allowed range):
        strategy: ``_``-separated families from `DSA_FAMILIES`; one entry is chosen
            uniformly per call (a repeated entry is chosen proportionally more often).
        scale: ``[1, inf)``; per-axis scale factors uniform in ``[1/scale, scale]``.
        rotate: ``[0, 180]`` degrees; angle uniform in ``[-rotate, rotate]``.
        crop: ``[0, 1]``; maximal translation ``int(size * crop + 1/2)`` pixels.
        cutout: ``[0, 1]``; side of the zeroed square ``int(size * cutout + 1/2)`` pixels.
        flip: ``[0, 1]``; probability of a horizontal flip.
        brightness: ``[0, inf)``; additive shift uniform in ``[-brightness/2, brightness/2)``.
        saturation: ``[0, inf)``; chroma factor uniform in ``[0, saturation)``.
        contrast: ``[0, inf)``; contrast factor uniform in ``[contrast, contrast + 1)``.
    """

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    scale: float = 1.2
    rotate: float = 15.0
    crop: float = 0.125
    cutout: float = 0.5
    flip: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, str) or not self.strategy:
            raise ValueError(
                f"DSAParams.strategy must be a non-empty '_'-separated string of families from "
                f"{list(DSA_FAMILIES)}, got {self.strategy!r}"
            )
        unknown = [f for f in self.strategy.split("_") if f not in DSA_FAMILIES]
        if unknown:
            raise ValueError(
                f"DSAParams.strategy {self.strategy!r} names unknown families {unknown}; "
                f"allowed: {list(DSA_FAMILIES)}"
            )
        ranges = {
            "scale": (1.0, _INF),
            "rotate": (0.0, 180.0),
            "crop": (0.0, 1.0),
            "cutout": (0.0, 1.0),
            "flip": (0.0, 1.0),
            "brightness": (0.0, _INF),
            "saturation": (0.0, _INF),
            "contrast": (0.0, _INF),
        }
        for name, (lo, hi) in ranges.items():
            object.__setattr__(self, name, _check_number(name, getattr(self, name), lo, hi))

    @property
    def families(self) -> tuple[str, ...]:
        """The strategy's entries, in order (duplicates kept)."""
        return tuple(self.strategy.split("_"))


@dataclass(frozen=True, eq=False)
class DSADraw:
    """The randomness of one DSA call: the chosen ``family`` and its per-image tensors.

    ``values`` holds, for ``B`` images (keys per family):

    * ``color``: ``brightness_shift``, ``saturation_factor``, ``contrast_factor``, float ``[B]``
      (the resolved ``(u_b - 1/2) * brightness``, ``u_s * saturation``, ``u_c + contrast``);
    * ``crop``: ``crop_shift``, int64 ``[B, 2]``, ``(d_h, d_w)`` in pixels;
    * ``cutout``: ``cutout_center``, int64 ``[B, 2]``, ``(c_h, c_w)`` in pixels;
    * ``flip``: ``flip_mask``, bool ``[B]``, True where the image is flipped;
    * ``scale``: ``scale_factors``, float ``[B, 2]``, ``(s_x, s_y)`` (width, height);
    * ``rotate``: ``rotate_angle``, float ``[B]``, radians.

    ``image_size`` is the ``(H, W)`` it was drawn for. Floats are float64; `apply_dsa` casts
    them to ``x``'s dtype and device. Identity comparison only (``eq=False``): compare the tensors.
    """

    family: str
    values: Mapping[str, Tensor]
    image_size: tuple[int, int]
    batch_size: int = field(init=False)

    def __post_init__(self) -> None:
        if self.family not in _DRAW_KEYS:
            raise ValueError(
                f"DSADraw.family must be one of {list(DSA_FAMILIES)}, got {self.family!r}"
            )
        spec = _DRAW_KEYS[self.family]
        if set(self.values) != set(spec):
            raise ValueError(
                f"DSADraw for family {self.family!r} needs exactly the keys {sorted(spec)}, "
                f"got {sorted(self.values)}"
            )
        size = tuple(self.image_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) for s in size):
            raise ValueError(f"DSADraw.image_size must be two ints (H, W), got {self.image_size!r}")
        if min(size) < 1:
            raise ValueError(f"DSADraw.image_size must be positive, got {self.image_size!r}")
        batch: int | None = None
        for key, (trailing, kind) in spec.items():
            t = self.values[key]
            if not isinstance(t, Tensor):
                raise TypeError(f"DSADraw.values[{key!r}] must be a Tensor, got {type(t).__name__}")
            ok_kind = {
                _FLOAT: t.is_floating_point(),
                _LONG: t.dtype == torch.int64,
                _BOOL: t.dtype == torch.bool,
            }[kind]
            if not ok_kind or t.dim() != 1 + len(trailing) or tuple(t.shape[1:]) != trailing:
                want = "[B" + "".join(f", {d}" for d in trailing) + "]"
                raise ValueError(
                    f"DSADraw.values[{key!r}] must be a {kind} tensor of shape {want}, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
            if batch is None:
                batch = int(t.shape[0])
            elif t.shape[0] != batch:
                raise ValueError(f"DSADraw.values disagree on the batch size ({dict(self.values)})")
        assert batch is not None
        if batch < 1:
            raise ValueError("DSADraw needs a batch of at least one image")
        object.__setattr__(self, "values", dict(self.values))
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        object.__setattr__(self, "batch_size", batch)

    def select(self, positions: Tensor) -> DSADraw:
        """The draw of the images at ``positions`` of the batch (a sharded rank's members), in
        that order: applying it to those images equals applying the whole draw and selecting."""
        positions = positions.to("cpu", torch.int64)
        return DSADraw(
            self.family,
            {k: v[positions.to(v.device)] for k, v in self.values.items()},
            self.image_size,
        )

    def to(self, device: torch.device | str) -> DSADraw:
        """A copy with every tensor on ``device``."""
        return DSADraw(
            self.family, {k: v.to(device) for k, v in self.values.items()}, self.image_size
        )


def _rand(n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu()


def _randint(lo: int, hi_inclusive: int, n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(
        lo, hi_inclusive + 1, (n,), generator=generator, device=generator.device
    ).cpu()


def _side(size: int, ratio: float) -> int:
    """MTT's ``int(size * ratio + 0.5)`` (round half up)."""
    return int(size * ratio + 0.5)


def sample_dsa(
    batch_size: int,
    image_size: tuple[int, int],
    params: DSAParams,
    generator: torch.Generator,
) -> DSADraw:
    """Draw one DSA call's randomness for ``batch_size`` images of ``image_size = (H, W)``.

    Consumes ``generator`` only: first the family index (uniform over ``params.families``), then
    that family's per-image draws (ranges in the module docstring). The result lives on CPU.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    size = tuple(image_size)
    if (
        len(size) != 2
        or any(isinstance(s, bool) or not isinstance(s, int) for s in size)
        or min(size) < 1
    ):
        raise ValueError(f"image_size must be two positive ints (H, W), got {image_size!r}")
    if not isinstance(params, DSAParams):
        raise TypeError(f"params must be a DSAParams, got {type(params).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    h, w = int(size[0]), int(size[1])
    b = batch_size
    families = params.families
    index = torch.randint(0, len(families), (1,), generator=generator, device=generator.device)
    family = families[int(index.item())]
    values: dict[str, Tensor]
    if family == "color":
        values = {
            "brightness_shift": (_rand(b, generator) - 0.5) * params.brightness,
            "saturation_factor": _rand(b, generator) * params.saturation,
            "contrast_factor": _rand(b, generator) + params.contrast,
        }
    elif family == "crop":
        sh, sw = _side(h, params.crop), _side(w, params.crop)
        dh = _randint(-sh, sh, b, generator)
        dw = _randint(-sw, sw, b, generator)
        values = {"crop_shift": torch.stack([dh, dw], dim=1)}
    elif family == "cutout":
        kh, kw = _side(h, params.cutout), _side(w, params.cutout)
        ch = _randint(0, h - kh % 2, b, generator)
        cw = _randint(0, w - kw % 2, b, generator)
        values = {"cutout_center": torch.stack([ch, cw], dim=1)}
    elif family == "flip":
        values = {"flip_mask": _rand(b, generator) < params.flip}
    elif family == "scale":
        lo = 1.0 / params.scale
        sx = _rand(b, generator) * (params.scale - lo) + lo
        sy = _rand(b, generator) * (params.scale - lo) + lo
        values = {"scale_factors": torch.stack([sx, sy], dim=1)}
    else:  # rotate
        degrees = (_rand(b, generator) - 0.5) * 2.0 * params.rotate
        values = {"rotate_angle": degrees * (math.pi / 180.0)}
    return DSADraw(family, values, (h, w))


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _per_image(v: Tensor, x: Tensor) -> Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def apply_dsa(x: Tensor, draw: DSADraw, params: DSAParams) -> Tensor:
    """Apply ``draw`` to ``x`` (``[B, C, H, W]``, floating, any device); differentiable in ``x``.

    Deterministic: the same draw gives bit-identical results on the same device and dtype.
    ``params`` must be the ones the draw was sampled with: ``draw.family`` must be one of its
    families, and ``params.cutout`` sets the cutout side (all other magnitudes are in the draw).
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a [B, C, H, W] tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if not isinstance(draw, DSADraw):
        raise TypeError(f"draw must be a DSADraw, got {type(draw).__name__}")
    if not isinstance(params, DSAParams):
        raise TypeError(f"params must be a DSAParams, got {type(params).__name__}")
    b, _, h, w = x.shape
    if b != draw.batch_size:
        raise ValueError(f"x has batch size {b} but the draw was made for {draw.batch_size}")
    if (h, w) != draw.image_size:
        raise ValueError(f"x has image size {(h, w)} but the draw was made for {draw.image_size}")
    if draw.family not in params.families:
        raise ValueError(
            f"draw family {draw.family!r} is not in params.strategy {params.strategy!r}"
        )
    v = draw.values
    family = draw.family
    if family == "color":
        x = x + _per_image(v["brightness_shift"], x)
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * _per_image(v["saturation_factor"], x) + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * _per_image(v["contrast_factor"], x) + m
    elif family == "crop":
        shift = v["crop_shift"].to(x.device)
        rows = torch.arange(h, device=x.device) + shift[:, :1]  # [B, H]
        cols = torch.arange(w, device=x.device) + shift[:, 1:]  # [B, W]
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        bidx = torch.arange(b, device=x.device)[:, None, None]
        # Advanced indices around the channel slice put [B, H, W] first: [B, H, W, C].
        picked = x[bidx, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
        x = torch.where(inside[:, None], picked.permute(0, 3, 1, 2), x.new_zeros(()))
    elif family == "cutout":
        kh, kw = _side(h, params.cutout), _side(w, params.cutout)
        centre = v["cutout_center"].to(x.device)
        top, left = centre[:, :1] - kh // 2, centre[:, 1:] - kw // 2
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        in_r = (rows >= top) & (rows < top + kh)  # [B, H]
        in_c = (cols >= left) & (cols < left + kw)  # [B, W]
        keep = ~(in_r[:, :, None] & in_c[:, None, :])
        x = x * keep[:, None].to(x.dtype)
    elif family == "flip":
        mask = v["flip_mask"].to(x.device).view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    elif family == "scale":
        s = v["scale_factors"].to(device=x.device, dtype=x.dtype)
        theta = x.new_zeros(b, 2, 3)
        theta[:, 0, 0] = s[:, 0]
        theta[:, 1, 1] = s[:, 1]
        x = _affine(x, theta)
    else:  # rotate
        a = v["rotate_angle"].to(device=x.device, dtype=x.dtype)
        cos, sin = torch.cos(a), torch.sin(a)
        theta = x.new_zeros(b, 2, 3)
        theta[:, 0, 0] = cos
        theta[:, 0, 1] = -sin
        theta[:, 1, 0] = sin
        theta[:, 1, 1] = cos
        x = _affine(x, theta)
    return x.contiguous()


def dsa(x: Tensor, params: DSAParams, generator: torch.Generator) -> Tensor:
    """``apply_dsa(x, sample_dsa(B, (H, W), params, generator), params)``."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a [B, C, H, W] tensor, got {shape}")
    draw = sample_dsa(int(x.shape[0]), (int(x.shape[2]), int(x.shape[3])), params, generator)
    return apply_dsa(x, draw, params)


@dataclass(frozen=True)
class DSA:
    """DSA as a replayable augmentation object: ``sample`` draws, ``apply`` applies.

    ``sample(batch_shape, generator)`` takes the full ``[B, C, H, W]`` shape, so the object fits a
    step plan's ``sample``/``apply`` protocol; ``DSA(params)(x, generator)`` is `dsa`.
    """

    params: DSAParams = field(default_factory=DSAParams)

    def sample(self, batch_shape: tuple[int, ...], generator: torch.Generator) -> DSADraw:
        """`sample_dsa` for a batch of shape ``[B, C, H, W]``."""
        shape = tuple(batch_shape)
        if len(shape) != 4:
            raise ValueError(f"batch_shape must be [B, C, H, W], got {batch_shape!r}")
        return sample_dsa(int(shape[0]), (int(shape[2]), int(shape[3])), self.params, generator)

    def apply(self, x: Tensor, draw: DSADraw) -> Tensor:
        """`apply_dsa` with this object's params."""
        return apply_dsa(x, draw, self.params)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return dsa(x, self.params, generator)
