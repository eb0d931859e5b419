"""Posterior collapse: active units, KL per latent dimension, mutual information and marginal KL.

For a ppvae.VAE from q(z | x) and p(z) as distributions (:func:`posterior_collapse`); for any other pair from its
guide's draws of the local latents found from the trace (:func:`pair_collapse`):

- active units (Burda et al. 2015): dimension d is active when Var_x E_q[z_d | x] > 0.01;
- KL per dimension: E_x KL(q(z_d | x) ‖ p(z_d)) with the marginals of q and p (a dimension under 0.01 nats is
  collapsed); available when both marginals are known in closed form (Normal-family guides, factorized priors);
- ELBO surgery (Hoffman & Johnson 2016): E_x KL(q(z|x) ‖ p(z)) = I_q(x; z) + KL(q(z) ‖ p(z)), with the aggregate
  posterior q(z) = (1/M) Σ_j q(z | x_j) over M datapoints; I ≤ log M.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor

from ppvae._local_params import local_module_params
from ppvae._param_store import model_store
from ppvae._rng import fork_rngs
from ppvae.diagnostics.config import CollapseConfig
from ppvae.diagnostics.parts import PartInput
from ppvae.errors import NotApplicable
from ppvae.infer.eval_mode import scoring_mode
from ppvae.infer.logweights import particles_broadcast
from ppvae.infer.pair import AmortizedEncoder, as_pair
from ppvae.infer.sites import data_axis, discover_sites, per_datapoint_args, site_log_prob_rows, site_rows, take_rows

__all__ = ["Collapse", "posterior_collapse", "pair_collapse", "run_part", "ACTIVE_THRESHOLD", "COLLAPSED_NATS"]

ACTIVE_THRESHOLD = 0.01  # Var_x E_q[z_d] above which a unit counts as active (Burda et al. 2015)
COLLAPSED_NATS = 0.01  # KL per dimension below which a dimension counts as collapsed, nats


@dataclass
class Collapse:
    """Collapse statistics (nats). ``kl_per_dim`` is None when the marginals have no closed form."""

    activity: np.ndarray  # (D,) Var_x E_q[z_d | x]
    kl_per_dim: np.ndarray | None  # (D,)
    kl_total: float  # E_x KL(q(z|x) ‖ p(z)), Monte Carlo
    mutual_information: float  # I_q(x; z)
    marginal_kl: float  # KL(q(z) ‖ p(z))
    num_points: int  # datapoints in the aggregate posterior (I ≤ log num_points)

    @property
    def active_units(self) -> int:
        return int((self.activity > ACTIVE_THRESHOLD).sum())

    @property
    def collapsed_dims(self) -> list[int] | None:
        if self.kl_per_dim is None:
            return None
        return [int(d) for d in np.flatnonzero(self.kl_per_dim < COLLAPSED_NATS)]

    def summary(self) -> dict[str, Any]:
        return {
            "active_units": self.active_units,
            "latent_dim": len(self.activity),
            "collapsed_dims": self.collapsed_dims,
            "kl_total": self.kl_total,
            "mutual_information": self.mutual_information,
            "mutual_information_max": math.log(self.num_points),
            "marginal_kl": self.marginal_kl,
            "kl_per_dim": None if self.kl_per_dim is None else [float(v) for v in self.kl_per_dim],
        }

    def rows(self) -> list[tuple[str, str, str]]:
        """Rows of the diagnosis table: active units, collapsed dimensions, MI and marginal KL."""
        c = self.summary()
        rows = [("active units", f"{c['active_units']} / {c['latent_dim']}", f"Var_x E_q[z_d] > {ACTIVE_THRESHOLD}")]
        if c["collapsed_dims"] is not None:
            rows.append(("collapsed dims", str(len(c["collapsed_dims"])), f"KL_d < {COLLAPSED_NATS} nats"))
        rows.append(
            (
                "MI | marginal KL",
                f"{c['mutual_information']:.3f} | {c['marginal_kl']:.3f} nats",
                f"I ≤ log M = {c['mutual_information_max']:.2f}",
            )
        )
        return rows

    def figures(self, directory: Path) -> dict[str, Path]:
        """``kl_per_dim.png`` when the KL per dimension is known."""
        if self.kl_per_dim is None:
            return {}
        from ppvae.report.figures import kl_per_dim_plot

        return {"kl_per_dim": kl_per_dim_plot(self.kl_per_dim, Path(directory) / "kl_per_dim.png")}


def _marginals(q: dist.Distribution) -> tuple[Tensor, Tensor] | None:
    """Per-dimension (mean, sd) of a Normal-family q; None otherwise (flows)."""
    base = q.base_dist if isinstance(q, dist.Independent) else q
    if isinstance(base, dist.Normal):
        return base.loc, base.scale
    if isinstance(q, (dist.MultivariateNormal, dist.LowRankMultivariateNormal)):
        return q.loc, q.variance.sqrt()
    return None


def _prior_marginal(p: dist.Distribution) -> dist.Distribution | None:
    """p(z_d) as a batch of D univariate distributions, when the prior factorizes."""
    if isinstance(p, dist.Independent) and p.reinterpreted_batch_ndims == 1:
        return p.base_dist
    return None


@torch.no_grad()
def posterior_collapse(
    vae: Any,
    data: Tensor,
    *,
    num_points: int = CollapseConfig.num_points,
    num_samples: int = CollapseConfig.num_mc_draws,
    seed: int = 0,
) -> Collapse:
    """Collapse statistics of a ppvae.VAE on (up to ``num_points`` rows of) ``data``: ``(N, *data_shape)``."""
    if not isinstance(vae, AmortizedEncoder):
        raise NotApplicable(
            "posterior collapse needs q(z|x) and p(z) as distributions (a ppvae.VAE: encode(x), prior()); "
            f"got {type(vae).__name__}"
        )
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(data)
    if len(x) > num_points:
        x = x[torch.randperm(len(x), generator=gen)[:num_points]]
    # The global RNGs are the caller's again afterwards; the networks in eval mode, as they were afterwards.
    with local_module_params(), fork_rngs(), scoring_mode(vae):
        torch.manual_seed(seed)
        q, p = vae.encode(x), vae.prior()
        z = q.sample((num_samples,))  # (S, M, D)
        marg = _marginals(q)
        means = marg[0] if marg is not None else z.mean(0)
        activity = means.var(0, unbiased=True).numpy()
        kl_total = (q.log_prob(z) - p.log_prob(z)).mean().item()
        kl_dim = None
        prior_d = _prior_marginal(p)
        if marg is not None and prior_d is not None:
            q_d = dist.Normal(*marg)
            kl_dim = (q_d.log_prob(z) - prior_d.log_prob(z)).mean((0, 1)).numpy()
        # Aggregate posterior at one draw per datapoint: log q(z_i) = logsumexp_j log q(z_i | x_j) − log M,
        # on up to 500 datapoints (100 for flows, whose density at foreign points costs D passes).
        m = min(len(x), 500 if marg is not None else 100)
        q_m = vae.encode(x[:m])
        z1 = z[0, :m]  # (M, D)
        log_q_cross = torch.stack([q_m.log_prob(z1[i].expand(m, -1)) for i in range(m)])  # (M_i, M_j)
        log_q_agg = log_q_cross.logsumexp(1) - math.log(m)
        kl_m = (log_q_cross.diagonal() - p.log_prob(z1)).mean().item()
        marginal_kl = (log_q_agg - p.log_prob(z1)).mean().item()
    return Collapse(
        activity=activity,
        kl_per_dim=kl_dim,
        kl_total=kl_total,
        mutual_information=kl_m - marginal_kl,
        marginal_kl=marginal_kl,
        num_points=m,
    )


def pair_collapse(
    model: Any,
    data: Any,
    *,
    guide: Callable | None = None,
    latent_sites: str | Sequence[str] | None = None,
    data_plate: str = "data",
    num_points: int = CollapseConfig.num_points,
    num_samples: int = CollapseConfig.num_mc_draws,
    seed: int = 0,
) -> Collapse:
    """Collapse statistics of any pair from its guide's draws of the local latents (found from the trace).

    Activity is Var_x of the mean of ``num_samples`` guide draws (the Monte Carlo E_q[z_d | x]); the KL is
    E_x E_q[log q(z | x) − log p(z | ...)] over the chosen sites, each site's log-density per datapoint from the
    guide's and the model's traces (the model replayed on the guide's draws, so a prior conditioned on other
    latents or on inputs is its own); the aggregate posterior, mutual information and marginal KL as for a VAE, on
    up to 100 datapoints, by scoring each datapoint's draw under every datapoint's guide (``poutine.condition``).
    ``kl_per_dim`` is computed for one site whose guide is Normal-family and whose prior factorizes, as for a VAE.
    """
    pair = as_pair(model, guide, what="collapse")
    args = per_datapoint_args(data)
    n = len(args[0])
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=gen)[:num_points] if n > num_points else torch.arange(n)
    batch = take_rows(args, rows, n)
    store = model_store(pair.model, pair.guide, pair.owner, exercise=lambda: (pair.guide(*batch), pair.model(*batch)))
    # Eval mode first (flags and buffers given back afterwards), then the pair's own parameter store.
    with scoring_mode(pair.owner, pair.model, pair.guide), store, local_module_params(), fork_rngs(), poutine.block():
        torch.manual_seed(seed)
        sites = discover_sites(pair.model, pair.guide, batch, data_plate=data_plate)
        names = sites.latents(latent_sites, "posterior collapse")
        missing = [s for s in names if s not in sites.guide_sites]
        if missing:
            raise NotApplicable(
                f"posterior collapse reads the guide's draws of {missing}, which the guide does not sample"
            )
        z, log_q_all, log_p_all = _draws(pair.model, pair.guide, batch, names, data_plate, num_samples)  # (S, M, ·)
        activity = z.mean(0).var(0, unbiased=True).double().numpy()
        kl_total = (log_q_all - log_p_all).mean().item()
        m = min(len(rows), 100)
        small = take_rows(batch, torch.arange(m), len(rows))
        guide_trace = poutine.trace(pair.guide).get_trace(*small)
        model_trace = poutine.trace(poutine.replay(pair.model, trace=guide_trace)).get_trace(*small)

        def log_density(trace: Any) -> Tensor:  # (m,) Σ over the chosen sites
            return sum(site_log_prob_rows(trace.nodes[s], data_plate) for s in names)

        log_q, log_p = log_density(guide_trace), log_density(model_trace)
        cross = []
        for i in range(m):  # log q(z_i | x_j) for every j: datapoint i's draw given to every datapoint's guide
            values = {s: _repeat_row(guide_trace.nodes[s], data_plate, i, m) for s in names}
            conditioned = poutine.trace(poutine.condition(pair.guide, data=values)).get_trace(*small)
            cross.append(log_density(conditioned))
        log_q_cross = torch.stack(cross)  # (M_i, M_j)
        log_q_agg = log_q_cross.logsumexp(1) - math.log(m)
        marginal_kl = (log_q_agg - log_p).mean().item()
        kl_dim = _pair_kl_per_dim(guide_trace, model_trace, names, z.shape[-1])
    return Collapse(
        activity=activity,
        kl_per_dim=kl_dim,
        kl_total=kl_total,
        mutual_information=(log_q - log_p).mean().item() - marginal_kl,
        marginal_kl=marginal_kl,
        num_points=m,
    )


_PARTICLES = "_ppvae_collapse_particles"


def _draws(
    model: Callable, guide: Callable, batch: tuple, names: Sequence[str], plate: str, num: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``z (S, M, D)`` guide draws of the sites ``names`` and their ``log q``, ``log p`` ``(S, M)`` (the model
    replayed on the draws): S at once in a particle plate, else one run per draw (a guide that does not broadcast)."""

    def run(particles: str | None) -> tuple[Tensor, Tensor, Tensor]:
        guide_trace = poutine.trace(guide).get_trace(*batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*batch)
        z = torch.cat([site_rows(guide_trace.nodes[s], plate, particles) for s in names], -1)
        log_q = sum(site_log_prob_rows(guide_trace.nodes[s], plate, particles) for s in names)
        log_p = sum(site_log_prob_rows(model_trace.nodes[s], plate, particles) for s in names)
        return z, log_q, log_p  # type: ignore[return-value]

    probe = poutine.trace(guide).get_trace(*batch)
    dims = [f.dim for site in probe.nodes.values() if site["type"] == "sample" for f in site["cond_indep_stack"]]
    want = sum(site_rows(probe.nodes[s], plate).numel() for s in names)
    try:
        if particles_broadcast(model, guide, *batch, data_plate=plate) is not None:
            raise ValueError("the pair does not broadcast over particles")  # BatchNorm, masks: one draw at a time
        with pyro.plate(_PARTICLES, num, dim=min([-1, *dims]) - 1):
            z, log_q, log_p = run(_PARTICLES)
        if z.numel() == num * want and log_q.shape == z.shape[:2] and (num == 1 or not bool((z[1:] == z[:1]).all())):
            return z, log_q, log_p
    except Exception:  # noqa: BLE001 - a pair that cannot take an outer plate is run once per draw below
        pass
    z, log_q, log_p = zip(*(run(None) for _ in range(num)), strict=True)
    return torch.stack(z), torch.stack(log_q), torch.stack(log_p)


