"""Posterior collapse: active units, KL per latent dimension, mutual information and marginal KL.

For a ppvae.VAE (it needs q(z | x) and p(z) as distributions):

- active units (Burda et al. 2015): dimension d is active when Var_x E_q[z_d | x] > 0.01;
- KL per dimension: E_x KL(q(z_d | x) ‖ p(z_d)) with the marginals of q and p (a dimension under 0.01 nats is
  collapsed); available when both marginals are known in closed form (Normal-family guides, factorized priors);
- ELBO surgery (Hoffman & Johnson 2016): E_x KL(q(z|x) ‖ p(z)) = I_q(x; z) + KL(q(z) ‖ p(z)), with the aggregate
  posterior q(z) = (1/M) Σ_j q(z | x_j) over M datapoints; I ≤ log M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
from torch import Tensor

from ppvae._local_params import local_module_params
from ppvae._rng import fork_rngs
from ppvae.diagnostics.config import CollapseConfig
from ppvae.diagnostics.parts import PartInput
from ppvae.errors import NotApplicable
from ppvae.infer.eval_mode import scoring_mode
from ppvae.infer.pair import AmortizedEncoder

__all__ = ["Collapse", "posterior_collapse", "run_part", "ACTIVE_THRESHOLD", "COLLAPSED_NATS"]

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


def run_part(inputs: PartInput, config: CollapseConfig) -> Collapse:
    """The ``collapse`` part of :func:`ppvae.diagnose`."""
    return posterior_collapse(
        inputs.model, inputs.x, num_points=config.num_points, num_samples=config.num_mc_draws, seed=inputs.seed
    )
