"""Figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["image_grid"]


def image_grid(images: torch.Tensor, path: str | Path, *, ncol: int | None = None) -> Path:
    """Write ``images: (n, C, H, W)`` with values in [0, 1] (C = 1 or 3) as one PNG grid, 1-pixel white gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.ones(c, nrow * (h + 1) + 1, ncol * (w + 1) + 1)
    for k in range(n):
        r, q = divmod(k, ncol)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = images[k]
    # Small images (8×8 digits) are enlarged with square pixels so the grid is readable (~400 px wide).
    zoom = max(1, 400 // grid.shape[-1])
    grid = grid.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
    grid = grid.clamp(0, 1).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    return path
