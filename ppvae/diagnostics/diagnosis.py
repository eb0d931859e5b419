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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppvae._json import jsonable
from ppvae._validate import check_seed
from ppvae.data import DynamicBinarized
from ppvae.diagnostics import arviz_io
from ppvae.diagnostics.config import DiagnoseConfig, part_configs, runner
from ppvae.diagnostics.evaluation import Evaluation, evaluate
from ppvae.diagnostics.findings import Finding
from ppvae.diagnostics.parts import PartInput
from ppvae.errors import ConfigError, NotApplicable, PPVAEError, describe_out_of_memory, is_out_of_memory
from ppvae.infer.observed import name_sites
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
    parts: dict[str, Any] = field(default_factory=dict)  # part name → its result, for the parts that ran
    skipped: dict[str, str] = field(default_factory=dict)  # part → why it does not apply to this pair
    failed: dict[str, str] = field(default_factory=dict)  # part → the error it stopped with
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each part

    def __getattr__(self, name: str) -> Any:
        # ``diagnosis.gaps``, ``diagnosis.sbc``, ...: a declared part's result, None when it did not run.
        if name in ("parts", "skipped", "failed"):  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        if name in _part_names() or any(name in self.__dict__.get(k, {}) for k in ("parts", "skipped", "failed")):
            return self.parts.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
        for name, part in self.parts.items():
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
        elif ev.get("masked_sites"):
            rows.append(("masked", name_sites(ev["masked_sites"]), "log p̂ is of the unmasked elements; no bits/dim"))
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
        for part in self.parts.values():
            rows += part.rows() if hasattr(part, "rows") else []
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
        posterior: dict[str, np.ndarray] = {}
        dims = {"log_weights": ["datapoint"]}
        for part in self.parts.values():
            extra = part.inference_data() if hasattr(part, "inference_data") else {}
            groups.update(extra.get("groups", {}))
            posterior.update(extra.get("posterior", {}))
            dims.update(extra.get("dims", {}))
        return arviz_io.to_inference_data(
            dims=dims,
            posterior=posterior or None,
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
        for part in self.parts.values():
            paths.update(part.figures(directory) if hasattr(part, "figures") else {})
        return paths


def _part_names() -> set[str]:
    return {c.part for c in part_configs()}


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
    num_samples: int | None = None,
    config: DiagnoseConfig | None = None,
    data_plate: str = "data",
    latent_sites: str | Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    split: str | None = None,
    **options: Any,
) -> Diagnosis:
    """Diagnose the posterior approximation of a model/guide pair on ``data``.

    Args:
        model, guide, data: as for :func:`ppvae.evaluate`. Dynamically binarized data
            (:class:`ppvae.data.DynamicBinarized`) are drawn once with ``seed``; every part sees that draw.
        num_samples: importance samples per datapoint for log p̂, k̂ and ESS (default
            ``DiagnoseConfig.num_importance_samples``, 1000).
        config: a :class:`~ppvae.diagnostics.config.DiagnoseConfig`: which parts run and with which settings
            (``DiagnoseConfig.quick()`` is the compare grid's preset). Or, instead, ``options``:
        **options: a part's name switches it on or off (``collapse``, ``gaps``, ``sbc``, ``reference``: True by
            default), and a setting's keyword sets it, each declared in :mod:`ppvae.diagnostics.config`:
            ``num_gap_points``, ``gap_steps`` (amortization/approximation gaps, a per-datapoint optimization),
            ``sbc_simulations`` (simulated datasets for simulation-based calibration of the guide),
            ``num_reference_points``, ``reference_warmup``, ``reference_samples`` (datapoints for the NUTS reference
            posterior, and warm-up and kept draws per chain, 2 chains; NUTS is the costliest part: up to
            ``reference_points_per_run`` datapoints share each run, of ``2 × (warmup + samples)`` trajectories of up
            to a few dozen gradient evaluations of a batch of that many datapoints), and the others listed there.
        data_plate: the plate that indexes datapoints (every part finds the pair's sites from a trace: the local
            latents are the continuous unobserved sites in this plate, :mod:`ppvae.infer.sites`).
        latent_sites: the local latent site (or sites) collapse, gaps, SBC and the NUTS reference work on; default
            every continuous one.
        seed: seeds every part (the global RNG state is restored by the parts that sample).
        split: a label for reports ("test", "val").

    Returns:
        :class:`Diagnosis`. A part that does not apply to the pair (gaps and collapse need a ppvae.VAE) is listed
        in ``Diagnosis.skipped`` with the reason; a part that fails otherwise in ``Diagnosis.failed`` with its error,
        and the others are kept. Settings are checked before any work starts (:class:`~ppvae.errors.ConfigError`).
    """
    t0 = time.perf_counter()
    # Every setting is checked before any work starts: a mistake is the caller's error, never a skipped part.
    if config is not None and options:
        raise ConfigError(
            f"diagnose takes config= or part options ({', '.join(sorted(options))}), not both: set them in the config"
        )
    if config is None:
        config = DiagnoseConfig.from_options(**options)
    elif not isinstance(config, DiagnoseConfig):
        raise ConfigError(f"config must be a ppvae.diagnostics.config.DiagnoseConfig, got {type(config).__name__}")
    if num_samples is None:
        num_samples = config.num_importance_samples
    if latent_sites is not None:
        names = (latent_sites,) if isinstance(latent_sites, str) else tuple(latent_sites)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"latent_sites must be a site name or a list of site names, got {latent_sites!r}")
        latent_sites = names
    if not isinstance(data_plate, str) or not data_plate:
        raise ConfigError(f"data_plate must be the name of a plate (a non-empty string), got {data_plate!r}")
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
    inputs = PartInput(
        model=model,
        guide=guide,
        x=torch.as_tensor(data[0] if isinstance(data, tuple) else data),
        seed=seed,
        evaluation=evaluation,
        data=data,
        data_plate=data_plate,
        latent_sites=latent_sites,
    )
    for name, part_config in config.parts():
        start = time.perf_counter()
        try:
            result.parts[name] = runner(type(part_config))(inputs, part_config)
        except NotApplicable as err:  # the diagnostic cannot run on this pair: say why
            result.skipped[name] = str(err)
        except Exception as err:  # noqa: BLE001 - one failing part must not lose the others; its error is kept
            result.failed[name] = _one_line(err)
        seconds[name] = time.perf_counter() - start
    return result
