"""Factor analysis written by hand as a Pyro model/guide pair: the linear-Gaussian VAE.

    z_i ~ N(0, I_d),   x_i | z_i ~ N(W z_i + b, diag(ψ))                      (model)
    q(z_i | x_i) = N(A x_i + c, L Lᵀ)                                        (guide: full-rank, linear)

The guide family contains the exact posterior, N(S Wᵀ Ψ⁻¹ (x − b), S) with S = (I + Wᵀ Ψ⁻¹ W)⁻¹, so the ELBO
can reach the exact log-likelihood log N(x; b, W Wᵀ + Ψ) (Bishop 2006, §12.2.4). Train it with

    ppvae train --model models/factor_analysis.py --dataset linear-gaussian --latent-dim 2
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class FactorAnalysis(nn.Module):
    def __init__(self, data_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.W = nn.Parameter(torch.randn(data_dim, latent_dim) / math.sqrt(latent_dim))
        self.b = nn.Parameter(torch.zeros(data_dim))
        self.log_psi = nn.Parameter(torch.zeros(data_dim))  # log noise variance per dimension
        self.A = nn.Linear(data_dim, latent_dim)  # posterior mean is linear in x
        self.raw_tril = nn.Parameter(torch.zeros(latent_dim, latent_dim))  # posterior covariance is constant

    def model(self, x: torch.Tensor | None = None, batch_size: int = 1) -> torch.Tensor:
        n = batch_size if x is None else x.shape[0]
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(self.W.new_zeros(self.latent_dim), 1.0).to_event(1))
            scale = torch.exp(0.5 * self.log_psi)
            return pyro.sample("x", dist.Normal(z @ self.W.T + self.b, scale).to_event(1), obs=x)

    def guide(self, x: torch.Tensor | None = None, batch_size: int = 1) -> None:
        if x is None:
            return
        tril = self.raw_tril.tril(-1) + torch.diag(nn.functional.softplus(self.raw_tril.diagonal()) + 1e-4)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(self.A(x), scale_tril=tril))

    def exact_log_px(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) under the current parameters, nats: ``(n,)``."""
        cov = self.W @ self.W.T + torch.diag(torch.exp(self.log_psi))
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)


def build(data_shape: tuple[int, ...], latent_dim: int) -> FactorAnalysis:
    """Entry point for ``ppvae train --model models/factor_analysis.py``: flat data of shape ``(D,)``."""
    if len(data_shape) != 1:
        raise ValueError(
            f"factor analysis needs flat data of shape (D,), got {data_shape}; use --dataset linear-gaussian"
        )
    return FactorAnalysis(data_shape[0], latent_dim)
