"""Priors p(z): modules whose ``forward()`` returns the prior distribution over the latent code.

Every prior returns a Pyro distribution with ``batch_shape == ()`` and ``event_shape == (latent_dim,)``, so that
``pyro.sample("z", prior())`` inside ``pyro.plate("data", B)`` (and an outer particle plate of size S at dim -2)
broadcasts it to ``(B,)`` or ``(S, B)``. Fixed constants live in buffers and learnable ones in parameters, so a
prior follows ``module.to(device)``. Only ``log_prob`` is needed in training (the latent site is replayed from the
guide); ``sample`` is used for generation, and learnable mixtures need not be reparameterizable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineAutoregressive
from pyro.nn import AutoRegressiveNN
from torch import Tensor, nn

from ppvae.blocks.registry import Registry
from ppvae.errors import ConfigError

__all__ = [
    "PRIORS",
    "FlowPrior",
    "LaplacePrior",
    "Mixture",
    "MixturePrior",
    "NormalPrior",
    "Prior",
    "StudentTPrior",
    "VampPrior",
]

PRIORS = Registry("prior")


def _positive(name: str, value: float, kind: type = float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or (kind is int and int(value) != value)
    ):
        what = "a positive integer" if kind is int else "a positive number"
        raise ConfigError(f"{name} must be {what}, got {value!r}")


class Mixture(dist.MixtureSameFamily):
    """Finite mixture p(z) = sum_k pi_k p_k(z), log p(z) = logsumexp_k [log pi_k + log p_k(z)].

    ``mixture``: Categorical over ``K`` components with batch ``batch``; ``components``: batch ``(*batch, K)``,
    event ``(D,)``. Unlike :class:`torch.distributions.MixtureSameFamily`, ``log_prob`` expands ``z`` to the full
    ``(*sample, *batch, K, D)`` before scoring, so components that cannot broadcast a size-1 component dim work
    too (e.g. a conditioned autoregressive flow whose context has batch ``(K, F)``). Sampling picks k, then
    samples that component; it is not reparameterized.
    """

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        ndims = self._event_ndims
        batch = torch.broadcast_shapes(value.shape[: value.dim() - ndims], self.batch_shape)
        value = value.unsqueeze(-1 - ndims).expand(batch + (self._num_component,) + self.event_shape)
        log_pk = self.component_distribution.log_prob(value)  # (*batch, K)
        log_pi = torch.log_softmax(self.mixture_distribution.logits, dim=-1)
        return torch.logsumexp(log_pk + log_pi, dim=-1)


class Prior(nn.Module):
    """Base class: ``forward()`` returns p(z) with batch shape ``()`` and event shape ``(latent_dim,)``."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        _positive("latent_dim", latent_dim, int)
        self.latent_dim = int(latent_dim)

    def forward(self) -> dist.Distribution:
        raise NotImplementedError


