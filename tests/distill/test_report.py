"""Image grids and JSON reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sharp_bilevel.distill.report import image_grid, save_curves, save_image_grid, write_json


def test_grid_places_each_image_scaled_to_its_own_range() -> None:
    images = torch.stack([torch.full((1, 2, 3), float(k)) for k in range(5)])
    images[:, :, 0, 0] = -1.0  # each image spans [-1, k]: min -> 0, max -> 1
    grid = image_grid(images, columns=2)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 1)
    for k in range(5):
        r, q = divmod(k, 2)
        tile = grid[1 + 3 * r : 3 + 3 * r, 1 + 4 * q : 4 + 4 * q, 0]
        assert tile[0, 0] == 0.0
        assert tile[1, 2] == 1.0
    assert grid[0].eq(1.0).all()  # white spacing
    with pytest.raises(ValueError, match=r"\[n, C, H, W\]"):
        image_grid(torch.zeros(2, 3), columns=1)


def test_png_files_and_json_with_nan(tmp_path: Path) -> None:
    save_image_grid(torch.randn(4, 3, 8, 8), tmp_path / "g.png", columns=2)
    save_curves({"a": {"loss": [1.0, 0.5], "sharpness": [math.nan, 0.1]}}, tmp_path / "c.png")
    for name in ("g.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_json({"x": [1.0, math.nan], "y": {"z": math.inf}}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": [1.0, None], "y": {"z": None}}


def test_class_grid_has_a_labelled_row_per_class_and_large_images(tmp_path: Path) -> None:
    from matplotlib import image as mpimg

    from sharp_bilevel.distill.report import save_class_grid

    initial, final = torch.randn(10 * 2, 1, 8, 8), torch.randn(10 * 2, 1, 8, 8)
    path = save_class_grid({"initial": initial, "distilled": final}, 2, tmp_path / "g.png")
    height, width = mpimg.imread(path).shape[:2]
    assert height >= 10 * 64  # ten rows of images at least 64 pixels tall
    assert width >= 2 * 2 * 64  # two panels of two images each


def test_accuracy_chart_and_curves_with_syn_lr(tmp_path: Path) -> None:
    from sharp_bilevel.distill.report import save_accuracy_chart

    accuracy = {
        "random real": {"ConvNet": (0.5, 0.02)},
        "initial images": {"ConvNet": (0.55, 0.01)},
        "mtt-none": {"ConvNet": (0.6, 0.03)},
    }
    chart = save_accuracy_chart(accuracy, tmp_path / "a.png")
    curves = save_curves({"a": {"loss": [1.0], "syn_lr": [0.01, 0.009]}}, tmp_path / "c.png")
    for path in (chart, curves):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
