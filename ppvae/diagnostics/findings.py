"""Plain-language findings of a :class:`ppvae.diagnostics.Diagnosis`: what the numbers say, worst news first.

Each rule reads numbers the diagnosis already holds and states what follows from them and what to do, with the
numbers in the sentence so a reader can check it against the table. The thresholds are the usual ones:

- PSIS k̂ above min(1 − 1/log10 S, 0.7) on a datapoint: importance sampling from q is unreliable there, so
  IWAE log p̂ is far below log p(x) and the inference gap is underestimated (Vehtari et al. 2024, "Pareto
  smoothed importance sampling"); median k̂ < 0.5: q is a good proposal;
- amortization vs approximation gap (Cremer et al. 2018): whichever is larger is what limits q;
- collapse: KL_d < 0.01 nats; MI within 5% of its bound log M is a lower bound only (Hoffman & Johnson 2016);
- SBC p ≤ 0.01: miscalibrated (Talts et al. 2018); mean normalized rank ≠ 0.5 is bias, sd ≠ 0.289 a wrong width;
- NUTS reference: R-hat ≤ 1.01 before its metrics are trusted (Vehtari et al. 2021); mean error in posterior sd.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["Finding", "findings", "SEVERITIES"]

#: ``error``: the pair cannot be used for that (:func:`ppvae.check_model`); ``warning``: limits trust in the numbers;
#: ``note``: explains them; ``good``: a check passed.
SEVERITIES = ("error", "warning", "note", "good")


@dataclass(frozen=True)
class Finding:
    """One sentence of a diagnosis, with a stable ``code`` (e.g. ``"khat-unreliable"``) and a ``severity`` that
    programs filter on (the compare table's warnings column takes the ``warning`` ones); ``str()`` is the text."""

    code: str
    severity: Literal["error", "warning", "note", "good"]
    text: str

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


_UNIFORM_RANK_SD = 1 / math.sqrt(12)  # sd of a uniform normalized rank


def findings(d: Any) -> list[Finding]:
    """Findings, most consequential first, for a :class:`~ppvae.diagnostics.Diagnosis` ``d``."""
    out: list[Finding] = []
    out += _importance(d)
    out += _gaps(d)
    out += _reference(d)
    out += _sbc(d)
    out += _collapse(d)
    return out


def _importance(d: Any) -> list[Finding]:
    ev = d.evaluation
    s = ev.num_samples
    share = d.share_khat_above
    valid = d.khat[~np.isnan(d.khat)]
    median = float(np.quantile(valid, 0.5, method="lower")) if len(valid) else math.nan
    out = []
    if int(np.sum(~np.isfinite(ev.log_px))):
        out.append(
            Finding(
                "nonfinite-log-weights",
                "warning",
                f"{int(np.sum(~np.isfinite(ev.log_px)))} datapoints have non-finite log-weights and are left out of "
                "every mean: check the data lies in the likelihood's support",
            ),
        )
    if share > 0.5:
        out.append(
            Finding(
                "khat-unreliable",
                "warning",
                f"Importance sampling from q is unreliable on {100 * share:.0f}% of datapoints (PSIS k̂ > "
                f"{d.khat_threshold:.2f}, median {median:.2f}): log p̂ (IWAE_{s}) is a loose lower bound of log p(x) "
                "and the inference gap is underestimated; more samples will not fix it, a wider or richer guide will",
            ),
        )
    elif share > 0.1:
        out.append(
            Finding(
                "khat-unreliable-some",
                "warning",
                f"PSIS k̂ exceeds {d.khat_threshold:.2f} on {100 * share:.0f}% of datapoints: log p̂ is unreliable for "
                "those (listed per datapoint in the JSON and NetCDF)",
            ),
        )
    elif median < 0.5:
        shown = "−inf: constant weights" if median == -math.inf else f"{median:.2f}"
        out.append(
            Finding(
                "khat-good",
                "good",
                f"q is a good importance proposal (median PSIS k̂ {shown}): log p̂ (IWAE_{s}) is reliable",
            )
        )
    return out


def _gaps(d: Any) -> list[Finding]:
    g = d.gaps
    if g is None:
        return []
    amort, approx = float(np.nanmean(g.amortization)), float(np.nanmean(g.approximation))
    k = len(g.index)
    out = []
    # log p(x) from the better of q and q* against evaluate's IWAE from q on the same rows.
    lift = float(np.nanmean(g.log_px - d.evaluation.log_px[g.index]))
    if lift > 1.0:
        out.append(
            Finding(
                "gaps-iwae-lift",
                "note",
                f"On the {k} gap datapoints, IWAE from the per-datapoint optimum q* puts log p(x) {lift:.1f} nats "
                "above IWAE from q: the full-data log p̂ and inference gap are at least that far off",
            ),
        )
    if amort > 2 * approx and amort > 0.5:
        out.append(
            Finding(
                "gaps-encoder-limits",
                "note",
                f"The encoder limits q (amortization gap {amort:.2f} vs approximation gap {approx:.2f} nats): train "
                "longer or give the encoder more capacity before trying a richer guide family",
            ),
        )
    elif approx > 2 * amort and approx > 0.5:
        out.append(
            Finding(
                "gaps-family-limits",
                "note",
                f"The guide family limits q (approximation gap {approx:.2f} vs amortization gap {amort:.2f} nats): a "
                "richer guide (full-rank, flows) would help more than a larger encoder",
            ),
        )
    elif amort > 0.5 or approx > 0.5:
        out.append(
            Finding(
                "gaps-both",
                "note",
                f"Encoder and family both cost q: amortization {amort:.2f}, approximation {approx:.2f} nats",
            )
        )
    if not g.converged:
        out.append(
            Finding(
                "gaps-not-converged",
                "warning",
                "the per-datapoint optimization had not converged: the amortization gap is a lower bound",
            )
        )
    return out


def _reference(d: Any) -> list[Finding]:
    r = d.reference
    if r is None:
        return []
    rhat = float(np.nanmax(r.rhat))
    if not rhat <= 1.01:
        return [
            Finding(
                "reference-not-converged",
                "warning",
                f"NUTS has not converged on the reference datapoints (R-hat {rhat:.3f} > 1.01): raise its steps",
            )
        ]
    err = float(np.nanmean(np.abs(r.metrics["mean_error_sd"])))
    ratio = float(np.nanmean(r.metrics["sd_ratio"]))
    k = len(r.index)
    if err < 0.2 and 0.8 < ratio < 1.25:
        return [
            Finding(
                "reference-matches",
                "good",
                f"On {k} datapoints q matches NUTS (mean error {err:.2f} posterior sd, sd ratio {ratio:.2f})",
            )
        ]
    width = "too narrow (over-confident)" if ratio < 0.8 else "too wide" if ratio > 1.25 else "about right in width"
    return [
        Finding(
            "reference-off",
            "warning",
            f"Against NUTS on {k} datapoints, q's means are off by {err:.2f} posterior sd on average and its sd is "
            f"{ratio:.2f}× the posterior's: {width}",
        ),
    ]


def _sbc(d: Any) -> list[Finding]:
    if d.sbc is None:
        return []
    s = d.sbc.summary()
    p = s["p_value"]
    if p > 0.01:
        return [
            Finding("sbc-calibrated", "good", f"SBC finds no miscalibration over the prior predictive (p = {p:.2g})")
        ]
    sd = np.asarray(s["rank_sd"])
    mean = np.asarray(s["rank_mean"])
    narrow = int(np.sum(sd > _UNIFORM_RANK_SD * 1.1))
    biased = int(np.sum(np.abs(mean - 0.5) > 0.05))
    shown = "< 1e-16" if p < 1e-16 else f"= {p:.2g}"  # a χ² tail probability can underflow to 0
    return [
        Finding(
            "sbc-miscalibrated",
            "warning",
            f"SBC rejects calibration (p {shown}): ranks are U-shaped (q too narrow) in {narrow} and shifted (q "
            f"biased) in {biased} of {len(sd)} dimensions; see sbc.png",
        ),
    ]


def _collapse(d: Any) -> list[Finding]:
    c = d.collapse
    if c is None:
        return []
    s = c.summary()
    out = []
    collapsed = s["collapsed_dims"]
    if collapsed:
        out.append(
            Finding(
                "collapsed-dims",
                "warning",
                f"{len(collapsed)} of {s['latent_dim']} latent dimensions collapsed to the prior: {collapsed}",
            )
        )
    if s["active_units"] < s["latent_dim"]:
        out.append(
            Finding(
                "inactive-units",
                "note",
                f"{s['active_units']} of {s['latent_dim']} latent dimensions are active (Var_x E_q[z_d] > 0.01)",
            )
        )
    if s["mutual_information"] >= 0.95 * s["mutual_information_max"]:
        out.append(
            Finding(
                "mutual-information-bound",
                "note",
                f"I(x; z) ≥ {s['mutual_information']:.2f} nats: the estimate reaches its bound log M, so it is a lower "
                "bound here; the marginal KL then absorbs the rest of the KL term",
            ),
        )
    return out
