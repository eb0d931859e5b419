"""``diagnose``: how good is the posterior approximation? One report from the importance log-weights and friends.

- PSIS k̂ per datapoint (Yao et al. 2018) from the ``(N, S)`` log-weights, through ArviZ
  (:mod:`ppvae.diagnostics.arviz_io`): not Pyro's ``psis_diagnostic``, which pools a whole batch into one k̂;
- importance-sampling ESS/S = 1 / (S Σ_s w̃_s²) with normalized weights w̃;
- amortization and approximation gaps (:mod:`ppvae.diagnostics.gaps`), posterior collapse
  (:mod:`ppvae.diagnostics.collapse`), simulation-based calibration (:mod:`ppvae.diagnostics.sbc`), reference
  posteriors from NUTS (:mod:`ppvae.diagnostics.reference`).

A diagnostic that does not apply to a pair (collapse needs q(z|x) and p(z) as distributions, for example) is
listed in ``Diagnosis.skipped`` with the reason (it raised :class:`~ppvae.errors.NotApplicable`); a part that fails
for any other reason is listed in ``Diagnosis.failed`` with its error, and the other parts stand.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppvae._json import jsonable
from ppvae._validate import Interval, check, check_seed
from ppvae.data import DynamicBinarized
from ppvae.diagnostics import arviz_io
from ppvae.diagnostics.config import DiagnoseConfig, GapsConfig, ReferenceConfig, SBCConfig
from ppvae.diagnostics.evaluation import Evaluation, evaluate
from ppvae.diagnostics.findings import Finding
from ppvae.errors import NotApplicable, PPVAEError, describe_out_of_memory, is_out_of_memory
from ppvae.report.text import format_table

__all__ = ["Diagnosis", "diagnose", "importance_ess"]


def importance_ess(log_weights: np.ndarray) -> np.ndarray:
    """``(N,)`` ESS/S = 1 / (S Σ w̃²) per datapoint, from log-weights ``(N, S)``; 1 for equal weights."""
    lw = np.asarray(log_weights, dtype=np.float64)
    lw = lw - lw.max(axis=1, keepdims=True)
    w = np.exp(lw)
    w /= w.sum(axis=1, keepdims=True)
    return 1.0 / (lw.shape[1] * (w**2).sum(axis=1))


@dataclass
class Diagnosis:
    """Everything :func:`diagnose` measured. Arrays are per datapoint ``(N,)`` unless said otherwise."""

    evaluation: Evaluation
    khat: np.ndarray
    khat_threshold: float
    ess_per_sample: np.ndarray
    collapse: Any = None
    gaps: Any = None
    sbc: Any = None
    reference: Any = None
    skipped: dict[str, str] = field(default_factory=dict)  # part → why it does not apply to this pair
    failed: dict[str, str] = field(default_factory=dict)  # part → the error it stopped with
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each part

    @property
    def share_khat_above(self) -> float:
        """Share of datapoints whose k̂ exceeds the reliability threshold (NaN k̂ counts as above)."""
        k = self.khat
        return float(np.mean(~(k <= self.khat_threshold)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable summary of every part."""
        # NaN k̂ (non-finite weights) is counted apart; −inf (constant weights, an exact proposal) is a valid low
        # value, so order statistics ("lower", no interpolation that −inf would turn into NaN) replace np.median.
        valid = self.khat[~np.isnan(self.khat)]
        out: dict[str, Any] = {"evaluation": self.evaluation.summary()}
        out["psis"] = {
            "khat_median": float(np.quantile(valid, 0.5, method="lower")) if len(valid) else math.nan,
            "khat_p90": float(np.quantile(valid, 0.9, method="lower")) if len(valid) else math.nan,
            "khat_threshold": self.khat_threshold,
            "share_above_threshold": self.share_khat_above,
            "khat_nan": int(np.isnan(self.khat).sum()),
            "ess_per_sample_median": float(np.nanmedian(self.ess_per_sample)),
        }
        for name in ("collapse", "gaps", "sbc", "reference"):
            part = getattr(self, name)
            if part is not None:
                out[name] = jsonable(part.summary())
        out["findings"] = [f.to_dict() for f in self.findings()]
        out["skipped"] = dict(self.skipped)
        out["failed"] = dict(self.failed)
        out["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return jsonable(out)

    def findings(self) -> list[Finding]:
        """What the numbers say, most consequential first, in sentences (:mod:`ppvae.diagnostics.findings`)."""
        from ppvae.diagnostics.findings import findings

        return findings(self)

    def summary(self) -> dict[str, Any]:
        """Every part's numbers as JSON-ready values, like every other result's ``summary()``; :meth:`report` is the
        text."""
        return self.to_dict()

    def __str__(self) -> str:
        return self.report()

    def report(self) -> str:
        """The findings, then a readable table: diagnostic, value, and how to read it."""
        lines = [f"- {f}" for f in self.findings()]
        return "\n".join([*lines, format_table(self.table())])

    def table(self) -> list[tuple[str, str, str]]:
        """Rows ``(diagnostic, value, reading)``."""
        ev = self.evaluation.summary()
        d = self.to_dict()["psis"]
        d.update({k: float(d[k]) if d[k] is not None else math.nan for k in ("khat_median", "khat_p90")})
        s = self.evaluation.num_samples
        rows = [
            ("ELBO", f"{ev['elbo']:.3f} ± {ev['elbo_se']:.3f} nats", "per datapoint, ± standard error"),
            (f"log p̂(x) (IWAE_{s})", f"{ev['log_px']:.3f} ± {ev['log_px_se']:.3f} nats", "stochastic lower bound"),
            ("inference gap", f"{ev['inference_gap']:.3f} nats", "log p̂ − ELBO ≈ KL(q ‖ posterior)"),
        ]
        if "reconstruction" in ev:
            rows.append(("reconstruction | KL", f"{ev['reconstruction']:.3f} | {ev['kl']:.3f} nats", "ELBO = rec − KL"))
        if "bits_per_dim" in ev:
            rows.append(("bits/dim", f"{ev['bits_per_dim']:.4f}", f"from log p̂ (IWAE_{s})"))
        rows += [
            ("PSIS k̂ median / 90%", f"{d['khat_median']:.2f} / {d['khat_p90']:.2f}", "< 0.5 good"),
            (
                f"k̂ > {self.khat_threshold:.2f}",
                f"{100 * d['share_above_threshold']:.1f}% of datapoints",
                "importance sampling unreliable there",
            ),
            ("IS ESS/S median", f"{d['ess_per_sample_median']:.3f}", "< 0.1 poor"),
        ]
        if d["khat_nan"]:
            rows.append(("k̂ not computed", f"{d['khat_nan']} datapoints", "non-finite log-weights (see nonfinite)"))
        if ev["num_nonfinite"]:
            rows.insert(0, ("non-finite datapoints", str(ev["num_nonfinite"]), "left out of every mean below"))
        if self.collapse is not None:
            c = self.collapse.summary()
            rows.append(("active units", f"{c['active_units']} / {c['latent_dim']}", "Var_x E_q[z_d] > 0.01"))
            if c["collapsed_dims"] is not None:
                rows.append(("collapsed dims", str(len(c["collapsed_dims"])), "KL_d < 0.01 nats"))
            rows.append(
                (
                    "MI | marginal KL",
                    f"{c['mutual_information']:.3f} | {c['marginal_kl']:.3f} nats",
                    f"I ≤ log M = {c['mutual_information_max']:.2f}",
                )
            )
        if self.gaps is not None:
            g = self.gaps.summary()
            rows.append(("amortization gap", _pm(g, "amortization"), "L[q*] − L[q]: encoder weakness"))
            rows.append(("approximation gap", _pm(g, "approximation"), "log p̂ − L[q*]: family weakness"))
        if self.sbc is not None:
            p = self.sbc.p_value()
            shown = "< 1e-16" if p < 1e-16 else f"{p:.3g}"  # a χ² tail probability can underflow to 0
            rows.append(("SBC p-value", shown, "calibrated" if p > 0.01 else "miscalibrated (p ≤ 0.01)"))
        if self.reference is not None:
            r = self.reference
            rows.append(("NUTS reference R-hat max", f"{np.nanmax(r.rhat):.3f}", "< 1.01 converged"))
            rows.append(
                ("q vs NUTS |mean err|/sd", f"{np.nanmean(np.abs(r.metrics['mean_error_sd'])):.3f}", "0 when q matches")
            )
            rows.append(("q vs NUTS sd ratio", f"{np.nanmean(r.metrics['sd_ratio']):.3f}", "1 when q matches"))
        for name, why in self.skipped.items():
            rows.append((name, "skipped", why))
        for name, error in self.failed.items():
            rows.append((name, "failed", error))
        return rows

    def to_inference_data(self) -> Any:
        """ArviZ InferenceData.

        ``sample_stats``: ``log_weights (chain=1, draw=S, datapoint)`` and, per datapoint only, ``khat``,
        ``ess_per_sample``, ``elbo``, ``log_px``, ``inference_gap`` (and ``reconstruction``, ``kl``, ``bits_per_dim``
        where defined); ``posterior``: guide draws ``z (chain=1, draw=L, reference_point, latent)`` of the NUTS
        datapoints; ``reference_posterior``: NUTS draws ``z (chain, draw, reference_point, latent)``.
        """
        stats: dict[str, np.ndarray] = {}
        if self.evaluation.log_weights is not None:
            stats["log_weights"] = self.evaluation.log_weights.T[None]  # (chain = 1, draw = S, datapoint)
        per_point = self.evaluation.per_datapoint() | {"khat": self.khat, "ess_per_sample": self.ess_per_sample}
        groups: dict[str, dict[str, np.ndarray]] = {}
        posterior = None
        if self.reference is not None:
            ref = self.reference
            groups["reference_posterior"] = {"z": np.moveaxis(ref.draws, 0, 2)}  # (chain, draw, point, D)
            posterior = {"z": ref.guide_draws.transpose(1, 0, 2)[None]}  # guide draws (1, L, point, D)
        return arviz_io.to_inference_data(
            dims={"log_weights": ["datapoint"], "z": ["reference_point", "latent"]},
            posterior=posterior,
            sample_stats=stats,
            per_datapoint=per_point,
            groups=groups,
            attrs=self.evaluation.attrs() | {"khat_threshold": self.khat_threshold},
        )

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``diagnosis.json``, ``diagnosis.nc`` and PNG plots into ``directory``; returns the paths."""
        from ppvae.report import figures as plots

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"json": directory / "diagnosis.json"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2))
        paths["netcdf"] = arviz_io.save_netcdf(self.to_inference_data(), directory / "diagnosis.nc")
        paths["khat"] = plots.khat_plot(self.khat, self.khat_threshold, directory / "khat.png")
        if self.collapse is not None and self.collapse.kl_per_dim is not None:
            paths["kl_per_dim"] = plots.kl_per_dim_plot(self.collapse.kl_per_dim, directory / "kl_per_dim.png")
        if self.sbc is not None:
            from ppvae.diagnostics.sbc import sbc_plot

            paths["sbc"] = sbc_plot(self.sbc, directory / "sbc.png")
        if self.reference is not None:
            paths["reference"] = plots.reference_plot(self.reference, directory / "reference.png")
        return paths


def _pm(summary: dict, key: str) -> str:
    return f"{summary[key]:.3f} ± {summary[key + '_se']:.3f} nats"


def _one_line(err: Exception) -> str:
    """A part's error as one line: ppvae's own messages as they are, anything else prefixed with its type."""
    if is_out_of_memory(err):
        return describe_out_of_memory(err)
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if isinstance(err, PPVAEError) else f"{type(err).__name__}: {text}".rstrip(": ")


def _draw_once(data: Any, seed: int) -> Any:
    """``data`` with a :class:`DynamicBinarized` part (``(N, *data_shape)`` grey levels in [0, 1], also as the first
    element of a tuple) replaced by one binary draw x ~ Bernoulli(grey) seeded by ``seed``; anything else as given.

    DynamicBinarized draws afresh on every access, so evaluate would score one draw while collapse, gaps and the
    NUTS reference read the grey levels, which lie outside a Bernoulli's support. One draw, made with its own
    generator (as :func:`ppvae.cli.runs.split_data` makes it for the CLI) so it depends on ``seed`` alone, is shared.
    """
    if isinstance(data, tuple) and data:
        return (_draw_once(data[0], seed), *data[1:])
    if isinstance(data, DynamicBinarized):
        return torch.bernoulli(data.grey, generator=torch.Generator().manual_seed(check_seed(seed)))
    return data


def diagnose(
    model: Any,
    data: Any,
    *,
    guide: Callable | None = None,
    num_samples: int = DiagnoseConfig.num_importance_samples,
    collapse: bool = True,
    gaps: bool = True,
    sbc: bool = True,
    reference: bool = True,
    num_gap_points: int = GapsConfig.num_points,
    gap_steps: int = GapsConfig.steps,
    sbc_simulations: int = SBCConfig.num_simulations,
    num_reference_points: int = ReferenceConfig.num_points,
    reference_warmup: int = ReferenceConfig.num_warmup,
    reference_samples: int = ReferenceConfig.num_nuts_draws,
    data_plate: str = "data",
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    split: str | None = None,
) -> Diagnosis:
    """Diagnose the posterior approximation of a model/guide pair on ``data``.

    Args:
        model, guide, data: as for :func:`ppvae.evaluate`. Dynamically binarized data
            (:class:`ppvae.data.DynamicBinarized`) are drawn once with ``seed``; every part sees that draw.
        num_samples: importance samples per datapoint for log p̂, k̂ and ESS.
        collapse, gaps, sbc, reference: which of the costlier diagnostics to run.
            Every default comes from :mod:`ppvae.diagnostics.config`; ``diagnose(model, data,
            **DiagnoseConfig(...).diagnose_kwargs())`` runs a configuration.
        num_gap_points: datapoints for the amortization/approximation gaps (a per-datapoint optimization).
        sbc_simulations: simulated datasets for simulation-based calibration of the guide.
        num_reference_points, reference_warmup, reference_samples: datapoints for the NUTS reference posterior,
            and warm-up and kept draws per chain (2 chains). NUTS is the costliest part: about
            ``num_reference_points × 2 × (warmup + samples)`` trajectories of up to a few dozen gradient evaluations.
        seed: seeds every part (the global RNG state is restored by the parts that sample).
        split: a label for reports ("test", "val").

    Returns:
        :class:`Diagnosis`. A part that does not apply to the pair (gaps and collapse need a ppvae.VAE) is listed
        in ``Diagnosis.skipped`` with the reason; a part that fails otherwise in ``Diagnosis.failed`` with its error,
        and the others are kept. Settings are checked before any work starts (:class:`~ppvae.errors.ConfigError`).
    """
    t0 = time.perf_counter()
    # Every setting is checked before any work starts: a mistake is the caller's error, never a skipped part.
    counts = {
        "num_gap_points": (num_gap_points, 1, gaps),
        "gap_steps": (gap_steps, 1, gaps),
        "sbc_simulations": (sbc_simulations, 10, sbc),
        "num_reference_points": (num_reference_points, 1, reference),
        "reference_warmup": (reference_warmup, 0, reference),
        "reference_samples": (reference_samples, 2, reference),
    }
    for name, (value, low, used) in counts.items():
        if used:
            check(name, value, Interval(whole=True, low=low))
    data = _draw_once(data, seed)
    if isinstance(num_samples, int) and 2 <= num_samples < 100:
        warnings.warn(
            f"num_samples={num_samples} is too few for a Pareto tail fit: PSIS k̂ is noisy below S = 100 and "
            "not computed (inf) below S ≈ 25; use num_samples ≥ 1000 for k̂ you can act on",
            stacklevel=2,
        )
    evaluation = evaluate(
        model,
        data,
        guide=guide,
        num_samples=num_samples,
        data_plate=data_plate,
        seed=seed,
        device=device,
        keep_log_weights=True,
        split=split,
    )
    lw = evaluation.log_weights
    _, khat = arviz_io.psis(lw)
    seconds = {"evaluate_psis": time.perf_counter() - t0}
    result = Diagnosis(
        evaluation=evaluation,
        khat=khat,
        khat_threshold=arviz_io.khat_threshold(num_samples),
        ess_per_sample=importance_ess(lw),
        seconds=seconds,
    )
    x = torch.as_tensor(data[0] if isinstance(data, tuple) else data)

    def attempt(name: str, enabled: bool, run: Callable[[], Any]) -> None:
        if not enabled:
            return
        start = time.perf_counter()
        try:
            setattr(result, name, run())
        except NotApplicable as err:  # the diagnostic cannot run on this pair: say why
            result.skipped[name] = str(err)
        except Exception as err:  # noqa: BLE001 - one failing part must not lose the others; its error is kept
            result.failed[name] = _one_line(err)
        seconds[name] = time.perf_counter() - start

    from ppvae.diagnostics.collapse import posterior_collapse

    attempt("collapse", collapse, lambda: posterior_collapse(model, x, seed=seed))
    if gaps:
        from ppvae.diagnostics.gaps import inference_gaps

        attempt(
            "gaps",
            True,
            lambda: inference_gaps(model, x, guide=guide, num_points=num_gap_points, steps=gap_steps, seed=seed),
        )
    if sbc:
        from ppvae.diagnostics.sbc import sbc as run_sbc

        attempt("sbc", True, lambda: run_sbc(model, guide=guide, num_simulations=sbc_simulations, seed=seed))
    if reference:
        from ppvae.diagnostics.reference import reference_posterior

        attempt(
            "reference",
            True,
            lambda: reference_posterior(
                model,
                x,
                guide=guide,
                num_points=num_reference_points,
                num_warmup=reference_warmup,
                num_samples=reference_samples,
                seed=seed,
            ),
        )
    return result
