"""Figures of a comparison report across a grid of VAE cells (priors × likelihoods × guides).

Every function takes ``cells``, a sequence of plain dicts (numpy arrays, one per grid cell), writes one PNG and
returns its path. A cell dict holds::

    label           str, e.g. "normal · categorical · fullrank"
    group           str, comparability group: cells of different groups never share a ranking axis
    status          "ok" | "failed"  (failed cells are skipped by every figure, silently)
    history         list of {"epoch": int from 1, "train_loss": −ELBO nats/datapoint, "val_elbo": float | None}
    log_px          (N,) per-datapoint IWAE log p̂ (nats), same test rows for every cell of a group, may hold NaN
    khat            (N,) PSIS k̂ per datapoint, may hold NaN or −inf;  khat_threshold: float
    active_units    int;  latent_dim: int
    z_mean          (M, D) encoder means of test points;  labels: (M,) int or None
    originals, reconstructions, samples   (k, C, H, W) in [0, 1], or None for non-image data

A cell keeps the same colour in every figure: its colour is chosen by its position in ``cells`` (failed cells
included), so passing the same list to each function gives consistent colours. A figure none of whose ok cells has
the data it needs raises :class:`~ppvae.errors.DataError` (a ``ValueError``); the report skips that figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ppvae._stats import paired_difference
from ppvae.errors import DataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "active_units_plot",
    "khat_distributions",
    "latent_projections",
    "learning_curves",
    "log_px_differences",
    "paired_difference",
    "reconstructions_and_samples",
]

CellDict = Mapping[str, Any]

_MAX_POINTS = 5000  # latent scatter: points drawn per panel (a fixed random subset beyond this)


def _paired_or_nan(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    keep = np.isfinite(a) & np.isfinite(b)
    return paired_difference(a, b) if keep.any() else (float("nan"), float("nan"))


# --- helpers ------------------------------------------------------------------------------------------------------


def _usable(cells: Sequence[CellDict], keys: Sequence[str], figure: str) -> list[tuple[int, CellDict]]:
    """(position, cell) of the ok cells that have every key non-None; DataError when there is none."""
    out = [(i, c) for i, c in enumerate(cells) if c.get("status") == "ok" and all(c.get(k) is not None for k in keys)]
    if not out:
        raise DataError(f"{figure}: no cell with status 'ok' has {', '.join(keys)} (of {len(cells)} cells); skip it")
    return out


def _colour(i: int, n: int):
    """Colour of the cell at position i of n: tab10 up to 10 cells, tab20 up to 20, then an evenly spaced hue."""
    import matplotlib

    if n <= 10:
        return matplotlib.colormaps["tab10"](i)
    if n <= 20:  # the ten dark hues first, then their light partners: neighbours in the list stay distinct
        return matplotlib.colormaps["tab20"](2 * i if i < 10 else 2 * (i - 10) + 1)
    return matplotlib.colormaps["hsv"](i / n)


def _groups(usable: list[tuple[int, CellDict]]) -> dict[str, list[tuple[int, CellDict]]]:
    """Usable cells by group, in first-appearance order."""
    out: dict[str, list[tuple[int, CellDict]]] = {}
    for i, c in usable:
        out.setdefault(str(c.get("group", "")), []).append((i, c))
    return out


def _subplots(
    nrows: int, ncols: int, width: float, height: float, height_ratios: Sequence[float] | None = None
) -> tuple[Figure, np.ndarray]:
    """A figure and its (nrows, ncols) axes, built outside pyplot: no backend is switched (a notebook keeps its
    own) and no figure is left open in pyplot's list."""
    from matplotlib.figure import Figure

    # Constrained layout makes room for long tick labels and for legends placed outside the axes.
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, height_ratios=height_ratios)


def _write(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)  # Figure picks the Agg canvas for a PNG itself
    return path


# --- figures ------------------------------------------------------------------------------------------------------


