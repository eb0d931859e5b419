"""Simulation-based calibration (SBC) of an amortized guide (Talts et al. 2018, "Validating Bayesian Inference
Algorithms with Simulation-Based Calibration").

For m = 1..M simulate from the generative model and rank the truth among L guide draws::

    z̃_m ~ p(z),   x_m ~ p(x | z̃_m),   z_m^(1..L) ~ q(z | x_m),   r_md = #{l : z_md^(l) < z̃_md} ∈ {0, …, L}.

If q(z | x) = p(z | x) then z̃_m and the draws are L + 1 exchangeable draws of p(z | x_m), so every r_md is uniform on
{0, …, L}. A ∩-shaped rank histogram means q is too wide, a ∪ shape too narrow, a slope a biased mean. The test is
one-sided: a q that ignores x and returns p(z) is calibrated too; read SBC next to the ELBO or a reference posterior.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from torch import Tensor

from ppvae._local_params import local_module_params
from ppvae._param_store import model_store
from ppvae._rng import fork_rngs
from ppvae.diagnostics.config import SBCConfig
from ppvae.diagnostics.parts import PartInput
from ppvae.errors import ConfigError, DataError, NotApplicable
from ppvae.infer.eval_mode import scoring_mode
from ppvae.infer.pair import AmortizedEncoder, GenerativePath, as_pair
from ppvae.infer.sites import Sites, discover_sites, guide_draws, per_datapoint_args, site_rows, take_rows

__all__ = ["SBCResult", "sbc", "sbc_plot", "run_part"]

_PARTICLES = "_ppvae_sbc_particles"


def _bin_sizes(num_draws: int, bins: int) -> np.ndarray:
    """How many of the rank values 0..L fall in each of ``bins`` equal-width bins (bin of r: ⌊r·B/(L+1)⌋)."""
    return np.bincount(np.arange(num_draws + 1) * bins // (num_draws + 1), minlength=bins)


@dataclass
class SBCResult:
    """Ranks of the true latents among guide draws, and their uniformity tests.

    Attributes:
        ranks: ``(M, D)`` ints in ``[0, L]``: rank of z̃_md among the L draws of q(z_d | x_m).
        num_draws: L.
        bins: B equal-width bins of the ranks used by the χ² test and the plot (B = min(20, ⌊M/5⌋, L + 1), so every
            bin expects ≥ 5 counts).
        p_values: ``(D,)`` χ² goodness-of-fit p-values of each dimension's binned ranks against uniform
            (:func:`scipy.stats.chisquare`, B − 1 degrees of freedom).
    """

    ranks: np.ndarray
    num_draws: int
    bins: int
    p_values: np.ndarray

    def p_value(self) -> float:
        """Overall p-value: Bonferroni-adjusted minimum over dimensions, min(1, D · min_d p_d)."""
        return float(min(1.0, len(self.p_values) * float(np.min(self.p_values))))

    def rows(self) -> list[tuple[str, str, str]]:
        """The diagnosis table's row: the overall p-value and what it says."""
        p = self.p_value()
        shown = "< 1e-16" if p < 1e-16 else f"{p:.3g}"  # a χ² tail probability can underflow to 0
        return [("SBC p-value", shown, "calibrated" if p > 0.01 else "miscalibrated (p ≤ 0.01)")]

    def figures(self, directory: Path) -> dict[str, Path]:
        """``sbc.png``: the rank histograms."""
        return {"sbc": sbc_plot(self, Path(directory) / "sbc.png")}

    def summary(self) -> dict[str, Any]:
        """JSON-serializable summary. Per dimension: p-value, mean and sd of the normalized rank r / L.

        Uniform ranks give mean 0.5 and sd ≈ 0.289. Mean > 0.5: q sits below the truth (biased low); sd < 0.289:
        q too wide (over-dispersed); sd > 0.289: q too narrow (over-confident).
        """
        u = self.ranks / self.num_draws
        return {
            "num_simulations": int(self.ranks.shape[0]),
            "num_draws": int(self.num_draws),
            "latent_dim": int(self.ranks.shape[1]),
            "bins": int(self.bins),
            "p_value": self.p_value(),
            "p_values": [float(p) for p in self.p_values],
            "rank_mean": [float(v) for v in u.mean(0)],
            "rank_sd": [float(v) for v in u.std(0)],
        }


