"""Guide heads q(z | x): modules mapping encoder features to the amortized variational posterior.

A head is built with ``in_features`` (the encoder's output width ``F``) and ``latent_dim`` (``D``). Its
``forward(h)`` takes features ``h: (*batch, F)`` and returns a reparameterized (``has_rsample``) Pyro distribution
with ``batch_shape == batch`` and ``event_shape == (D,)``, ready for ``pyro.sample("z", head(h))`` inside the
``"data"`` plate. Extra leading dims (e.g. ``(S, B, F)``) are batch dims like any other, and a head's output can be
expanded to an outer particle plate. The encoder network itself lives in :mod:`ppvae.blocks.nets`.

Every head shares the mean-field heads ``loc = W_m h + b_m`` and ``sigma = softplus(W_s h + b_s) + 1e-5``:
softplus grows linearly (exp would overflow for large pre-activations, and its gradient explodes with them) and the
floor keeps the density finite when a unit collapses.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import conditional_affine_autoregressive
from torch import Tensor, nn

from ppvae.blocks.registry import Registry
from ppvae.errors import ConfigError

__all__ = ["GUIDES", "FullRankGuide", "IAFGuide", "LowRankGuide", "NormalGuide"]

GUIDES = Registry("guide")

_MIN_SCALE = 1e-5


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


@GUIDES.register("normal")
class NormalGuide(nn.Module):
    """Mean-field Gaussian q(z | x) = N(z; mu(h), diag(sigma(h)^2)), h = encoder(x).

    ``mu = W_m h + b_m``, ``sigma = softplus(W_s h + b_s) + 1e-5``: ``(*batch, D)`` each. The analytic
    KL(q || N(0, I)) exists for this family. Kingma & Welling 2014; Rezende et al. 2014.

    Args:
        in_features: width ``F`` of the encoder features.
        latent_dim: dimension ``D`` of ``z``.
    """

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.latent_dim = _positive_int("latent_dim", latent_dim)
        self.loc_head = nn.Linear(in_features, latent_dim)
        self.scale_head = nn.Linear(in_features, latent_dim)

    def loc_scale(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Mean-field parameters ``(mu, sigma)``, each ``(*batch, D)``, for features ``h: (*batch, F)``."""
        if h.shape[-1:] != (self.in_features,):
            raise ConfigError(
                f"guide {getattr(self, 'block_name', type(self).__name__)!r} expects encoder features of shape "
                f"(*batch, {self.in_features}) but got {tuple(h.shape)}; build it with in_features=encoder.out_features"
            )
        return self.loc_head(h), F.softplus(self.scale_head(h)) + _MIN_SCALE

    def forward(self, h: Tensor) -> dist.Distribution:
        loc, scale = self.loc_scale(h)
        return dist.Normal(loc, scale).to_event(1)


@GUIDES.register("lowrank")
class LowRankGuide(NormalGuide):
    """Low-rank-plus-diagonal Gaussian q(z | x) = N(z; mu, S (V V^T + I) S), S = diag(sigma(h)).

    ``V = reshape(W_v h + b_v): (*batch, D, rank)`` captures the ``rank`` leading correlation directions at
    O(D rank) cost; ``mu, sigma`` are the mean-field heads (with ``V = 0`` this is exactly :class:`NormalGuide`).
    Pyro's ``LowRankMultivariateNormal`` gets ``cov_factor = S V`` and ``cov_diag = sigma^2``: any factor is
    reachable (V = S^-1 W), and the capacitance matrix I + V^T V it factorizes stays well conditioned when a
    scale collapses to its 1e-5 floor (I + W^T diag(sigma^-2) W in float32 would not). Rezende et al. 2014
    (rank-1 covariance); Ong et al. 2018.

    Args:
        rank: number of columns of ``V``.
    """

    def __init__(self, in_features: int, latent_dim: int, rank: int = 2) -> None:
        super().__init__(in_features, latent_dim)
        self.rank = _positive_int("rank", rank)
        self.factor_head = nn.Linear(in_features, latent_dim * rank)

    def forward(self, h: Tensor) -> dist.Distribution:
        loc, scale = self.loc_scale(h)
        factor = self.factor_head(h).unflatten(-1, (self.latent_dim, self.rank))
        return dist.LowRankMultivariateNormal(loc, scale.unsqueeze(-1) * factor, scale.square())