def learning_curves(cells: Sequence[CellDict], path: str | Path) -> Path:
    """ELBO per epoch, one panel per group: validation ELBO (solid) and −train_loss (dashed), same colour per cell.

    Higher is better (nats/datapoint). A dashed curve far above its solid one is overfitting; a solid curve that
    still rises at the last epoch is undertrained. The y-axis starts at the 10th percentile of the values so the
    first epochs' transient does not flatten the rest.
    """
    usable = [(i, c) for i, c in _usable(cells, ["history"], "learning_curves") if len(c["history"])]
    if not usable:
        raise DataError("learning_curves: every ok cell has an empty history; skip it")
    groups = _groups(usable)
    heights = [max(2.8, 0.9 + 0.2 * len(g)) for g in groups.values()]
    fig, axes = _subplots(len(groups), 1, 10.0, sum(heights), heights)
    for ax, (group, members) in zip(axes[:, 0], groups.items(), strict=True):
        values = []
        for i, c in members:
            h = c["history"]
            epoch = np.array([r["epoch"] for r in h], dtype=float)
            train = -np.array([np.nan if r.get("train_loss") is None else r["train_loss"] for r in h], dtype=float)
            val = np.array([np.nan if r.get("val_elbo") is None else r["val_elbo"] for r in h], dtype=float)
            col = _colour(i, len(cells))
            if np.isfinite(val).any():
                ok = np.isfinite(val)
                ax.plot(epoch[ok], val[ok], color=col, lw=1.4, marker="." if ok.sum() < 30 else None, label=c["label"])
                ax.plot(epoch, train, color=col, lw=1.0, ls="--")
            else:
                ax.plot(epoch, train, color=col, lw=1.0, ls="--", label=f"{c['label']} (no validation)")
            values += [v[np.isfinite(v)] for v in (train, val)]
        v = np.concatenate(values)
        if v.size and np.ptp(v) > 0:
            lo, hi = np.percentile(v, 10), v.max()
            pad = 0.08 * (hi - lo) or 1.0
            ax.set_ylim(lo - pad, hi + pad)
        ax.set(
            xlabel="epoch", ylabel="ELBO (nats/datapoint)", title=f"group {group}: solid validation, dashed −train loss"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _write(fig, path)


def log_px_differences(cells: Sequence[CellDict], path: str | Path) -> Path:
    """Per group, each cell's mean log p̂ minus the group's best cell's, paired over datapoints, ±2 paired se.

    The best cell (highest mean log p̂ over the rows finite in every cell of the group) sits at 0 on top; the others
    below it in order of their difference. A cell whose bar reaches 0 is not distinguishable from the best on these
    test rows. Groups are separate panels with separate axes: their numbers are not comparable.
    """
    usable = _usable(cells, ["log_px"], "log_px_differences")
    usable = [(i, c) for i, c in usable if np.isfinite(np.asarray(c["log_px"], dtype=float)).any()]
    if not usable:
        raise DataError("log_px_differences: no ok cell has a finite log_px; skip it")
    groups = _groups(usable)
    heights = [max(1.8, 0.9 + 0.32 * len(g)) for g in groups.values()]
    fig, axes = _subplots(len(groups), 1, 9.0, sum(heights), heights)
    for ax, (group, members) in zip(axes[:, 0], groups.items(), strict=True):
        lp = [np.asarray(c["log_px"], dtype=float).ravel() for _, c in members]
        if len({len(x) for x in lp}) > 1:
            raise DataError(
                f"log_px_differences: cells of group {group!r} have log_px of lengths {sorted({len(x) for x in lp})}; "
                "a group's cells must be scored on the same test rows"
            )
        common = np.logical_and.reduce([np.isfinite(x) for x in lp])
        means = [x[common].mean() if common.any() else np.nanmean(np.where(np.isfinite(x), x, np.nan)) for x in lp]
        best = int(np.argmax(means))
        diffs = [(0.0, 0.0) if k == best else _paired_or_nan(x, lp[best]) for k, x in enumerate(lp)]
        order = sorted(range(len(members)), key=lambda k: (k != best, -np.nan_to_num(diffs[k][0], nan=-np.inf)))
        for y, k in enumerate(order):
            i, c = members[k]
            m, se = diffs[k]
            ax.errorbar(
                m, y, xerr=2 * se if np.isfinite(se) else None, fmt="o", color=_colour(i, len(cells)), capsize=3
            )
            text = f"best: mean log p̂ = {means[best]:.2f}" if k == best else f"{m:+.2f} ± {2 * se:.2f}"
            if np.isnan(m):  # no test row finite in both: nothing to compare, say so at the zero line
                m, text = 0.0, "no row with finite log p̂ in common with the best"
            ax.annotate(text, (m, y), xytext=(6, 5), textcoords="offset points", fontsize=7)
        ax.axvline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(order)), [members[k][1]["label"] for k in order], fontsize=8)
        ax.set_ylim(len(order) - 0.5, -0.7)  # best on top
        ax.set(xlabel="Δ log p̂ per datapoint (nats), ±2 paired se", title=f"group {group} (N = {len(lp[0])} rows)")
        ax.grid(axis="x", alpha=0.3)
    return _write(fig, path)