def _repeat_row(site: dict, plate: str, i: int, m: int) -> Tensor:
    """The site's value with datapoint ``i``'s value in every one of the ``m`` rows of its data axis."""
    value = site["value"]
    axis = data_axis(site, plate)
    one = value.narrow(axis, i, 1)
    return one.expand(*value.shape[:axis], m, *value.shape[axis + 1 :])


def _pair_kl_per_dim(guide_trace: Any, model_trace: Any, names: Sequence[str], dim: int) -> np.ndarray | None:
    """E KL(q(z_d | x) ‖ p(z_d)) per dimension in closed form, for one site with a Normal-family guide and a
    factorized Normal prior (the torch KL of the marginals); None otherwise."""
    if len(names) != 1:
        return None
    q, p = guide_trace.nodes[names[0]]["fn"], model_trace.nodes[names[0]]["fn"]
    marg, prior_d = _marginals(q), _prior_marginal(p)
    if marg is None or prior_d is None or not isinstance(prior_d, dist.Normal) or marg[0].shape[-1] != dim:
        return None
    kl = torch.distributions.kl_divergence(dist.Normal(*marg), prior_d)
    return kl.reshape(-1, dim).mean(0).double().numpy()


def run_part(inputs: PartInput, config: CollapseConfig) -> Collapse:
    """The ``collapse`` part of :func:`ppvae.diagnose`: a ppvae.VAE from its distributions, any other pair from its
    guide's draws (:func:`pair_collapse`)."""
    if inputs.guide is None and isinstance(inputs.model, AmortizedEncoder):
        return posterior_collapse(
            inputs.model, inputs.x, num_points=config.num_points, num_samples=config.num_mc_draws, seed=inputs.seed
        )
    return pair_collapse(
        inputs.model,
        inputs.x if inputs.data is None else inputs.data,
        guide=inputs.guide,
        latent_sites=inputs.latent_sites,
        data_plate=inputs.data_plate,
        num_points=config.num_points,
        num_samples=config.num_mc_draws,
        seed=inputs.seed,
    )
