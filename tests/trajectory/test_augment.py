"""DSA: each family against an independent reference, exact replay, RNG isolation, gradients."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sharp_bilevel.trajectory.augment import (
    DSA,
    DSA_FAMILIES,
    DSADraw,
    DSAParams,
    apply_dsa,
    dsa,
    sample_dsa,
)

P = DSAParams()
F64 = torch.float64


def _x(b: int = 3, c: int = 3, h: int = 6, w: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _only(family: str, **kw: float) -> DSAParams:
    return DSAParams(strategy=family, **kw)


def _draw_for(family: str, b: int, size: tuple[int, int], seed: int = 1, **kw: float) -> DSADraw:
    return sample_dsa(b, size, _only(family, **kw), torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- references
def _bilinear_reference(img: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """grid_sample(affine_grid(theta)) with align_corners=True, zero padding, by hand."""
    _, h, w = img.shape
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            px, py = -1 + 2 * j / (w - 1), -1 + 2 * i / (h - 1)
            qx, qy = theta @ np.array([px, py, 1.0])
            fx, fy = (qx + 1) * (w - 1) / 2, (qy + 1) * (h - 1) / 2
            x0, y0 = math.floor(fx), math.floor(fy)
            for yy, wy in ((y0, 1 - (fy - y0)), (y0 + 1, fy - y0)):
                for xx, wx in ((x0, 1 - (fx - x0)), (x0 + 1, fx - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, i, j] += wy * wx * img[:, yy, xx]
    return out


# ----------------------------------------------------------------------------- families
def test_flip_matches_torch_flip_on_selected_images() -> None:
    x = _x(b=4)
    mask = torch.tensor([True, False, True, False])
    y = apply_dsa(x, DSADraw("flip", {"flip_mask": mask}, (6, 6)), P)
    for b in range(4):
        want = torch.flip(x[b], dims=[-1]) if mask[b] else x[b]
        assert torch.equal(y[b], want)


@pytest.mark.parametrize(("prob", "flipped"), [(0.0, False), (1.0, True)])
def test_flip_probability_extremes(prob: float, flipped: bool) -> None:
    x = _x(b=5)
    y = apply_dsa(x, _draw_for("flip", 5, (6, 6), flip=prob), _only("flip", flip=prob))
    assert torch.equal(y, x.flip(3) if flipped else x)


def test_color_closed_form() -> None:
    x = _x(b=3, c=3, h=4, w=5)
    draw = _draw_for("color", 3, (4, 5))
    y = apply_dsa(x, draw, P).numpy()
    xs = x.numpy()
    bs, sf, cf = (draw.values[k].numpy() for k in draw.values)
    for b in range(3):
        z = xs[b] + bs[b]
        m = z.mean(axis=0, keepdims=True)
        z = (z - m) * sf[b] + m
        m2 = z.mean()
        z = (z - m2) * cf[b] + m2
        np.testing.assert_allclose(y[b], z, rtol=0, atol=1e-12)


def test_color_draw_ranges_match_params() -> None:
    params = _only("color", brightness=0.8, saturation=3.0, contrast=0.25)
    d = sample_dsa(4000, (2, 2), params, torch.Generator().manual_seed(3))
    bs = d.values["brightness_shift"]
    sf = d.values["saturation_factor"]
    cf = d.values["contrast_factor"]
    assert -0.4 <= bs.min() < -0.39
    assert 0.39 < bs.max() < 0.4
    assert 0.0 <= sf.min() < 0.01
    assert 2.99 < sf.max() < 3.0
    assert 0.25 <= cf.min() < 0.26
    assert 1.24 < cf.max() < 1.25
    # Three independent draws, not one reused.
    assert not torch.allclose(bs / 0.8 + 0.5, sf / 3.0)


def test_color_single_channel_saturation_is_noop() -> None:
    x = _x(b=2, c=1)
    d = DSADraw(
        "color",
        {
            "brightness_shift": torch.zeros(2, dtype=F64),
            "saturation_factor": torch.tensor([0.0, 5.0], dtype=F64),
            "contrast_factor": torch.ones(2, dtype=F64),
        },
        (6, 6),
    )
    torch.testing.assert_close(apply_dsa(x, d, P), x, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shift", [(0, 0), (2, -1), (-3, 3), (1, 0), (-6, 0), (0, 7)])
def test_crop_integer_shift_equals_padded_slice(shift: tuple[int, int]) -> None:
    x = _x(b=2, c=2, h=6, w=7)
    dh, dw = shift
    d = DSADraw("crop", {"crop_shift": torch.tensor([[dh, dw], [0, 0]])}, (6, 7))
    y = apply_dsa(x, d, P)
    pad = 8
    xp = F.pad(x, [pad, pad, pad, pad])
    want = xp[0, :, pad + dh : pad + dh + 6, pad + dw : pad + dw + 7]
    assert torch.equal(y[0], want)
    assert torch.equal(y[1], x[1])


def test_crop_shift_range_is_mtt() -> None:
    # int(size * 0.125 + 0.5): 32 -> 4, 28 -> int(4.0) = 4 (round half up), 20 -> int(3.0) = 3.
    for size, (sh, sw) in (((32, 32), (4, 4)), ((28, 20), (4, 3))):
        shift = _draw_for("crop", 3000, size).values["crop_shift"]
        assert set(shift[:, 0].tolist()) == set(range(-sh, sh + 1))
        assert set(shift[:, 1].tolist()) == set(range(-sw, sw + 1))


def _cutout_reference(
    x: torch.Tensor, centres: list[tuple[int, int]], k: tuple[int, int]
) -> torch.Tensor:
    y = x.clone()
    h, w = x.shape[2:]
    for b, (ch, cw) in enumerate(centres):
        r0, c0 = ch - k[0] // 2, cw - k[1] // 2
        rows = [r for r in range(r0, r0 + k[0]) if 0 <= r < h]
        cols = [c for c in range(c0, c0 + k[1]) if 0 <= c < w]
        for r in rows:
            for c in cols:
                y[b, :, r, c] = 0
    return y


@pytest.mark.parametrize(("size", "ratio"), [((8, 8), 0.5), ((7, 9), 0.5), ((8, 8), 0.3)])
def test_cutout_matches_hand_mask(size: tuple[int, int], ratio: float) -> None:
    h, w = size
    k = (int(h * ratio + 0.5), int(w * ratio + 0.5))
    centres = [(0, 0), (h // 2, w // 2), (h - 1, w), (3, 1)]
    x = _x(b=4, c=2, h=h, w=w) + 10.0  # no accidental zeros
    d = DSADraw("cutout", {"cutout_center": torch.tensor(centres)}, size)
    y = apply_dsa(x, d, _only("cutout", cutout=ratio))
    assert torch.equal(y, _cutout_reference(x, centres, k))
    # An interior square zeroes exactly k_h * k_w pixels in every channel.
    assert int((y[1] == 0).sum()) == 2 * k[0] * k[1]


def test_cutout_centre_range_is_mtt() -> None:
    # side 16 (even): centres in {0..32}; side int(30*0.5+0.5)=15 (odd): centres in {0..29}.
    d = _draw_for("cutout", 4000, (32, 30))
    c = d.values["cutout_center"]
    assert set(c[:, 0].tolist()) == set(range(33))
    assert set(c[:, 1].tolist()) == set(range(30))


def test_scale_unit_and_rotate_zero_are_identity() -> None:
    x = _x(b=2, h=5, w=7)
    ds = DSADraw("scale", {"scale_factors": torch.ones(2, 2, dtype=F64)}, (5, 7))
    dr = DSADraw("rotate", {"rotate_angle": torch.zeros(2, dtype=F64)}, (5, 7))
    torch.testing.assert_close(apply_dsa(x, ds, P), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_dsa(x, dr, P), x, rtol=0, atol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(apply_dsa(x32, ds, P), x32, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("angle", "k"), [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_rotate_right_angles_equal_rot90(angle: float, k: int) -> None:
    x = _x(b=2, h=6, w=6)
    a = torch.full((2,), math.radians(angle), dtype=F64)
    y = apply_dsa(x, DSADraw("rotate", {"rotate_angle": a}, (6, 6)), P)
    torch.testing.assert_close(y, torch.rot90(x, k, dims=(2, 3)), rtol=0, atol=1e-12)
    y32 = apply_dsa(x.float(), DSADraw("rotate", {"rotate_angle": a}, (6, 6)), P)
    torch.testing.assert_close(y32, torch.rot90(x.float(), k, dims=(2, 3)), rtol=0, atol=1e-5)


def test_scale_matches_hand_bilinear() -> None:
    x = _x(b=2, c=2, h=5, w=6)
    s = torch.tensor([[1.2, 0.9], [0.85, 1.1]], dtype=F64)
    y = apply_dsa(x, DSADraw("scale", {"scale_factors": s}, (5, 6)), P).numpy()
    for b in range(2):
        theta = np.array([[s[b, 0].item(), 0, 0], [0, s[b, 1].item(), 0]])
        np.testing.assert_allclose(y[b], _bilinear_reference(x[b].numpy(), theta), atol=1e-12)


def test_rotate_matches_hand_bilinear() -> None:
    x = _x(b=2, c=2, h=5, w=6)
    a = torch.tensor([0.2, -0.26], dtype=F64)
    y = apply_dsa(x, DSADraw("rotate", {"rotate_angle": a}, (5, 6)), P).numpy()
    for b in range(2):
        ca, sa = math.cos(a[b].item()), math.sin(a[b].item())
        theta = np.array([[ca, -sa, 0], [sa, ca, 0]])
        np.testing.assert_allclose(y[b], _bilinear_reference(x[b].numpy(), theta), atol=1e-12)


def test_scale_and_rotate_draw_ranges() -> None:
    s = _draw_for("scale", 4000, (8, 8)).values["scale_factors"]
    assert 1 / 1.2 <= s.min() < 1 / 1.2 + 0.01
    assert 1.19 < s.max() < 1.2
    assert abs(float(torch.corrcoef(s.T)[0, 1])) < 0.1  # s_x and s_y drawn independently
    a = _draw_for("rotate", 4000, (8, 8)).values["rotate_angle"]
    lim = math.radians(15.0)
    assert -lim <= a.min() < -lim * 0.99
    assert lim * 0.99 < a.max() < lim
    f = _draw_for("flip", 4000, (8, 8)).values["flip_mask"]
    assert 0.45 < f.double().mean() < 0.55


# ----------------------------------------------------------------------------- replay
def test_same_seed_is_bit_identical_and_draw_reapplies_identically() -> None:
    x = _x(b=4, h=8, w=8)

    def run(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [dsa(x, P, g) for _ in range(30)]

    a, b = run(7), run(7)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a, run(8), strict=True))
    for seed in range(12):
        d = sample_dsa(4, (8, 8), P, torch.Generator().manual_seed(seed))
        assert torch.equal(apply_dsa(x, d, P), apply_dsa(x, d, P))


def test_global_rng_untouched() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    g = torch.Generator().manual_seed(0)
    x = _x(b=3, h=8, w=8)
    seen = set()
    for _ in range(60):
        d = sample_dsa(3, (8, 8), P, g)
        seen.add(d.family)
        torch.autograd.grad(apply_dsa(x.requires_grad_(), d, P).sum(), x)
    assert seen == set(DSA_FAMILIES)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("family", ["crop", "cutout", "flip", "scale", "rotate"])
def test_siamese_same_transform_for_both_batches(family: str) -> None:
    # The geometric families act on each channel alike, so applying one draw to two batches
    # separately equals applying it to their channel-wise concatenation.
    x1, x2 = _x(b=4, c=3, h=8, w=8, seed=1), _x(b=4, c=2, h=8, w=8, seed=2)
    d = _draw_for(family, 4, (8, 8), seed=5, flip=0.5)
    both = apply_dsa(torch.cat([x1, x2], dim=1), d, P)
    sep = torch.cat([apply_dsa(x1, d, P), apply_dsa(x2, d, P)], dim=1)
    torch.testing.assert_close(both, sep, rtol=0, atol=1e-14)


def test_family_choice_roughly_uniform() -> None:
    g = torch.Generator().manual_seed(11)
    n = 6000
    counts = Counter(sample_dsa(1, (4, 4), P, g).family for _ in range(n))
    assert set(counts) == set(DSA_FAMILIES)
    for c in counts.values():  # expected 1000, sd ~ 29
        assert 880 < c < 1120, counts
    counts2 = Counter(sample_dsa(1, (4, 4), _only("flip_flip_crop"), g).family for _ in range(3000))
    assert 1850 < counts2["flip"] < 2150, counts2


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_gradcheck(family: str) -> None:
    d = _draw_for(family, 2, (5, 5), seed=4, flip=0.5)
    x = _x(b=2, c=3, h=5, w=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: apply_dsa(t, d, P), (x,))


def test_dtype_device_and_to() -> None:
    x = _x(b=2).float()
    for seed in range(12):
        d = sample_dsa(2, (6, 6), P, torch.Generator().manual_seed(seed))
        assert all(v.device.type == "cpu" for v in d.values.values())
        y = apply_dsa(x, d.to("cpu"), P)
        assert y.dtype == torch.float32
        assert y.shape == x.shape
        assert y.is_contiguous()
    aug = DSA(P)
    d = aug.sample((2, 3, 6, 6), torch.Generator().manual_seed(0))
    assert torch.equal(aug.apply(x, d), apply_dsa(x, d, P))
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), apply_dsa(x, d, P))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"scale": 0.9}, "scale"),
        ({"rotate": -1.0}, "rotate"),
        ({"rotate": 181.0}, "rotate"),
        ({"crop": 1.5}, "crop"),
        ({"cutout": -0.1}, "cutout"),
        ({"flip": 1.01}, "flip"),
        ({"brightness": -1.0}, "brightness"),
        ({"saturation": float("nan")}, "saturation"),
        ({"contrast": float("inf")}, "contrast"),
    ],
)
def test_params_validation(kw: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=rf"DSAParams\.{field} must be finite and in \["):
        DSAParams(**kw)  # type: ignore[arg-type]


def test_params_strategy_and_type_validation() -> None:
    with pytest.raises(ValueError, match=r"unknown families \['blur', 'noise'\].*allowed"):
        DSAParams(strategy="color_blur_noise")
    with pytest.raises(ValueError, match="non-empty"):
        DSAParams(strategy="")
    with pytest.raises(TypeError, match="flip"):
        DSAParams(flip=True)
    assert isinstance(DSAParams(scale=2).scale, float)
    assert DSAParams().families == DSA_FAMILIES


def test_apply_and_sample_validation() -> None:
    d = _draw_for("flip", 3, (6, 6))
    with pytest.raises(ValueError, match="batch size 2 but the draw was made for 3"):
        apply_dsa(_x(b=2), d, P)
    with pytest.raises(ValueError, match="image size"):
        apply_dsa(_x(b=3, h=5), d, P)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        apply_dsa(_x(b=3)[0], d, P)
    with pytest.raises(ValueError, match="floating"):
        apply_dsa(torch.zeros(3, 1, 6, 6, dtype=torch.int64), d, P)
    with pytest.raises(ValueError, match=r"not in params\.strategy"):
        apply_dsa(_x(b=3), d, _only("crop"))
    with pytest.raises(ValueError, match="batch_size"):
        sample_dsa(0, (6, 6), P, torch.Generator())
    with pytest.raises(ValueError, match="image_size"):
        sample_dsa(2, (6,), P, torch.Generator())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator"):
        sample_dsa(2, (6, 6), P, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="family"):
        DSADraw("blur", {}, (6, 6))
    with pytest.raises(ValueError, match="keys"):
        DSADraw("flip", {"crop_shift": torch.zeros(2, 2, dtype=torch.int64)}, (6, 6))
    with pytest.raises(ValueError, match="bool tensor"):
        DSADraw("flip", {"flip_mask": torch.zeros(2)}, (6, 6))