def khat_distributions(cells: Sequence[CellDict], path: str | Path) -> Path:
    """Box plot of the finite PSIS k̂ per cell, with lines at 0.5 (good below) and 0.7, and each cell's threshold.

    k̂ measures how heavy-tailed the guide's importance weights are for each datapoint: below 0.5 the IWAE
    estimate is reliable, above the threshold (red tick on the cell's row) it is not. The right margin counts the
    share above the threshold, the NaN k̂ (not computable) and the −inf k̂ (equal weights, left out of the box).
    """
    usable = [(i, c) for i, c in _usable(cells, ["khat"], "khat_distributions") if np.size(c["khat"])]
    if not usable:
        raise DataError("khat_distributions: every ok cell has an empty khat; skip it")
    n = len(usable)
    fig, axes = _subplots(1, 1, 9.0, max(2.6, 1.0 + 0.35 * n))
    ax = axes[0, 0]
    ks = [np.asarray(c["khat"], dtype=float).ravel() for _, c in usable]
    finite = [k[np.isfinite(k)] for k in ks]
    box = ax.boxplot(
        finite,
        orientation="horizontal",
        positions=range(n),
        widths=0.6,
        patch_artist=True,
        sym=".",
        medianprops={"color": "black"},
    )
    for (i, _), patch in zip(usable, box["boxes"], strict=True):
        patch.set(facecolor=_colour(i, len(cells)), alpha=0.6)
    ax.axvline(0.5, color="tab:orange", lw=1, ls="--", label="0.5 (good below)")
    ax.axvline(0.7, color="tab:red", lw=1, ls=":", label="0.7")
    for y, ((_, c), k, f) in enumerate(zip(usable, ks, finite, strict=True)):
        thr = c.get("khat_threshold")
        if thr is not None:
            ax.vlines(thr, y - 0.4, y + 0.4, color="tab:red", lw=2.2, label="threshold" if y == 0 else None)
        note = f"NaN {int(np.isnan(k).sum())}, −inf {int(np.isneginf(k).sum())}"
        if thr is not None:
            note = f"{(f > thr).sum() / len(k):.0%} > {thr:.2f}, " + note
        ax.annotate(note, (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=7)
    ax.set_yticks(range(n), [c["label"] for _, c in usable], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set(xlabel="PSIS k̂ per datapoint", title="Pareto k̂ of the importance weights (finite values)")
    fig.legend(fontsize=7, loc="outside lower center", ncol=3, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _write(fig, path)


def active_units_plot(cells: Sequence[CellDict], path: str | Path) -> Path:
    """Horizontal bars: active latent units (coloured) out of ``latent_dim`` (grey outline) per cell.

    A unit is active when its posterior mean varies with x; few active units out of many is posterior collapse.
    """
    usable = _usable(cells, ["active_units", "latent_dim"], "active_units_plot")
    n = len(usable)
    fig, axes = _subplots(1, 1, 8.0, max(2.2, 0.9 + 0.32 * n))
    ax = axes[0, 0]
    for y, (i, c) in enumerate(usable):
        au, d = int(c["active_units"]), int(c["latent_dim"])
        ax.barh(y, d, color="none", edgecolor="grey", height=0.7)
        ax.barh(y, au, color=_colour(i, len(cells)), height=0.7)
        ax.annotate(f"{au}/{d}", (au, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(range(n), [c["label"] for _, c in usable], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, 1.08 * max(int(c["latent_dim"]) for _, c in usable))
    ax.set(xlabel="active units (of latent_dim)", title="Active latent units")
    ax.grid(axis="x", alpha=0.3)
    return _write(fig, path)


def _project(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[str, str]]:
    """First two principal components of z: (M, D) (or index vs z when D = 1); returns x, y and axis labels."""
    if z.shape[1] == 1:
        return np.arange(len(z), dtype=float), z[:, 0], ("test point", "z")
    zc = z - z.mean(0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    share = s**2 / max(float((s**2).sum()), 1e-300)
    pc = zc @ vt[:2].T
    return pc[:, 0], pc[:, 1], (f"PC1 ({share[0]:.0%})", f"PC2 ({share[1]:.0%})")


def latent_projections(cells: Sequence[CellDict], path: str | Path) -> Path:
    """Small multiples, one panel per cell: the encoder means ``z_mean`` on their first two principal components.

    Points are coloured by class label (discrete colours) when labels are given. Classes that separate show a
    latent space that encodes them; a blob with tiny spread on a PC is a collapsed direction. Each panel has its
    own scale (axis labels give the share of variance); D = 1 is plotted against the point index.
    """
    import matplotlib

    usable = _usable(cells, ["z_mean"], "latent_projections")
    ncol = min(4, len(usable))
    nrow = math.ceil(len(usable) / ncol)
    fig, axes = _subplots(nrow, ncol, 3.0 * ncol + 1.2, 2.9 * nrow)
    given = [np.asarray(c["labels"]).ravel() for _, c in usable if c.get("labels") is not None]
    classes = np.unique(np.concatenate(given)) if given else np.zeros(0)
    if len(classes) <= 20:
        cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    else:  # many classes: still one distinct colour each, from an evenly resampled rainbow; no legend
        cmap = matplotlib.colormaps["turbo"].resampled(len(classes))
    rng = np.random.default_rng(0)
    for ax, (i, c) in zip(axes.ravel(), usable, strict=False):
        z = np.asarray(c["z_mean"], dtype=float)
        z = z.reshape(len(z), -1)
        labels = None if c.get("labels") is None else np.asarray(c["labels"]).ravel()
        keep = np.isfinite(z).all(1)
        if keep.sum() > _MAX_POINTS:
            keep[rng.permutation(np.flatnonzero(keep))[: keep.sum() - _MAX_POINTS]] = False
        x, y, (xl, yl) = _project(z[keep]) if keep.any() else (np.zeros(0), np.zeros(0), ("", ""))
        if labels is not None and len(labels) == len(z):
            idx = np.searchsorted(classes, labels[keep])
            ax.scatter(x, y, s=4, c=[cmap(k) for k in idx], rasterized=True)
        else:
            ax.scatter(x, y, s=4, color="0.3", rasterized=True)  # grey: no class colour to be mistaken for
        if z.shape[1] > 1:
            ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel(xl, fontsize=7)
        ax.set_ylabel(yl, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_title(c["label"], fontsize=8)
        ax.spines["top"].set(color=_colour(i, len(cells)), linewidth=3)  # the cell's colour, legible titles
    for ax in axes.ravel()[len(usable) :]:
        ax.set_axis_off()
    if 0 < len(classes) <= 20:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], ls="", marker="o", color=cmap(k), label=str(v)) for k, v in enumerate(classes)]
        fig.legend(handles=handles, title="label", loc="outside right upper", fontsize=7, title_fontsize=8)
    fig.suptitle("Encoder means z_mean, first two principal components", fontsize=10)
    return _write(fig, path)


def _strip(images: list[np.ndarray | None], n: int) -> tuple[np.ndarray, list[float]]:
    """Tile up to n images of each section side by side, sections separated by a wider gap; returns (H, W, C) and
    the x centre of each section. A missing section is left white."""
    shape = next(a.shape[1:] for a in images if a is not None)
    c, h, w = shape
    gap, wide = 1, 6
    tiles_w = n * (w + gap) - gap
    out = np.ones((h + 2, len(images) * (tiles_w + wide) - wide + 2, c))
    centres = []
    for s, a in enumerate(images):
        x0 = 1 + s * (tiles_w + wide)
        centres.append(x0 + tiles_w / 2)
        if a is None:
            continue
        for k in range(min(n, len(a))):
            x = x0 + k * (w + gap)
            out[1 : 1 + h, x : x + w] = np.clip(np.asarray(a[k], dtype=float), 0, 1).transpose(1, 2, 0)
    return out, centres


def reconstructions_and_samples(cells: Sequence[CellDict], path: str | Path, *, n_images: int = 6) -> Path:
    """One row per image cell: ``n_images`` originals, their reconstructions, then model samples (grey if C = 1).

    Reconstructions that lose the originals' detail point to a weak decoder or a collapsed latent; blurry or
    unstructured samples with good reconstructions point to a gap between the aggregate posterior and the prior.
    """
    keys = ("originals", "reconstructions", "samples")
    usable = [
        (i, c) for i, c in enumerate(cells) if c.get("status") == "ok" and any(c.get(k) is not None for k in keys)
    ]
    if not usable:
        raise DataError(f"reconstructions_and_samples: no cell with status 'ok' has image data (of {len(cells)} cells)")
    strips = [_strip([None if c.get(k) is None else np.asarray(c[k]) for k in keys], n_images) for _, c in usable]
    width = 11.0
    heights = [0.12 + 8.8 * s.shape[0] / s.shape[1] for s, _ in strips]
    fig, axes = _subplots(len(usable), 1, width, 0.35 + sum(heights), height_ratios=heights)
    for r, (ax, (_, c), (img, centres)) in enumerate(zip(axes[:, 0], usable, strips, strict=True)):
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(c["label"], rotation=0, ha="right", va="center", fontsize=8)
        if r == 0:
            for x, name in zip(centres, keys, strict=True):
                ax.text(x, -1, name, ha="center", va="bottom", fontsize=9)
    return _write(fig, path)
