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


def save_image_grid(images: Tensor, path: str | Path, columns: int) -> Path:
    """Write :func:`image_grid` as a PNG (grey for one channel)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    # Small images (8x8 digits) are enlarged by an integer factor, pixels kept square and sharp.
    scale = max(1, 48 // int(images.shape[-1]))
    tiles = image_grid(images, columns).repeat_interleave(scale, dim=0)
    grid = tiles.repeat_interleave(scale, dim=1).numpy()
    path = Path(path)
    if grid.shape[2] == 1:
        plt.imsave(path, grid[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        plt.imsave(path, grid)
    return path


def save_curves(histories: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> Path:
    """Plot the outer loss, the hypergradient norm ``||g||`` and the sharpness
    ``F(phi + eps) - F(phi)`` against the outer iteration, one line per run (SATM's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = (
        ("loss", "outer loss F(phi)"),
        ("grad_norm", "hypergradient norm"),
        ("sharpness", "sharpness F(phi+eps) - F(phi)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for k, (label, history) in enumerate(histories.items()):
            points = [(i + 1, v) for i, v in enumerate(history.get(key, [])) if not math.isnan(v)]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=label, linewidth=1.2, color=colours[k % len(colours)])
        ax.set_title(title)
        ax.set_xlabel("outer iteration")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
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
