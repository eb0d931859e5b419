"""Figures (matplotlib): each is a ``matplotlib.figure.Figure`` saved to a file, without pyplot.

No backend is chosen and no pyplot figure is opened, so a notebook's or a GUI's backend and figure list stay as
they were, and no display is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["image_grid", "khat_plot", "kl_per_dim_plot", "reference_plot"]


def image_grid(images: torch.Tensor, path: str | Path, *, ncol: int | None = None) -> Path:
    """Write ``images: (n, C, H, W)`` with values in [0, 1] (C = 1 or 3) as one PNG grid, 1-pixel white gaps."""
    import matplotlib.image

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
    matplotlib.image.imsave(path, grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    return path


def _figure(width: float = 6.0, height: float = 3.2) -> tuple[Figure, Axes]:
    """A figure with one axes, outside pyplot: nothing to close, the caller's backend untouched."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    return fig, fig.subplots()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)  # Figure picks the Agg canvas for a PNG itself
    return path


def khat_plot(khat: np.ndarray, threshold: float, path: str | Path) -> Path:
    """PSIS k̂ per datapoint with the 0.5 (good) and ``threshold`` (unreliable) lines."""
    fig, ax = _figure()
    k = np.where(np.isfinite(khat), khat, np.nan)
    shown = np.clip(k, -0.5, None)  # −inf (equal weights) is drawn at the bottom edge
    colors = np.where(k > threshold, "tab:red", np.where(k > 0.5, "tab:orange", "tab:blue"))
    ax.scatter(np.arange(len(k)), shown, s=6, c=colors)
    ax.axhline(0.5, color="tab:orange", lw=1, ls="--", label="0.5 (good below)")
    ax.axhline(threshold, color="tab:red", lw=1, ls="--", label=f"{threshold:.2f} (unreliable above)")
    ax.set(xlabel="datapoint", ylabel="PSIS k̂", title="Pareto k̂ of the guide's importance weights")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def kl_per_dim_plot(kl: np.ndarray, path: str | Path, collapsed: float = 0.01) -> Path:
    """E_x KL(q(z_d|x) ‖ p(z_d)) per latent dimension, sorted, with the collapse line."""
    fig, ax = _figure()
    order = np.argsort(kl)[::-1]
    ax.bar(np.arange(len(kl)), np.asarray(kl)[order], color="tab:blue")
    ax.axhline(collapsed, color="tab:red", lw=1, ls="--", label=f"{collapsed} nats (collapsed below)")
    ax.set_xticks(np.arange(len(kl)), [str(d) for d in order], fontsize=7)
    ax.set(xlabel="latent dimension (sorted)", ylabel="KL (nats)", yscale="symlog", title="KL per dimension")
    ax.legend(fontsize=8)
    return _save(fig, path)


def reference_plot(reference, path: str | Path, max_dims: int = 4) -> Path:
    """Marginals of q (guide draws) against the NUTS reference, per datapoint (rows) and dimension (columns)."""
    from matplotlib.figure import Figure

    k, d = len(reference.index), min(max_dims, reference.draws.shape[-1])
    fig = Figure(figsize=(2.4 * d, 1.9 * k), dpi=100)
    axes = fig.subplots(k, d, squeeze=False)
    for i in range(k):
        ref = reference.draws[i].reshape(-1, reference.draws.shape[-1])
        q = reference.guide_draws[i]
        for j in range(d):
            ax = axes[i, j]
            bins = np.histogram_bin_edges(np.concatenate([ref[:, j], q[:, j]]), bins=30)
            ax.hist(ref[:, j], bins=bins, density=True, alpha=0.5, label="NUTS")
            ax.hist(q[:, j], bins=bins, density=True, alpha=0.5, label="q")
            ax.set_yticks([])
            ax.set_title(f"x[{reference.index[i]}], z{j}", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)
