"""Small statistics over datapoints shared by diagnostics and comparison: means with standard errors."""

from __future__ import annotations

import math

import numpy as np

from ppvae.errors import DataError

__all__ = ["mean_se", "paired_difference"]


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (sd / √n); NaN when empty."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan



def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the paired difference ``d_i = a_i − b_i`` over datapoints.

    ``a, b: (N,)`` are per-datapoint scores on the same rows (e.g. log p̂ of two cells). Rows where either is
    non-finite are dropped (pairwise); with n rows left, returns ``(mean(d), sd(d) / √n)`` with the sample
    standard deviation (ddof = 1; the se is NaN when n = 1). Pairing removes the between-datapoint variance that
    both cells share, so the se is far smaller than that of the difference of two independent means.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise DataError(f"paired_difference needs scores on the same rows; got lengths {len(a)} and {len(b)}")
    keep = np.isfinite(a) & np.isfinite(b)
    n = int(keep.sum())
    if n == 0:
        raise DataError(f"paired_difference: no row of {len(a)} has finite scores in both arrays")
    d = a[keep] - b[keep]
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(d.mean()), se

