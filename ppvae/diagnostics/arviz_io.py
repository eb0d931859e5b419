"""The only module that touches ArviZ: PSIS, ESS, R-hat, InferenceData export and NetCDF storage.

ArviZ 0.2x (Python 3.11: ``InferenceData``, ``az.psislw``) and ArviZ ≥ 1.0 (Python ≥ 3.12: ``arviz_stats``,
``xarray.DataTree``) name things differently, and 1.x's ``psislw`` smooths the *negation* of what it is given
(it expects log-likelihoods). Every call goes through the small functions here so both can be served: the 1.x
branches are selected by :data:`AZ_MAJOR`.

Arrays follow ppvae's convention: importance log-weights ``(N, S)`` with samples on the last axis; MCMC draws
``(chains, draws, *shape)``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "AZ_MAJOR",
    "psis",
    "khat_threshold",
    "ess",
    "rhat",
    "compare",
    "to_inference_data",
    "save_netcdf",
    "load_netcdf",
]

AZ_MAJOR = int(importlib.metadata.version("arviz").split(".")[0])


class _ArviZ:
    """``arviz``, imported on first use: with SciPy, xarray and pandas it takes about 2 s, which every command (and
    every grid worker) would otherwise pay at ``import ppvae`` before doing anything."""

    _module: ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        if _ArviZ._module is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # 0.23 announces the 1.0 refactor on import
                _ArviZ._module = importlib.import_module("arviz")
        return getattr(_ArviZ._module, name)


az: Any = _ArviZ()


def khat_threshold(num_samples: int) -> float:
    """Reliability threshold of PSIS k̂ for S samples: min(1 − 1/log10 S, 0.7) (Vehtari et al. 2024)."""
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7) if num_samples > 10 else 0.0


def psis(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed importance sampling per row (Yao et al. 2018; Vehtari et al. 2024).

    Args:
        log_weights: ``(N, S)`` log importance ratios, nats; samples on the last axis. A constant row (an
            exact proposal) has no tail to fit and gets k̂ = −inf, as does a row whose spread is within float32
            rounding, max(1e-4, 64 eps32 max|lw|) nats; a row with NaN or ±inf gets k̂ = nan.

    Returns:
        ``(smoothed_log_weights (N, S), khat (N,))``; smoothed weights are normalized per row.
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.ndim != 2:
        raise ValueError(f"log_weights must be (N, S), got shape {lw.shape}")
    n, s = lw.shape
    khat = np.full(n, np.nan)
    smoothed = np.full_like(lw, np.nan)
    finite = np.isfinite(lw).all(axis=1)
    spread, size = np.zeros(n), np.zeros(n)
    spread[finite] = np.ptp(lw[finite], axis=1)
    size[finite] = np.abs(lw[finite]).max(axis=1)
    # Weights equal up to float32 rounding (an exact proposal) are bounded ratios: no tail to fit, k̂ = −inf.
    # Rounding is relative: ppvae's log-weights are float32 sums of terms at least as large as |lw| together, so
    # an exact guide's row spreads over a few float32 steps of eps32 |lw| (1.2e-4 nats at |lw| ≈ 1000): 3-7 steps
    # measured at 784 data dimensions, ~50 with 256 latent dimensions (log q terms larger than |lw|). ArviZ's
    # tail fit of such a row sees a handful of tied values and returns k̂ = +inf, the opposite answer. A row
    # within 64 eps32 max|lw| (7.6e-6 relative) is called constant: its weights agree within a factor e^spread, so
    # log p̂ is within that many nats of every log-weight whatever a tail fit would say. The absolute 1e-4 floor
    # is for |lw| near 0 from large terms that cancel (log p(x | z) against log q(z)), whose rounding |lw| hides.
    tolerance = np.maximum(1e-4, 64 * np.finfo(np.float32).eps * size)
    constant = finite & (spread <= tolerance)
    if constant.any():
        khat[constant] = -np.inf
        smoothed[constant] = -math.log(s)
    rows = finite & ~constant
    if rows.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ArviZ warns per call when k̂ is high; ppvae reports it instead
            if AZ_MAJOR >= 1:  # pragma: no cover - served on Python ≥ 3.12
                from arviz_stats.base import array_stats

                out, k = array_stats.psislw(-lw[rows], 1.0, axis=-1)
                out = out - _logsumexp(out)
            else:
                out, k = az.psislw(lw[rows], reff=1.0, normalize=True)
        smoothed[rows] = np.asarray(out)
        khat[rows] = np.asarray(k)
    return smoothed, khat


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(a - m).sum(axis=-1, keepdims=True))


def ess(draws: np.ndarray, method: str = "bulk") -> np.ndarray:
    """MCMC effective sample size per component: ``draws (chains, draws, *shape)`` → ``shape``."""
    return _diagnostic(draws, "ess", method)


def rhat(draws: np.ndarray) -> np.ndarray:
    """Rank-normalized split R-hat (Vehtari et al. 2021) per component: ``(chains, draws, *shape)`` → ``shape``."""
    return _diagnostic(draws, "rhat", "rank")


def _diagnostic(draws: np.ndarray, name: str, method: str) -> np.ndarray:
    x = np.asarray(draws, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"draws must be (chains, draws, ...), got shape {x.shape}")
    shape = x.shape[2:]
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if AZ_MAJOR >= 1:  # pragma: no cover - served on Python ≥ 3.12
            from arviz_stats.base import array_stats

            fn = array_stats.ess if name == "ess" else array_stats.rhat
            out = fn(flat, chain_axis=0, draw_axis=1, method=method)
        else:
            dataset = az.convert_to_dataset({"v": flat})
            fn = az.ess if name == "ess" else az.rhat
            out = fn(dataset, method=method)["v"].values
    return np.asarray(out).reshape(shape)


def compare(pointwise: dict[str, np.ndarray], *, num_samples: int = 1) -> Any:
    """Rank models by held-out per-datapoint log-scores with ArviZ's ``compare`` (paired standard errors).

    Each model's ``(N,)`` scores (log p̂(x_i), IWAE_S, on the *same* N test points) are wrapped as pointwise ELPD
    data, so ``elpd`` is Σ_i log p̂(x_i) and ``dse`` the standard error of the paired difference to the best model,
    √N · sd_i(lp_best,i − lp_m,i) (Vehtari, Gelman & Gabry 2017). These are not LOO estimates: no refit is implied;
    the "loo" label is ArviZ's container. ``az.loo`` on guide log-weights would be wrong for a VAE.

    Args:
        pointwise: model name → ``(N,)`` finite log-scores in nats, same datapoints in the same order.
        num_samples: S behind each score (recorded only).

    Returns:
        ``pandas.DataFrame`` indexed by model, best first: ``rank``, ``elpd``, ``se``, ``elpd_diff``, ``dse``,
        ``weight`` (stacking), as ArviZ computes them (sums over datapoints, nats).
    """
    if len(pointwise) < 2:
        raise ValueError(f"compare needs at least two models, got {len(pointwise)}")
    arrays = {name: np.asarray(v, dtype=np.float64).reshape(-1) for name, v in pointwise.items()}
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"every model must be scored on the same datapoints; got sizes {sorted(sizes)}")
    if not all(np.isfinite(v).all() for v in arrays.values()):
        raise ValueError("pointwise scores must be finite; drop non-finite datapoints from every model first")
    n = sizes.pop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if AZ_MAJOR >= 1:  # pragma: no cover - served on Python ≥ 3.12
            from arviz_stats import compare as az_compare
            from arviz_stats.utils import ELPDData

            elpds = {
                name: ELPDData(
                    kind="loo",
                    elpd=float(v.sum()),
                    se=float(math.sqrt(n) * v.std()),
                    p=0.0,
                    good_k=0.7,
                    n_samples=num_samples,
                    n_data_points=n,
                    warning=False,
                    scale="log",
                    elpd_i=v,
                    pareto_k=np.zeros(n),
                )
                for name, v in arrays.items()
            }
            table = az_compare(elpds)
            return table.rename(columns={"elpd_loo": "elpd", "elpd": "elpd"})
        import xarray as xr
        from arviz.stats.stats_utils import ELPDData

        elpds = {
            name: ELPDData(
                data=[
                    float(v.sum()),
                    float(math.sqrt(n) * v.std()),
                    0.0,
                    num_samples,
                    n,
                    False,
                    xr.DataArray(v, dims=["datapoint"]),
                    xr.DataArray(np.zeros(n), dims=["datapoint"]),
                    "log",
                    0.7,
                ],
                index=[
                    "elpd_loo",
                    "se",
                    "p_loo",
                    "n_samples",
                    "n_data_points",
                    "warning",
                    "loo_i",
                    "pareto_k",
                    "scale",
                    "good_k",
                ],
            )
            for name, v in arrays.items()
        }
        table = az.compare(elpds, ic="loo", scale="log")
    table = table.rename(columns={"elpd_loo": "elpd"})
    return table[["rank", "elpd", "se", "elpd_diff", "dse", "weight"]]


def to_inference_data(
    *,
    posterior: dict[str, np.ndarray] | None = None,
    sample_stats: dict[str, np.ndarray] | None = None,
    per_datapoint: dict[str, np.ndarray] | None = None,
    groups: dict[str, dict[str, np.ndarray]] | None = None,
    dims: dict[str, list[str]] | None = None,
    attrs: dict[str, Any] | None = None,
) -> Any:
    """Build an ArviZ ``InferenceData`` (0.2x) or ``DataTree`` (1.x).

    Args:
        posterior, sample_stats: arrays ``(chain, draw, *shape)``; ``dims`` names the ``shape`` dims.
        per_datapoint: ``(N,)`` arrays (k̂, ELBO, log p̂ per datapoint) stored in ``sample_stats`` on the dim
            ``"datapoint"`` alone, without chain/draw dims (which would pad them with NaN next to ``(1, S, N)``
            log-weights).
        groups: further groups by name (for example ``"reference_posterior"`` for NUTS draws).
    """
    all_groups: dict[str, dict[str, np.ndarray]] = {}
    if posterior:
        all_groups["posterior"] = posterior
    if sample_stats or per_datapoint:
        all_groups["sample_stats"] = sample_stats or {}
    all_groups.update(groups or {})
    extra = {name: (("datapoint",), np.asarray(v)) for name, v in (per_datapoint or {}).items()}
    if AZ_MAJOR >= 1:  # pragma: no cover - served on Python ≥ 3.12
        import xarray as xr

        tree = az.from_dict({k: v for k, v in all_groups.items() if v}, dims=dims, attrs=attrs)
        if extra:
            base = tree["sample_stats"].to_dataset() if "sample_stats" in tree.children else xr.Dataset(attrs=attrs)
            tree["sample_stats"] = xr.DataTree(base.assign(extra))
        return tree
    datasets = {
        name: az.dict_to_dataset(data, dims=dims, attrs=attrs) if data else None for name, data in all_groups.items()
    }
    if extra:
        import xarray as xr

        base = datasets["sample_stats"] if datasets["sample_stats"] is not None else xr.Dataset(attrs=attrs or {})
        datasets["sample_stats"] = base.assign(extra)
    return az.InferenceData(**datasets)


def save_netcdf(idata: Any, path: str | Path) -> Path:
    """Write InferenceData/DataTree to NetCDF; the file stores arrays only (no pickled objects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    idata.to_netcdf(str(path))
    return path


def load_netcdf(path: str | Path) -> Any:
    """Read what :func:`save_netcdf` wrote."""
    if AZ_MAJOR >= 1:  # pragma: no cover - served on Python ≥ 3.12
        import xarray as xr

        return xr.open_datatree(str(path))
    return az.from_netcdf(str(path))
