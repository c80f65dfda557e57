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


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The matplotlib figures the report functions save, kept for inspection."""
    from matplotlib.figure import Figure

    saved: list[object] = []
    original = Figure.savefig

    def keep(self: Figure, *args: object, **kwargs: object) -> None:
        saved.append(self)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def _texts(figure: object) -> str:
    """Every piece of text drawn on a figure: figure texts, suptitle, axes titles and labels."""
    from matplotlib.text import Text

    return "\n".join(t.get_text() for t in figure.findobj(Text))  # type: ignore[attr-defined]


def test_the_charts_name_their_data_set_and_ipc_when_given_a_title(
    tmp_path: Path, saved_figures: list[object]
) -> None:
    from sharp_bilevel.distill.report import save_accuracy_chart

    accuracy = {"random real": {"ConvNet": (0.5, 0.0)}, "mtt-sam": {"ConvNet": (0.6, 0.01)}}
    save_accuracy_chart(accuracy, tmp_path / "a.png", title="digits, IPC 10")
    save_curves({"a": {"loss": [1.0, 0.5]}}, tmp_path / "c.png", title="cifar10, IPC 50")
    save_accuracy_chart(accuracy, tmp_path / "b.png")  # no title: no stray text
    chart, curves, untitled = (_texts(f) for f in saved_figures)
    assert "digits, IPC 10" in chart
    assert "cifar10, IPC 50" in curves
    assert "IPC" not in untitled
    assert "distilled sets" in untitled  # the chart still says what the bars are


def test_the_curves_say_a_smaller_gradient_norm_comes_from_fewer_steps_not_flatness(
    tmp_path: Path, saved_figures: list[object]
) -> None:
    save_curves({"mtt-satm": {"grad_norm": [0.3, 0.2]}}, tmp_path / "c.png")
    (figure,) = saved_figures
    note = " ".join(t.get_text() for t in figure.texts)  # type: ignore[attr-defined]
    assert "hypergradient norm" in note
    assert "fewer inner steps" in note
    assert "not because they are flatter" in note