@PRIORS.register("normal")
class NormalPrior(Prior):
    """Standard normal p(z) = N(z; 0, I) = prod_d exp(-z_d^2 / 2) / sqrt(2 pi). Kingma & Welling 2014."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


@PRIORS.register("laplace")
class LaplacePrior(Prior):
    """Independent Laplace p(z) = prod_d exp(-|z_d| / b) / (2 b): heavier tails and a sparsity-inducing peak.

    Args:
        scale: ``b > 0``, the same in every dimension.
    """

    def __init__(self, latent_dim: int, scale: float = 1.0) -> None:
        super().__init__(latent_dim)
        _positive("scale", scale)
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.full((self.latent_dim,), float(scale)))

    def forward(self) -> dist.Distribution:
        return dist.Laplace(self.loc, self.scale).to_event(1)


@PRIORS.register("student-t")
class StudentTPrior(Prior):
    """Independent Student-t, p(z) = prod_d Gamma((v+1)/2) / (Gamma(v/2) sqrt(v pi)) (1 + z_d^2 / v)^(-(v+1)/2).

    Args:
        df: degrees of freedom ``v > 0`` (small ``v``: heavy tails; ``v -> inf``: the standard normal).
    """

    def __init__(self, latent_dim: int, df: float = 3.0) -> None:
        super().__init__(latent_dim)
        _positive("df", df)
        self.register_buffer("df", torch.full((self.latent_dim,), float(df)))
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


@PRIORS.register("mixture")
class MixturePrior(Prior):
    """Learnable Gaussian mixture p(z) = sum_k softmax(w)_k N(z; mu_k, diag(sigma_k^2)).

    Parameters: logits ``w: (K,)`` (init 0: uniform), means ``mu: (K, D)`` (init N(0, 1), so components start
    spread out), log-scales ``log sigma: (K, D)`` (init 0). Dilokthanakul et al. 2016 (GMVAE); with ``K = 1`` and
    fixed parameters it is the standard normal.

    Args:
        components: number ``K`` of mixture components.
    """

    def __init__(self, latent_dim: int, components: int = 10) -> None:
        super().__init__(latent_dim)
        _positive("components", components, int)
        self.components = int(components)
        self.logits = nn.Parameter(torch.zeros(self.components))
        self.means = nn.Parameter(torch.randn(self.components, self.latent_dim))
        self.log_scales = nn.Parameter(torch.zeros(self.components, self.latent_dim))

    def forward(self) -> dist.Distribution:
        component = dist.Normal(self.means, self.log_scales.exp()).to_event(1)
        return Mixture(dist.Categorical(logits=self.logits), component)


@PRIORS.register("vamp")
class VampPrior(Prior):
    """VampPrior: the aggregate posterior over learnable pseudo-inputs, p(z) = (1/K) sum_k q(z | u_k).

    log p(z) = logsumexp_k log q(z | u_k) - log K. The pseudo-inputs ``u: (K, *data_shape)`` are parameters
    (init U(0.45, 0.55)); ``q`` is the model's own encoder + guide head, handed over by :meth:`attach` (done by
    :class:`ppvae.VAE`) and stored outside the module tree, so its parameters are not duplicated here. Any
    guide family works as component (mean-field, low-rank, full-rank, IAF: the mixture expands ``z`` to every
    component before scoring); with an IAF guide, scoring z that the component did not sample inverts the flow
    sequentially (D network passes). Tomczak & Welling 2018, "VAE with a VampPrior".

    Args:
        data_shape: shape of one datapoint, the shape of each pseudo-input.
        components: number ``K`` of pseudo-inputs.
    """

    def __init__(self, latent_dim: int, data_shape: Sequence[int], components: int = 50) -> None:
        super().__init__(latent_dim)
        _positive("components", components, int)
        self.data_shape = tuple(int(s) for s in data_shape)
        self.components = int(components)
        self.u = nn.Parameter(torch.rand(self.components, *self.data_shape) * 0.1 + 0.45)
        self.register_buffer("uniform_logits", torch.zeros(self.components), persistent=False)
        # object.__setattr__ bypasses nn.Module's registration: the encoder belongs to the VAE, not to the prior.
        object.__setattr__(self, "_encode", None)

    def attach(self, encode: Callable[[Tensor], dist.Distribution]) -> None:
        """Use ``encode``: ``x: (K, *data_shape)`` -> q(z | x) with batch ``(K,)``, event ``(latent_dim,)``."""
        if not callable(encode):
            raise ConfigError(f"VampPrior.attach needs a callable x -> q(z | x), got {type(encode).__name__}")
        object.__setattr__(self, "_encode", encode)

    def forward(self) -> dist.Distribution:
        if self._encode is None:
            raise ConfigError("VampPrior needs the encoder: build it through ppvae.VAE or call prior.attach(...)")
        q = self._encode(self.u)
        if tuple(q.batch_shape) != (self.components,) or tuple(q.event_shape) != (self.latent_dim,):
            raise ConfigError(
                f"VampPrior's encoder must map pseudo-inputs {(self.components, *self.data_shape)} to q(z | u) with "
                f"batch_shape ({self.components},) and event_shape ({self.latent_dim},), got batch_shape "
                f"{tuple(q.batch_shape)} and event_shape {tuple(q.event_shape)}"
            )
        return Mixture(dist.Categorical(logits=self.uniform_logits), q)


class _SameDtype:
    """Calls a MADE network on inputs cast to its weights' dtype: Pyro's sequential inverse (our sampling path)
    starts from float32 zeros, which breaks a float64 flow."""

    def __init__(self, net: AutoRegressiveNN) -> None:
        self.net = net
        self.permutation = net.permutation  # read by AffineAutoregressive._inverse
        self.dtype = next(net.parameters()).dtype

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x.to(self.dtype))


@PRIORS.register("flow")
class FlowPrior(Prior):
    """Normalizing-flow prior: z = f^{-1}(e), e ~ N(0, I), f = f_T o ... o f_1 masked autoregressive (MAF) maps.

    Each step f_t(x) = exp(s_t(x)) * x + m_t(x) with (m_t, s_t) from a MADE network (each with its own random
    variable ordering, so stacked steps mix dimensions; log-scale clamped to [-5, 3]); with x_0 = z,
    x_t = f_t(x_{t-1}), the density costs one network pass per step:

        log p(z) = log N(x_T; 0, I) + sum_t sum_d s_t(x_{t-1})_d.

    Pyro's :class:`AffineAutoregressive` is used in the inverse direction, so scoring arbitrary z (from the
    guide) is the cheap direction; sampling (generation) inverts each step sequentially (D passes).
    The transforms are rebuilt from the module's networks on every ``forward()``, so their one-entry
    caches never serve values computed with old weights.
    Papamakarios et al. 2017 (MAF); Rezende & Mohamed 2015; Papamakarios et al. 2021 (review).

    Args:
        num_flows: number ``T`` of autoregressive steps.
        hidden_dims: hidden widths of each MADE network (default ``[3 D + 1]``; each width must be ``>= D``).
    """

    def __init__(self, latent_dim: int, num_flows: int = 2, hidden_dims: Sequence[int] | None = None) -> None:
        super().__init__(latent_dim)
        _positive("num_flows", num_flows, int)
        hidden = [3 * self.latent_dim + 1] if hidden_dims is None else [int(h) for h in hidden_dims]
        if not hidden or min(hidden) < self.latent_dim:
            raise ConfigError(
                f"flow prior hidden_dims must be a non-empty list of widths >= latent_dim={self.latent_dim}, "
                f"got {hidden_dims!r}"
            )
        self.nets = nn.ModuleList(AutoRegressiveNN(self.latent_dim, hidden) for _ in range(int(num_flows)))
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def forward(self) -> dist.TransformedDistribution:
        base = dist.Normal(self.loc, self.scale).to_event(1)
        # Sampling applies the transforms in list order: e -> f_T^{-1} -> ... -> f_1^{-1} = z.
        transforms = [AffineAutoregressive(_SameDtype(net)).inv for net in reversed(self.nets)]
        return dist.TransformedDistribution(base, transforms)
