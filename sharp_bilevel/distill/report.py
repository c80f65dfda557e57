"""Files a run leaves behind: image grids, training curves and the JSON report."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import atomic_write_text


def image_grid(images: Tensor, columns: int) -> Tensor:
    """Tile ``[n, C, H, W]`` into one ``[H', W', C]`` array in ``[0, 1]``, each image scaled by
    its own min/max (synthetic images have no fixed range), one pixel of spacing."""
    if images.dim() != 4:
        raise ValueError(f"images must be [n, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    x = images.detach().to(torch.float64).cpu()
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-12)
    x = (x - low) / span
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + 1) + 1, columns * (w + 1) + 1, dtype=torch.float64)
    for k in range(n):
        r, q = divmod(k, columns)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[k]
    return grid.permute(1, 2, 0)


def _upscaled(grid: Tensor, height: int, least: int = 64) -> Tensor:
    """Enlarge a grid by the integer factor that makes one image at least ``least`` pixels tall
    (nearest neighbour: pixels stay square and sharp)."""
    scale = max(1, math.ceil(least / height))
    return grid.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)


def save_image_grid(images: Tensor, path: str | Path, columns: int) -> Path:
    """Write `image_grid` as a PNG (grey for one channel), each image enlarged to at
    least 64 pixels."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    grid = _upscaled(image_grid(images, columns), int(images.shape[-2])).numpy()
    path = Path(path)
    if grid.shape[2] == 1:
        plt.imsave(path, grid[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        plt.imsave(path, grid)
    return path


def save_class_grid(
    panels: Mapping[str, Tensor],
    per_class: int,
    path: str | Path,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Side-by-side grids (e.g. ``{"initial": x0, "distilled": x}``), one row per class.

    Each tensor is a class-major synthetic set ``[classes * per_class, C, H, W]`` (rows
    ``c * per_class ... (c + 1) * per_class - 1`` are class ``c``, MTT's layout); each image is
    scaled to its own range and enlarged to at least 64 pixels, and every row is labelled.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    first = next(iter(panels.values()))
    n, channels, height, _ = first.shape
    classes = n // per_class
    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(classes)]
    grids = {k: _upscaled(image_grid(v, per_class), height).numpy() for k, v in panels.items()}
    rows, cols = next(iter(grids.values())).shape[:2]
    dpi = 100
    fig, axes = plt.subplots(
        1,
        len(grids),
        figsize=(len(grids) * (cols / dpi + 0.4) + 0.9, rows / dpi + 0.6),
        dpi=dpi,
        squeeze=False,
    )
    scale = rows / (classes * (height + 1) + 1)
    centres = [scale * (1 + c * (height + 1) + height / 2) for c in range(classes)]
    for k, (ax, (title, grid)) in enumerate(zip(axes[0], grids.items(), strict=True)):
        if channels == 1:
            ax.imshow(grid[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(grid, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks(centres, names if k == 0 else [""] * classes, fontsize=8)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_accuracy_chart(
    accuracy: Mapping[str, Mapping[str, tuple[float, float]]],
    path: str | Path,
    references: Sequence[str] = ("random real", "initial images"),
    *,
    title: str | None = None,
) -> Path:
    """Bars of mean test accuracy with one-std error bars, per run (x) and architecture
    (colour); the ``references`` rows are drawn as dashed lines per architecture instead.

    ``accuracy[run][architecture] = (mean, std)``, in ``[0, 1]``. ``title`` (e.g.
    ``"digits, 10 images per class"``) heads the chart, so that the picture names its data set
    and IPC when it travels without its folder.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = [r for r in accuracy if r not in references]
    archs = list(next(iter(accuracy.values())))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / max(1, len(archs))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(runs) + 2.5), 3.8), dpi=110)
    for a, arch in enumerate(archs):
        xs = [i + (a - (len(archs) - 1) / 2) * width for i in range(len(runs))]
        means = [100 * accuracy[r][arch][0] for r in runs]
        stds = [100 * accuracy[r][arch][1] for r in runs]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=arch, color=colours[a % 10])
        for ref, style in zip(references, ("--", ":"), strict=False):
            if ref in accuracy:
                ax.axhline(
                    100 * accuracy[ref][arch][0],
                    color=colours[a % 10],
                    linestyle=style,
                    linewidth=1,
                    label=f"{ref} ({arch})",
                )
    ax.set_xticks(range(len(runs)), runs, rotation=20, ha="right", fontsize=9)
    ax.set_ylabel("test accuracy %")
    subtitle = "distilled sets (bars: mean ± std over seeds)"
    ax.set_title(f"{title}\n{subtitle}" if title else subtitle, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_curves(
    histories: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Plot the outer loss, the hypergradient norm ``||g||``, the sharpness
    ``F(phi + eps) - F(phi)`` (SATM's Figure 2) and the learned ``syn_lr`` against the outer
    iteration, one line per run, under ``title`` when given.

    The figure carries a note under the panels: a run that differentiates through fewer inner
    steps (TUH, as SATM's preset keeps ``N/3``) has a smaller ``||g||`` for that reason alone,
    so the norm panel compares flatness only between runs that keep the same steps.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = (
        ("loss", "outer loss F(phi)"),
        ("grad_norm", "hypergradient norm"),
        ("sharpness", "sharpness F(phi+eps) - F(phi)"),
        ("syn_lr", "learned inner lr syn_lr"),
    )
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, heading) in zip(axes, panels, strict=True):
        for k, (label, history) in enumerate(histories.items()):
            points = [(i + 1, v) for i, v in enumerate(history.get(key, [])) if not math.isnan(v)]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=label, linewidth=1.2, color=colours[k % len(colours)])
        ax.set_title(heading)
        ax.set_xlabel("outer iteration")
    drawn = [ax for ax in axes if ax.lines]  # a history may lack the loss
    if drawn:
        drawn[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    note = (
        "Note: runs that differentiate through fewer inner steps (TUH; SATM keeps N/3) have a "
        "smaller hypergradient norm because it sums fewer steps' terms, not because they are "
        "flatter; the sharpness panel measures flatness."
    )
    fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, color="0.25", wrap=True)
    fig.tight_layout(rect=(0.0, 0.06, 1.0, 1.0))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON (NaN written as null), atomically."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return atomic_write_text(json.dumps(clean(data), indent=2, sort_keys=False) + "\n", path)