def sbc(
    model: Any,
    *,
    guide: Callable | None = None,
    data: Any = None,
    latent_sites: str | Sequence[str] | None = None,
    data_plate: str = "data",
    num_simulations: int = SBCConfig.num_simulations,
    num_draws: int = SBCConfig.num_draws,
    seed: int = 0,
    batch_size: int = SBCConfig.batch_size,
) -> SBCResult:
    """Simulation-based calibration of q(z | x) against the model's own simulations (Talts et al. 2018).

    Args:
        model: a :class:`ppvae.VAE` (uses ``prior()``, ``decode(z)``, ``encode(x)``); a module with ``model`` and
            ``guide`` methods; or a model function with ``guide=``.
        guide: the guide function when ``model`` is a function.
        data: for a pair, the data (a tensor or a tuple of model arguments: data, labels, masks...) whose
            datapoints lend each simulation its conditioning inputs: simulation m runs the model itself on
            datapoint ``m mod N`` with its observed sites unconditioned (``poutine.uncondition``), so the latents
            are drawn from the prior and the observations from the likelihood by the model's own code; each
            observed site's draw replaces the argument it observed, and ``guide`` is run on those arguments. The
            local latent sites are found from the trace (:mod:`ppvae.infer.sites`). Without ``data`` a pair must
            follow the generation-path convention: ``model(None, batch_size=n)`` samples site ``"z"`` in the
            ``"data"`` plate (dim -1) and returns (or samples at site ``"x"``) ``n`` new datapoints.
        latent_sites: the local latent sites ranked (default: every continuous one; enumerated discrete ones are
            never ranked), with ``data``.
        data_plate: the plate that indexes datapoints, with ``data``.
        num_simulations: M simulated datasets of one datapoint each (≥ 10).
        num_draws: L guide draws per simulation; ranks lie in {0, …, L}.
        seed: seeds Pyro/torch/NumPy RNGs (:func:`pyro.set_rng_seed`) for this call only, so results are
            reproducible and the caller's global RNG state is as it was.
        batch_size: simulations processed at once (vectorized).

    Returns:
        :class:`SBCResult` with ranks ``(M, D)`` and per-dimension χ² p-values.
    """
    for name, value, low in (
        ("num_simulations", num_simulations, 10),
        ("num_draws", num_draws, 1),
        ("batch_size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer ≥ {low}, got {value!r}")
    own_store: Any = nullcontext()
    if guide is None and isinstance(model, AmortizedEncoder) and isinstance(model, GenerativePath):
        simulate = _vae_simulator(model)  # no Pyro: no parameter store
    else:
        pair = as_pair(model, guide, what="sbc")
        if data is None:
            simulate = _pair_simulator(pair.model, pair.guide)
        else:
            simulate = _unconditioned_simulator(pair.model, pair.guide, data, latent_sites, data_plate)
        # The pair's own parameter store (ppvae._param_store); one simulation binds a loaded pair's networks.
        own_store = model_store(pair.model, pair.guide, pair.owner, exercise=functools.partial(simulate, 0, 1, 1))
    chunks = []
    # Eval mode first (every module's own training flag and buffers given back afterwards), so that binding a loaded
    # pair's networks moves no statistics. Seeded on copies of the global RNGs (the numbers pyro.set_rng_seed(seed)
    # gave): the caller's stay as they were.
    with scoring_mode(model, guide), own_store, local_module_params(), poutine.block(), fork_rngs(seed):
        for start in range(0, num_simulations, batch_size):
            m = min(batch_size, num_simulations - start)
            z_true, draws = simulate(start, m, num_draws)  # (m, D), (L, m, D)
            chunks.append((draws < z_true).sum(0).cpu().numpy())
    ranks = np.concatenate(chunks).astype(np.int64)
    bins = min(20, num_simulations // 5, num_draws + 1)
    expected = num_simulations * _bin_sizes(num_draws, bins) / (num_draws + 1)
    binned = ranks * bins // (num_draws + 1)
    from scipy import stats  # SciPy's stats take a second to import: only when used

    p_values = np.array(
        [stats.chisquare(np.bincount(binned[:, d], minlength=bins), expected).pvalue for d in range(ranks.shape[1])]
    )
    return SBCResult(ranks=ranks, num_draws=num_draws, bins=bins, p_values=p_values)


_Simulator = Callable[[int, int, int], tuple[Tensor, Tensor]]  # (first simulation, m, L) → z̃ (m, D), draws (L, m, D)


def _vae_simulator(vae: Any) -> _Simulator:
    def simulate(start: int, m: int, num_draws: int) -> tuple[Tensor, Tensor]:
        z = vae.prior().sample((m,))
        x = vae.decode(z).sample()
        return z, vae.encode(x).sample((num_draws,))

    return simulate


def _convention_error(what: str) -> NotApplicable:
    return NotApplicable(
        f"sbc simulates data from the model, but {what}; follow the generation-path convention: model(None, "
        "batch_size=n) samples the latent site 'z' inside pyro.plate('data', n) and returns the n new datapoints "
        "(or samples them at site 'x'), and guide(x) samples site 'z'; or give sbc data= (diagnose does), so the "
        "model itself simulates at its observed sites"
    )


def _pair_simulator(model: Callable, guide: Callable) -> _Simulator:
    def simulate(start: int, m: int, num_draws: int) -> tuple[Tensor, Tensor]:
        try:
            trace = poutine.trace(model).get_trace(None, batch_size=m)
        except Exception as exc:
            raise _convention_error(f"model(None, batch_size={m}) raised {type(exc).__name__}: {exc}") from exc
        if "z" not in trace.nodes:
            raise _convention_error("model(None, batch_size=n) has no sample site 'z'")
        x = trace.nodes["x"]["value"] if "x" in trace.nodes else trace.nodes["_RETURN"]["value"]
        if not torch.is_tensor(x) or x.shape[:1] != (m,):
            raise _convention_error(f"model(None, batch_size={m}) returned no x with {m} rows (no site 'x')")
        z = trace.nodes["z"]["value"].reshape(m, -1)
        return z, _guide_draws(guide, x, m, z.shape[1], num_draws)

    return simulate


def _argument_of(obs: Any, args: tuple) -> int | None:
    """Which argument an observed site observed: the same tensor, else one with the same values (reshaped)."""
    for k, a in enumerate(args):
        if a is obs:
            return k
    for k, a in enumerate(args):
        if torch.is_tensor(a) and torch.is_tensor(obs) and a.numel() == obs.numel() and a.numel() > 0:
            if torch.equal(a.reshape(-1).to(obs.dtype), obs.reshape(-1)):
                return k
    return None


def _unconditioned_simulator(
    model: Callable, guide: Callable, data: Any, names: str | Sequence[str] | None, plate: str
) -> _Simulator:
    """Simulations by the model's own code: datapoints' inputs, observed sites unconditioned (see :func:`sbc`)."""
    args = per_datapoint_args(data)
    n = len(args[0]) if args and args[0].dim() > 0 else 0
    if n == 0:
        raise DataError("sbc needs at least one datapoint in data (its inputs condition the simulations)")
    found: dict[str, Any] = {}

    def roles(batch: tuple) -> tuple[Sites, tuple[str, ...]]:
        if not found:
            sites = discover_sites(model, guide, batch, data_plate=plate)
            if sites.global_latents:
                raise NotApplicable(
                    f"sbc draws every simulation's latents from the prior independently, but the model has global "
                    f"latent sites {list(sites.global_latents)} outside pyro.plate({plate!r}), shared by all "
                    "datapoints; SBC of such a model needs one simulated dataset per simulation, which ppvae does "
                    "not run"
                )
            if not sites.observed:
                raise NotApplicable(
                    f"sbc simulates data at the model's observed sites and the model has none in plate {plate!r} "
                    f"({sites.describe()}); observe the data with pyro.sample(..., obs=x) inside that plate"
                )
            chosen = sites.latents(names, "sbc")
            missing = [s for s in chosen if s not in sites.guide_sites]
            if missing:
                raise NotApplicable(f"sbc ranks the guide's draws of {missing}, which the guide does not sample")
            found.update(sites=sites, chosen=chosen)
        return found["sites"], found["chosen"]

    def simulate(start: int, m: int, num_draws: int) -> tuple[Tensor, Tensor]:
        batch = take_rows(args, torch.arange(start, start + m) % n, n)
        sites, chosen = roles(batch)
        trace = poutine.trace(poutine.uncondition(model)).get_trace(*batch)
        simulated = list(batch)
        for name in sites.observed:
            node = trace.nodes[name]
            k = _argument_of(node["infer"].get("obs"), batch)
            if k is None:
                raise NotApplicable(
                    f"sbc gives the guide the data the model simulated at its observed site {name!r}, but that site "
                    "observes a value computed inside the model (not one of its arguments), so the simulated value "
                    f"has no argument to go to; observe an argument as it is (obs=x, reshaped at most)"
                )
            simulated[k] = node["value"].reshape(batch[k].shape).to(batch[k].dtype)
        z = torch.cat([site_rows(trace.nodes[s], plate) for s in chosen], -1)  # (m, D)
        return z, guide_draws(guide, tuple(simulated), chosen, plate, num_draws)

    return simulate


def _guide_draws(guide: Callable, x: Tensor, m: int, dim: int, num_draws: int) -> Tensor:
    """``(L, m, D)`` draws of site ``"z"`` of ``guide(x)``: in one particle plate, or L runs if that fails."""
    try:
        with pyro.plate(_PARTICLES, num_draws, dim=-2):
            value = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
        if value.shape[:1] == (num_draws,) and value.numel() == num_draws * m * dim:
            value = value.reshape(num_draws, m, dim)
            # One draw expanded L times (a guide sampling with torch, outside Pyro) is no use: run it L times.
            if num_draws == 1 or not bool((value[1:] == value[:1]).all()):
                return value
    except Exception:  # a guide that cannot take an outer plate is run once per draw below
        pass
    draws = []
    for _ in range(num_draws):
        nodes = poutine.trace(guide).get_trace(x).nodes
        if "z" not in nodes:
            raise _convention_error("guide(x) has no sample site 'z'")
        draws.append(nodes["z"]["value"].reshape(m, dim))
    return torch.stack(draws)


def sbc_plot(result: SBCResult, path: str | Path) -> Path:
    """Write rank histograms (first 16 dimensions) as a PNG, with the 99% band of uniform ranks shaded.

    The band of bin b spans the 0.5% and 99.5% quantiles of Binomial(M, n_b / (L + 1)), n_b the number of rank
    values in the bin; under calibration about 1 bar in 100 leaves it.
    """
    from matplotlib.figure import Figure

    m, num_dims = result.ranks.shape
    shown = min(num_dims, 16)
    ncol = min(shown, 4)
    nrow = -(-shown // ncol)
    fig = Figure(figsize=(3 * ncol, 2.4 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    frac = _bin_sizes(result.num_draws, result.bins) / (result.num_draws + 1)
    from scipy import stats

    low, high = stats.binom.ppf(0.005, m, frac), stats.binom.ppf(0.995, m, frac)
    edges = np.arange(result.bins + 1)
    binned = result.ranks * result.bins // (result.num_draws + 1)
    for d, ax in enumerate(axes):
        if d >= shown:
            ax.set_visible(False)
            continue
        counts = np.bincount(binned[:, d], minlength=result.bins)
        ax.fill_between(edges, np.append(low, low[-1]), np.append(high, high[-1]), step="post", color="0.85")
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.8)
        ax.set_title(f"z[{d}]  p = {result.p_values[d]:.3g}", fontsize=9)
        ax.set_xticks([0, result.bins], ["0", str(result.num_draws)])
        ax.set_yticks([])
    fig.suptitle(f"SBC ranks: M = {m}, L = {result.num_draws}, overall p = {result.p_value():.3g}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _is_vae(inputs: PartInput) -> bool:
    return (
        inputs.guide is None and isinstance(inputs.model, AmortizedEncoder) and isinstance(inputs.model, GenerativePath)
    )


def run_part(inputs: PartInput, config: SBCConfig) -> SBCResult:
    """The ``sbc`` part of :func:`ppvae.diagnose`: a pair's simulations take their inputs from ``inputs.data``."""
    return sbc(
        inputs.model,
        guide=inputs.guide,
        data=None if _is_vae(inputs) else inputs.data,
        latent_sites=inputs.latent_sites,
        data_plate=inputs.data_plate,
        num_simulations=config.num_simulations,
        num_draws=config.num_draws,
        batch_size=config.batch_size,
        seed=inputs.seed,
    )
