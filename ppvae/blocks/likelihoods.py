"""Likelihood heads: modules mapping decoder output to p(x | z).

A head is built with the per-example ``data_shape``; its ``forward(params)`` takes decoder output
``params: (*batch, num_params, *data_shape)`` and returns a Pyro distribution with batch shape ``batch`` and event
shape ``data_shape``, ready for ``pyro.sample("x", d, obs=x)``. Every head also offers ``mean(params)`` (E[x | z],
for reconstructions and sample grids) and ``check_data(x)`` (raises :class:`~ppvae.errors.DataError` when data fall
outside the support; the trainer calls it once, so the distributions themselves skip argument validation).

Grid data (``categorical``, ``discretized-logistic``) are values in [0, 1] on ``k / (levels - 1)``: the same tensors
that feed the Bernoulli-family heads, so switching heads needs no new preprocessing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor, nn

from ppvae.blocks.registry import Registry
from ppvae.errors import ConfigError, DataError

__all__ = [
    "LIKELIHOODS",
    "Bernoulli",
    "Beta",
    "Categorical",
    "ContinuousBernoulli",
    "DiscretizedLogistic",
    "Laplace",
    "Likelihood",
    "NegativeBinomial",
    "Normal",
    "Poisson",
    "ZeroInflatedNegativeBinomial",
]

LIKELIHOODS = Registry("likelihood")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: float) -> str:
    text = f"{value:.6g}"
    return text + ".0" if text.lstrip("-").isdigit() else text


class Likelihood(nn.Module):
    """Base class: subclasses set ``num_params`` and ``discrete`` and implement :meth:`element`.

    Args:
        data_shape: shape of one example, e.g. ``(1, 28, 28)`` or ``(784,)``.
    """

    num_params: int = 1
    discrete: bool = False  # True when log_prob is a log-probability mass (bits/dim are then exact)

    def __init__(self, data_shape: Sequence[int]) -> None:
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)

    def element(self, params: Tensor) -> dist.Distribution:
        """Per-element p(x_j | z): batch shape ``(*batch, *data_shape)``, event shape ``()``."""
        raise NotImplementedError

    def forward(self, params: Tensor) -> dist.Distribution:
        """p(x | z) with batch shape ``params.shape[:-len(data_shape) - 1]`` and event shape ``data_shape``."""
        self._check_params(params)
        return self.element(params).to_event(len(self.data_shape))

    def mean(self, params: Tensor) -> Tensor:
        """E[x | z]: ``(*batch, *data_shape)``."""
        self._check_params(params)
        return self.element(params).mean

    def _split(self, params: Tensor) -> tuple[Tensor, ...]:
        return params.unbind(-len(self.data_shape) - 1)

    def _check_params(self, params: Tensor) -> None:
        expected = (self.num_params, *self.data_shape)
        if tuple(params.shape[-len(expected) :]) != expected:
            raise ConfigError(
                f"likelihood {self._name()!r} expects decoder output of shape (*batch, {', '.join(map(str, expected))})"
                f" but got {tuple(params.shape)}; build the decoder with out_shape=(likelihood.num_params, *data_shape)"
            )

    def _name(self) -> str:
        return getattr(type(self), "block_name", type(self).__name__)

    def check_data(self, x: Tensor) -> None:
        """Raise :class:`DataError` if ``x`` holds NaN/Inf or values outside this likelihood's support."""
        if x.is_complex():  # casting would drop the imaginary part without a word
            raise DataError(f"likelihood {self._name()!r} needs real data; got a tensor of dtype {x.dtype}")
        x = x if x.is_floating_point() else x.float()
        self._reject(
            x,
            ~torch.isfinite(x),
            "finite data",
            "remove or impute the non-finite values (e.g. torch.nan_to_num) before training",
        )
        self._check_support(x)

    def _check_support(self, x: Tensor) -> None:
        """Support check beyond finiteness; the default accepts any finite reals."""

    def _reject(self, x: Tensor, bad: Tensor, need: str, fix: str) -> None:
        if bool(bad.any()):
            raise DataError(
                f"likelihood {self._name()!r} needs {need} but saw {_fmt(x[bad][0].item())} in {int(bad.sum())} of "
                f"{x.numel()} values; {fix}"
            )