@GUIDES.register("fullrank")
class FullRankGuide(NormalGuide):
    """Full-covariance Gaussian q(z | x) = N(z; mu(h), L(h) L(h)^T) with Cholesky factor L = S U.

    ``S = diag(sigma(h))`` is the mean-field scale (softplus, positive) and ``U`` is unit lower triangular with the
    ``D (D - 1) / 2`` entries below its diagonal from a linear head, so L has the positive diagonal ``sigma`` and
    L L^T is positive definite (with those entries zero this is exactly :class:`NormalGuide`). Every Cholesky
    factor is reachable (U = S^-1 L), and the correlation structure U keeps its conditioning when a scale
    collapses. Cost O(D^2) per datapoint. Kingma & Welling 2014 (appendix); Cremer et al. 2018.
    """

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__(in_features, latent_dim)
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        # With D = 1 there is nothing below the diagonal (and a zero-width Linear warns at init).
        self.tril_head = nn.Linear(in_features, rows.numel()) if rows.numel() else None

    def scale_tril(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, L)``: ``(*batch, D)`` and the lower-triangular ``(*batch, D, D)``."""
        loc, scale = self.loc_scale(h)
        unit = torch.eye(self.latent_dim, dtype=scale.dtype, device=scale.device).expand(scale.shape + scale.shape[-1:])
        if self.tril_head is not None:
            lower = torch.zeros_like(unit)
            lower[..., self.rows, self.cols] = self.tril_head(h)
            unit = unit + lower
        return loc, scale.unsqueeze(-1) * unit

    def forward(self, h: Tensor) -> dist.Distribution:
        loc, tril = self.scale_tril(h)
        return dist.MultivariateNormal(loc, scale_tril=tril)


@GUIDES.register("iaf")
class IAFGuide(NormalGuide):
    """Inverse autoregressive flow: z = g_T o ... o g_1(z_0), z_0 ~ N(mu(h), diag(sigma(h)^2)).

    Each step is an affine autoregressive map conditioned on the features h (its MADE network reads
    ``[h, z_{t-1}]``), so q stays amortized. With ``stable=True`` (Kingma et al. 2016, eq. 14),
    ``g_t(x) = s_t * x + (1 - s_t) * m_t`` with scale ``s_t = sigmoid(l_t + 2)``; otherwise
    ``g_t(x) = s_t * x + m_t`` with ``s_t = exp(l_t)`` (l_t clamped to [-5, 3]). ``(m_t, l_t)_d`` depend on
    ``x_{<d}`` (and h) only, so the Jacobian is triangular:

        log q(z | x) = log N(z_0; mu, sigma^2) - sum_t sum_d log s_{t,d}.

    Sampling is one pass per step; ``log_prob`` of the distribution's own latest sample reuses the cached inverse.
    Scoring any other z (e.g. MCMC draws) inverts each step sequentially: D network passes per step. The
    context ``h: (*batch, F)`` may carry any leading dims (``(S, B, F)`` under vectorized particles); a sample
    with more leading dims than ``h`` broadcasts it. Kingma et al. 2016, "Improved Variational Inference with
    Inverse Autoregressive Flow"; Pyro's :func:`conditional_affine_autoregressive`.

    Args:
        num_flows: number ``T`` of autoregressive steps.
        hidden_dims: hidden widths of each conditional MADE (default ``[10 D]``; each width must be ``>= D``).
        stable: use the sigmoid-gated update of Kingma et al. (scales in (0, 1), initially ~0.88).
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        num_flows: int = 2,
        hidden_dims: Sequence[int] | None = None,
        stable: bool = True,
    ) -> None:
        super().__init__(in_features, latent_dim)
        _positive_int("num_flows", num_flows)
        hidden = [10 * latent_dim] if hidden_dims is None else [int(w) for w in hidden_dims]
        if not hidden or min(hidden) < latent_dim:
            raise ConfigError(
                f"iaf guide hidden_dims must be a non-empty list of widths >= latent_dim={latent_dim}, "
                f"got {hidden_dims!r}"
            )
        self.stable = bool(stable)
        self.flows = nn.ModuleList(
            conditional_affine_autoregressive(latent_dim, in_features, hidden_dims=hidden, stable=self.stable)
            for _ in range(num_flows)
        )

    def forward(self, h: Tensor) -> dist.TransformedDistribution:
        loc, scale = self.loc_scale(h)
        base = dist.Normal(loc, scale).to_event(1)
        # condition() builds fresh transforms per call: each distribution has its own one-sample cache.
        return dist.TransformedDistribution(base, [flow.condition(h) for flow in self.flows])