class _Elementwise(TorchDistribution):
    """Scalar-event distribution; its tensor parameters are ``batch_shape + (_trailing dims)``, ``_static`` names
    the plain attributes that ``expand`` carries over."""

    arg_constraints: ClassVar[dict] = {}
    _trailing = 0
    _static: tuple[str, ...] = ()

    def __init__(self, **params: Tensor) -> None:
        t = self._trailing
        batch_shape = torch.broadcast_shapes(*(p.shape[: p.dim() - t] for p in params.values()))
        self._names = tuple(params)
        for name, p in params.items():
            setattr(self, name, p.expand(batch_shape + p.shape[p.dim() - t :]))
        super().__init__(batch_shape, validate_args=False)

    def expand(self, batch_shape: Sequence[int], _instance: _Elementwise | None = None) -> _Elementwise:
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        for name in self._names:
            p = getattr(self, name)
            setattr(new, name, p.expand(batch_shape + p.shape[len(self.batch_shape) :]))
        for name in ("_names", *self._static):
            setattr(new, name, getattr(self, name))
        super(_Elementwise, new).__init__(batch_shape, validate_args=False)
        return new


def _gumbel_argmax(logits: Tensor, shape: torch.Size) -> Tensor:
    """Draw category indices of ``shape`` from ``logits: (..., K)`` by the Gumbel-max trick."""
    u = torch.rand(shape + logits.shape[-1:], dtype=logits.dtype, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    return (logits + gumbel).argmax(-1)


@LIKELIHOODS.register("bernoulli")
class Bernoulli(Likelihood):
    """Bernoulli on binary data: p(x | l) = sigmoid(l)^x (1 - sigmoid(l))^(1 - x), log p = x l - softplus(l).

    Parameters: one logit ``l`` per element. Support: {0, 1}. Kingma & Welling 2014.
    """

    discrete = True

    def element(self, params: Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=params.squeeze(-len(self.data_shape) - 1), validate_args=False)

    def _check_support(self, x: Tensor) -> None:
        self._reject(
            x,
            (x != 0) & (x != 1),
            "binary data (0 or 1)",
            "binarize the data (ppvae.data.load(..., binarize='dynamic')) or use likelihood='continuous-bernoulli'",
        )


def _cb_log_norm(logits: Tensor) -> Tensor:
    """log C(l), C = l / tanh(l / 2); near l = 0 a series avoids 0/0 and the closed form's cancelling gradient."""
    small = logits.abs() < 0.1
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = safe.abs().log() - torch.tanh(safe / 2).abs().log()
    sq = logits.square()
    return torch.where(small, math.log(2.0) + sq / 12 - 7 * sq.square() / 1440, exact)


class _ContinuousBernoulli(_Elementwise):
    support = constraints.unit_interval
    has_rsample = True

    def log_prob(self, value: Tensor) -> Tensor:
        return value * self.logits - F.softplus(self.logits) + _cb_log_norm(self.logits)

    @property
    def mean(self) -> Tensor:
        # E[x] = 1 / (1 - e^-l) - 1 / l, which cancels near l = 0: there use its series 1/2 + l/12 - l^3/720.
        lg = self.logits
        small = lg.abs() < 0.1
        safe = torch.where(small, torch.ones_like(lg), lg)
        return torch.where(small, 0.5 + lg / 12 - lg.pow(3) / 720, 1 / -torch.expm1(-safe) - 1 / safe)

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        # Inverse CDF x = log1p(u (e^l - 1)) / l, evaluated at a = -|l| (no overflow) using the symmetry
        # x(l, u) = 1 - x(-l, 1 - u); near l = 0 its first-order series u + l u (1 - u) / 2.
        shape = self._extended_shape(sample_shape)
        lg = self.logits.expand(shape)
        u = torch.rand(shape, dtype=lg.dtype, device=lg.device)
        small = lg.abs() < 1e-3
        a = torch.where(small, -torch.ones_like(lg), -lg.abs())
        v = torch.where(lg > 0, 1 - u, u)
        g = torch.log1p(v * torch.expm1(a)) / a
        x = torch.where(lg > 0, 1 - g, g)
        return torch.where(small, u + lg * u * (1 - u) / 2, x).clamp(0.0, 1.0)


@LIKELIHOODS.register("continuous-bernoulli")
class ContinuousBernoulli(Likelihood):
    """Continuous Bernoulli on [0, 1]: p(x | l) = C(l) sigmoid(l)^x (1 - sigmoid(l))^(1 - x), C(l) = l / tanh(l/2).

    The normalizer makes the Bernoulli kernel a proper density for grey-level data. Parameters: one logit ``l``
    per element. Support: [0, 1]. Mean 1 / (1 - e^-l) - 1 / l. Loaiza-Ganem & Cunningham 2019.
    Computed in logits throughout: torch's version clamps probabilities, so its density is wrong for |l| > ~15.
    """

    def element(self, params: Tensor) -> dist.Distribution:
        return _ContinuousBernoulli(logits=params.squeeze(-len(self.data_shape) - 1))

    def _check_support(self, x: Tensor) -> None:
        self._reject(x, (x < 0) | (x > 1), "data in [0, 1]", "scale the data to [0, 1] (e.g. x / 255)")


class _LocScale(Likelihood):
    """A location family with a fixed scale (``scale=0.1``) or a learned one per element (``scale="learned"``)."""

    family: type = dist.Normal

    def __init__(self, data_shape: Sequence[int], scale: float | str = 0.1, min_scale: float = 1e-3) -> None:
        super().__init__(data_shape)
        learned = isinstance(scale, str) and scale == "learned"
        if not learned and not (_is_number(scale) and 0 < scale < math.inf):
            raise ConfigError(f"scale must be a positive finite number or 'learned', got {scale!r}")
        if not (_is_number(min_scale) and 0 <= min_scale < math.inf):
            raise ConfigError(f"min_scale must be a finite number ≥ 0, got {min_scale!r}")
        self.min_scale = float(min_scale)
        if learned:
            # Start at 0.1 (grey-level data in [0, 1]); min_scale keeps a constant pixel from collapsing the scale.
            self.log_scale = nn.Parameter(torch.full(self.data_shape, math.log(0.1)))
        else:
            self.register_buffer("fixed_scale", torch.tensor(float(scale)))

    def scale(self) -> Tensor:
        """The scale: a scalar (fixed) or ``data_shape`` (learned)."""
        if hasattr(self, "log_scale"):
            return self.min_scale + self.log_scale.exp()
        return self.fixed_scale

    def element(self, params: Tensor) -> dist.Distribution:
        return self.family(params.squeeze(-len(self.data_shape) - 1), self.scale(), validate_args=False)


@LIKELIHOODS.register("normal")
class Normal(_LocScale):
    """Gaussian: p(x | m) = exp(-(x - m)^2 / (2 s^2)) / (s sqrt(2 pi)).

    Parameters: the mean ``m`` per element; ``scale`` is fixed (a float) or ``"learned"`` (one ``s`` per element,
    ``s = min_scale + exp(log_scale)``). Support: the reals. Kingma & Welling 2014.
    """

    family = dist.Normal


@LIKELIHOODS.register("laplace")
class Laplace(_LocScale):
    """Laplace: p(x | m) = exp(-|x - m| / b) / (2 b), heavier-tailed than the Gaussian (an L1 reconstruction loss).

    Parameters: the location ``m`` per element; ``scale`` ``b`` fixed or ``"learned"`` as for :class:`Normal`.
    Support: the reals.
    """

    family = dist.Laplace


@LIKELIHOODS.register("beta")
class Beta(Likelihood):
    """Beta on (0, 1): p(x | a, b) = x^(a - 1) (1 - x)^(b - 1) / B(a, b).

    Parameters: two per element, ``a = softplus(p0) + 1e-4``, ``b = softplus(p1) + 1e-4``. Mean a / (a + b).
    Support: the open interval (0, 1). See Loaiza-Ganem & Cunningham 2019 for its use in VAEs.
    """

    num_params = 2

    def element(self, params: Tensor) -> dist.Distribution:
        a, b = (F.softplus(p) + 1e-4 for p in self._split(params))
        return dist.Beta(a, b, validate_args=False)

    def _check_support(self, x: Tensor) -> None:
        self._reject(
            x,
            (x <= 0) | (x >= 1),
            "data strictly inside (0, 1)",
            "squeeze the data, e.g. x * (1 - 2e-3) + 1e-3, or use likelihood='continuous-bernoulli'",
        )


class _GridLikelihood(Likelihood):
    """Data in [0, 1] on the grid k / (levels - 1); category k = round(x (levels - 1))."""

    discrete = True

    def __init__(self, data_shape: Sequence[int], levels: int = 256) -> None:
        super().__init__(data_shape)
        if not (isinstance(levels, int) and not isinstance(levels, bool) and levels >= 2):
            raise ConfigError(f"levels must be an integer >= 2, got {levels!r}")
        self.levels = levels

    def _check_support(self, x: Tensor) -> None:
        n = self.levels - 1
        grid = f"data in [0, 1] on the grid k/{n} (levels={self.levels})"
        self._reject(x, (x < 0) | (x > 1), grid, "scale the data to [0, 1] (e.g. x / 255)")
        self._reject(
            x,
            (x - torch.round(x * n) / n).abs() > 1e-4,
            grid,
            "pass levels=... matching the data (digits has 17 grey levels, MNIST 256)",
        )

    def _levels_last(self, params: Tensor) -> Tensor:
        return params.movedim(-len(self.data_shape) - 1, -1)


class _GridCategorical(_Elementwise):
    support = constraints.unit_interval  # the grid k / (levels - 1) inside it
    _trailing = 1
    _static = ("level_dim",)

    def __init__(self, logits: Tensor, level_dim: int) -> None:
        super().__init__(logits=logits)
        self.level_dim = level_dim  # where the levels sit in the decoder output (counted from the end)

    def log_prob(self, value: Tensor) -> Tensor:
        n, dim = self.logits.shape[-1] - 1, self.level_dim
        k = torch.round(value * n).clamp(0, n).long()
        shape = torch.broadcast_shapes(k.shape, self.batch_shape)
        # log_softmax along the decoder's own (contiguous) level dim is about twice as fast on CPU as along the
        # strided last dim of the levels-last view, and faster than gather - logsumexp.
        log_p = torch.log_softmax(self.logits.movedim(-1, dim), dim)
        full = (*shape[: len(shape) + dim + 1], n + 1, *shape[len(shape) + dim + 1 :])
        return log_p.expand(full).gather(dim, k.expand(shape).unsqueeze(dim)).squeeze(dim)

    @property
    def mean(self) -> Tensor:
        n = self.logits.shape[-1] - 1
        grid = torch.arange(n + 1, dtype=self.logits.dtype, device=self.logits.device) / n
        return self.logits.softmax(-1) @ grid

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        with torch.no_grad():
            n = self.logits.shape[-1] - 1
            return _gumbel_argmax(self.logits, self._extended_shape(sample_shape)).to(self.logits.dtype) / n


@LIKELIHOODS.register("categorical")
class Categorical(_GridLikelihood):
    """Categorical over grey levels: p(x = k / (L - 1)) = softmax(l)_k, L = ``levels``.

    Parameters: ``levels`` logits per element (so ``num_params == levels``). Support: the grid k / (L - 1) in
    [0, 1]; mean sum_k k / (L - 1) softmax(l)_k. van den Oord et al. 2016 (PixelRNN's 256-way softmax).
    """

    def __init__(self, data_shape: Sequence[int], levels: int = 256) -> None:
        super().__init__(data_shape, levels)
        self.num_params = levels

    def element(self, params: Tensor) -> dist.Distribution:
        return _GridCategorical(self._levels_last(params), -len(self.data_shape) - 1)


class _DiscretizedLogisticMixture(_Elementwise):
    support = constraints.unit_interval  # the grid k / (levels - 1) inside it
    _trailing = 1
    _static = ("levels",)

    def __init__(self, logits: Tensor, loc: Tensor, log_scale: Tensor, levels: int) -> None:
        super().__init__(logits=logits, loc=loc, log_scale=log_scale)
        self.levels = levels

    def log_prob(self, value: Tensor) -> Tensor:
        n = self.levels - 1
        k = torch.round(value * n).clamp(0, n)
        if self.loc.shape[-1] == 1:  # one component: no mixture weights to normalize, half the work (measured)
            return self._component_log_prob(k, self.loc.squeeze(-1), self.log_scale.squeeze(-1))
        log_p = self._component_log_prob(k.unsqueeze(-1), self.loc, self.log_scale)
        return torch.logsumexp(self.logits.log_softmax(-1) + log_p, -1)

    def _component_log_prob(self, k: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
        """log P(bin k) under one logistic per element (k: level indices as floats)."""
        n = self.levels - 1
        inv_s = torch.exp(-log_scale)
        centre = k / n - loc
        first, last = k == 0, k == n
        # sigmoid(u) - sigmoid(w) = sigmoid(u) sigmoid(-w) (1 - e^(w - u)): a sum of logs that is stable however
        # far the bin lies in a tail or however narrow it is, so no fallback to pdf * width is needed. The edge
        # bins reach to -inf / +inf, which drops the factors that would involve the missing boundary.
        log_cdf_upper = torch.where(last, 0.0, -F.softplus(-(centre + 0.5 / n) * inv_s))
        log_sf_lower = torch.where(first, 0.0, -F.softplus((centre - 0.5 / n) * inv_s))
        log_width = torch.where(first | last, 0.0, torch.log(-torch.expm1(-inv_s / n)))
        return log_cdf_upper + log_sf_lower + log_width

    @property
    def mean(self) -> Tensor:
        # E[k] = sum_{j=1}^{L-1} P(k >= j) = sum_j sigmoid((m - t_j) / s) at the bin boundaries t_j; chunks of
        # boundaries bound the memory to (*batch, K, 64).
        n = self.levels - 1
        t = (torch.arange(1, n + 1, dtype=self.loc.dtype, device=self.loc.device) - 0.5) / n
        loc, inv_s = self.loc.unsqueeze(-1), torch.exp(-self.log_scale).unsqueeze(-1)
        expected_k = sum(torch.sigmoid((loc - chunk) * inv_s).sum(-1) for chunk in t.split(64))
        return (self.logits.softmax(-1) * expected_k).sum(-1) / n

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            c = _gumbel_argmax(self.logits, shape).unsqueeze(-1)
            loc = self.loc.expand(shape + self.loc.shape[-1:]).gather(-1, c).squeeze(-1)
            log_s = self.log_scale.expand(shape + self.loc.shape[-1:]).gather(-1, c).squeeze(-1)
            u = torch.rand(shape, dtype=loc.dtype, device=loc.device).clamp(1e-6, 1 - 1e-6)
            x = (loc + log_s.exp() * (torch.log(u) - torch.log1p(-u))).clamp(0.0, 1.0)
            return torch.round(x * (self.levels - 1)) / (self.levels - 1)


@LIKELIHOODS.register("discretized-logistic")
class DiscretizedLogistic(_GridLikelihood):
    """Mixture of ``components`` logistics discretized to ``levels`` bins on [0, 1] (PixelCNN++).

    p(x = c_k) = sum_i pi_i [F((c_k + h - m_i) / s_i) - F((c_k - h - m_i) / s_i)], F = sigmoid, bin centres
    c_k = k / (L - 1), half-width h = 1 / (2 (L - 1)), the first and last bins extended to -inf and +inf.
    Parameters: ``3 * components`` per element: mixture logits, means ``m_i`` and log-scales (clamped below at
    log(h) - 3, where one bin already holds all but ~1e-9 of a component's mass). Support: the grid c_k.
    Salimans et al. 2017.
    """

    def __init__(self, data_shape: Sequence[int], components: int = 1, levels: int = 256) -> None:
        super().__init__(data_shape, levels)
        if not (isinstance(components, int) and not isinstance(components, bool) and components >= 1):
            raise ConfigError(f"components must be a positive integer, got {components!r}")
        self.components = components
        self.num_params = 3 * components
        self.min_log_scale = math.log(0.5 / (levels - 1)) - 3.0

    def element(self, params: Tensor) -> dist.Distribution:
        logits, loc, log_scale = self._levels_last(params).split(self.components, -1)
        return _DiscretizedLogisticMixture(logits, loc, log_scale.clamp_min(self.min_log_scale), self.levels)


class _CountLikelihood(Likelihood):
    """Count data: nonnegative integers."""

    discrete = True

    def _check_support(self, x: Tensor) -> None:
        fix = "pass raw counts (not normalized or log-transformed values)"
        self._reject(x, x < 0, "nonnegative integer counts", fix)
        self._reject(x, x != torch.round(x), "nonnegative integer counts", fix)

    def _mean_and_size(self, log_mean: Tensor, log_size: Tensor) -> tuple[Tensor, Tensor]:
        """NB (total_count r, logits log mu - log r) giving mean mu. r is clamped to [e^-10, e^10]: beyond,
        lgamma(x + r) - lgamma(r) loses float32 precision, and the NB is a Poisson for practical purposes."""
        log_size = log_size.clamp(-10.0, 10.0)
        return log_size.exp(), log_mean - log_size


@LIKELIHOODS.register("poisson")
class Poisson(_CountLikelihood):
    """Poisson: p(x | r) = r^x e^-r / x!.

    Parameters: one per element, rate ``r = softplus(p) + 1e-6`` (softplus rather than exp: no overflow, and
    the floor keeps log p finite). Support: {0, 1, 2, ...}.
    """

    def element(self, params: Tensor) -> dist.Distribution:
        rate = F.softplus(params.squeeze(-len(self.data_shape) - 1)) + 1e-6
        return dist.Poisson(rate, validate_args=False)


@LIKELIHOODS.register("negative-binomial")
class NegativeBinomial(_CountLikelihood):
    """Negative binomial with mean mu and inverse dispersion r (variance mu + mu^2 / r):

    p(x | mu, r) = Gamma(x + r) / (Gamma(r) x!) (r / (r + mu))^r (mu / (r + mu))^x.

    Parameters: two per element, ``log mu`` and ``log r``. Support: {0, 1, 2, ...}. Lopez et al. 2018 (scVI).
    """

    num_params = 2

    def element(self, params: Tensor) -> dist.Distribution:
        total_count, logits = self._mean_and_size(*self._split(params))
        return dist.NegativeBinomial(total_count=total_count, logits=logits, validate_args=False)


class _ZINB(dist.ZeroInflatedNegativeBinomial):
    """Pyro's ZINB, except that sampling and the mean never cache ``gate``: a cached gate would switch log_prob to
    its less stable probability branch and make ``expand`` refuse the instance (pyro 1.9)."""

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            zero = torch.rand(shape, device=self.gate_logits.device) < torch.sigmoid(self.gate_logits)
            return torch.where(zero, 0.0, self.base_dist.expand(shape).sample())

    @property
    def mean(self) -> Tensor:
        return torch.sigmoid(-self.gate_logits) * self.base_dist.mean


@LIKELIHOODS.register("zinb")
class ZeroInflatedNegativeBinomial(_CountLikelihood):
    """Zero-inflated negative binomial: p(x) = g [x = 0] + (1 - g) NB(x | mu, r), g = sigmoid(gate logit).

    Parameters: three per element, the gate logit, ``log mu`` and ``log r`` (NB as in :class:`NegativeBinomial`).
    Mean (1 - g) mu. Support: {0, 1, 2, ...}. Lopez et al. 2018 (scVI).
    """

    num_params = 3

    def element(self, params: Tensor) -> dist.Distribution:
        gate_logits, log_mean, log_size = self._split(params)
        total_count, logits = self._mean_and_size(log_mean, log_size)
        return _ZINB(total_count, logits=logits, gate_logits=gate_logits, validate_args=False)
