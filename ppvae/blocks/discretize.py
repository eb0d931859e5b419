"""Score continuous likelihoods on [0, 1] as probabilities of the grey levels the data actually take.

A density p(x | z) on [0, 1] and a probability mass over L grey levels are not comparable: log p(x) of a density
grows without bound as its scale shrinks, so its "bits/dim" can be negative. Grey-level data are x = k / (L - 1),
k = 0 .. L - 1 (``levels=256`` for 8-bit images), and a density defines the mass of each level by integrating over
its bin (Theis, van den Oord & Bethge 2016, "A note on the evaluation of generative models")::

    P(x = c_k) = F(t_{k+1}) - F(t_k),   c_k = k / (L - 1),   t_k = (k - 1/2) / (L - 1),

the same bins as ``categorical`` and ``discretized-logistic`` (:mod:`ppvae.blocks.likelihoods`; Salimans et al. 2017):
centred on the grid points with half-width 1 / (2 (L - 1)), the first and last bins extended to the ends of the
support (t_0 = -inf and t_L = +inf for ``normal`` and ``laplace``; 0 and 1 for ``beta`` and
``continuous-bernoulli``), so the L masses sum to one and bits/dim rank with the 256-level likelihoods.

Every mass is exact up to rounding (``method = "cdf"``; the tests check it against mpmath and scipy), computed
in float64 and in log space from one tail per boundary, log F(t) below the median and log S(t) = log(1 - F(t))
above it (for the beta: below and above (a + 1) / (a + b + 2), where its continued fraction switches sides):

- a bin below the median has log P = log F(u) + log(1 - F(l) / F(u)); one above it log S(l) + log(1 - S(u) / S(l));
  one holding the median log(1 - F(l) - S(u)). No two numbers near 1 are ever subtracted, so a bin far in a tail
  keeps its relative precision (log P of order -10^6 stays finite where F(u) - F(l) underflows to 0 in float32);
- a bin so narrow against the distribution that the ratio above is within 1e-7 of 1 (a scale of ~10^7 bin widths)
  falls back to 3-point Gauss-Legendre quadrature of the density over the bin, exact to O(width^6).

The tails: ``normal`` ``log_ndtr(-|t|)`` of the standardized boundary t; ``laplace`` log(1/2) - |t|;
``continuous-bernoulli`` (Loaiza-Ganem & Cunningham 2019) F(x) = (e^(l x) - 1) / (e^l - 1) and S(x; l) =
F(1 - x; -l); ``beta`` the regularized incomplete beta I_x(a, b) by its continued fraction (modified Lentz method,
Press et al., Numerical Recipes, 3rd ed., 6.4) on the side where it converges fast, and I_x(a, b) = 1 - I_(1-x)(b, a)
on the other. The beta costs most: ~2 us per element on one CPU core, against 0.1-0.4 us for the others and
~0.05 us for the continuous log-density (it only scores; training keeps the continuous head).

Use :func:`scoring_view` to evaluate a trained :class:`ppvae.VAE` this way without touching it::

    ev = ppvae.evaluate(scoring_view(vae), x_test)   # ev.bits_per_dim: comparable with a 256-way categorical
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor, nn

from ppvae.blocks.likelihoods import Beta, ContinuousBernoulli, Laplace, Likelihood, Normal, _GridLikelihood
from ppvae.errors import ConfigError

__all__ = ["Discretized", "discretized", "scoring_view"]

_LOG_HALF = -math.log(2.0)
# Below this relative bin mass the log-ratio of two CDFs carries too few correct digits (float64 rounding of
# log F, and ~1e-13 for the incomplete beta's continued fraction): quadrature of the density is then exact enough.
_TINY_BIN = 1e-7
# Elements per slice of log_prob: float64 temporaries of a whole evaluation chunk would take ~1 GiB at once.
_SLICE = 2**20
# Incomplete beta continued fraction: convergence test, cap on iterations (it needs O(sqrt(max(a, b))) of them),
# and how often converged elements leave the working set (most converge within 10 iterations).
_CF_EPS = 1e-15
_CF_MAX_ITER = 10_000
_CF_COMPACT_EVERY = 4
_FPMIN = 1e-300
# 3-point Gauss-Legendre nodes and weights on [-1, 1].
_GL_NODES = (-math.sqrt(0.6), 0.0, math.sqrt(0.6))
_GL_LOG_WEIGHTS = (math.log(5 / 9), math.log(8 / 9), math.log(5 / 9))


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 - e^d) for d <= 0, accurate on both sides of -log 2 (Maechler 2012)."""
    near = d > _LOG_HALF
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, d, -1.0))), torch.log1p(-torch.exp(d)))


def _log_abs_expm1(a: Tensor) -> Tensor:
    """log |e^a - 1| without overflow for large a; a must be nonzero."""
    pos = a > 0
    a_pos, a_neg = torch.where(pos, a, 1.0), torch.where(pos, -1.0, a)
    return torch.where(pos, a_pos + torch.log(-torch.expm1(-a_pos)), torch.log(-torch.expm1(a_neg)))


# ------------------------------------------------------------------------------------------------ families
# Each family maps float64 parameters (broadcast against x) and boundaries x to (log tail, upper): log F(x) where
# ``upper`` is False and log S(x) where it is True, ``upper`` switching once, from False to True, as x grows
# (at the median, or where the incomplete beta's continued fraction changes sides). One tail per boundary is all
# the bin mass needs, and it is the one computed without cancellation. ``log_pdf`` serves the quadrature fallback.


def _normal_tail(params: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
    loc, scale = params
    t = (x - loc) / scale
    return torch.special.log_ndtr(-t.abs()), t > 0


def _normal_pdf(params: tuple[Tensor, ...], x: Tensor) -> Tensor:
    loc, scale = params
    return -0.5 * ((x - loc) / scale).square() - scale.log() - 0.5 * math.log(2 * math.pi)


def _laplace_tail(params: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
    loc, scale = params
    t = (x - loc) / scale
    return _LOG_HALF - t.abs(), t > 0  # F(t) = e^t / 2 below the location, S(t) = e^-t / 2 above


def _laplace_pdf(params: tuple[Tensor, ...], x: Tensor) -> Tensor:
    loc, scale = params
    return -(x - loc).abs() / scale - torch.log(2 * scale)


def _cb_logits(params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    # The closed forms below are exact for any l != 0 (expm1 keeps l x accurate for tiny l) but 0/0 at l = 0: there,
    # and wherever |l| < 1e-8, first-order series in l take over (error O(l^2), and the gradient in l is kept).
    (logits,) = params
    flat = logits.abs() < 1e-8
    return torch.where(flat, 1.0, logits), flat


def _cb_tail(params: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
    safe, flat = _cb_logits(params)
    (logits,) = params
    # Median: F(m) = 1/2 at m = (softplus(l) - log 2) / l. S(x; l) = F(1 - x; -l), so one formula serves both tails:
    # F(x) = (e^(l x) - 1) / (e^l - 1), whose factors share the sign of l, so their log-magnitudes give log F.
    median = torch.where(flat, 0.5, (torch.nn.functional.softplus(safe) + _LOG_HALF) / safe)
    upper = x > median
    y, sign = torch.where(upper, 1 - x, x), torch.where(upper, -1.0, 1.0)
    series = torch.log(y) + sign * logits * (y - 1) / 2  # log F(y; l) = log y + l (y - 1) / 2 + O(l^2)
    exact = _log_abs_expm1(sign * safe * y) - _log_abs_expm1(sign * safe)
    return torch.where(flat, series, exact), upper


def _cb_pdf(params: tuple[Tensor, ...], x: Tensor) -> Tensor:
    safe, flat = _cb_logits(params)
    (logits,) = params
    log_pdf = safe * x + safe.abs().log() - _log_abs_expm1(safe)
    return torch.where(flat, logits * (x - 0.5), log_pdf)


def _lbeta(a: Tensor, b: Tensor) -> Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def _nonzero(t: Tensor) -> Tensor:
    return torch.where(t.abs() < _FPMIN, _FPMIN, t)


def _beta_cf(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """The continued fraction of I_x(a, b) by the modified Lentz method (Numerical Recipes 6.4, ``betacf``), on
    1-D tensors. Converged elements leave the working set every few iterations, so the few slow ones (x near
    (a + 1) / (a + b + 2) with large a, b) do not cost the many fast ones; out-of-place indexing keeps autograd."""
    n = x.numel()
    idx = torch.arange(n, device=x.device)
    ab = a + b
    c = torch.ones_like(x)
    d = _nonzero(1 - ab * x / (a + 1)).reciprocal()
    h = d
    done_idx: list[Tensor] = []
    done_val: list[Tensor] = []
    for m in range(1, _CF_MAX_ITER + 1):
        a2 = a + 2 * m
        for aa in (m * (b - m) * x / ((a2 - 1) * a2), (a + m) * (ab + m) * x / (a2 * (a2 + 1)).neg_()):  # even, odd
            d = _nonzero(torch.addcmul(torch.ones_like(d), aa, d)).reciprocal_()
            c = _nonzero(torch.div(aa, c).add_(1))
            delta = d * c
            h = h * delta
        if m % _CF_COMPACT_EVERY and m < _CF_MAX_ITER:
            continue
        # At the cap the remaining elements keep their latest convergent (only for a, b beyond ~10^7).
        conv = (delta - 1).abs() < _CF_EPS if m < _CF_MAX_ITER else torch.ones_like(x, dtype=torch.bool)
        if bool(conv.any()):
            done_idx.append(idx[conv])
            done_val.append(h[conv])
            keep = ~conv
            idx, a, b, ab, x, c, d, h = (t[keep] for t in (idx, a, b, ab, x, c, d, h))
        if idx.numel() == 0:
            break
    out = torch.zeros(n, dtype=x.dtype, device=x.device)
    return out.index_put((torch.cat(done_idx),), torch.cat(done_val)) if done_idx else out


def _beta_tail(params: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
    a, b = (p.expand(x.shape) for p in params)
    # The tail the continued fraction converges on fast: I_x(a, b) below (a + 1) / (a + b + 2), above it
    # S = 1 - I_x(a, b) = I_(1-x)(b, a). log I = a log x + b log(1 - x) - log B(a, b) - log a + log cf.
    upper = x > (a + 1) / (a + b + 2)
    p, q, y = torch.where(upper, b, a), torch.where(upper, a, b), torch.where(upper, 1 - x, x)
    cf = _beta_cf(p.reshape(-1), q.reshape(-1), y.reshape(-1)).reshape(x.shape)
    return p * torch.log(y) + q * torch.log1p(-y) - _lbeta(p, q) - torch.log(p) + torch.log(cf), upper


def _beta_pdf(params: tuple[Tensor, ...], x: Tensor) -> Tensor:
    a, b = params
    return (a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x) - _lbeta(a, b)


@dataclass(frozen=True)
class _Family:
    params: Callable[[Any], tuple[Tensor, ...]]  # the wrapped per-element distribution -> its parameters
    tail: Callable[[tuple[Tensor, ...], Tensor], tuple[Tensor, Tensor]]
    log_pdf: Callable[[tuple[Tensor, ...], Tensor], Tensor]


_FAMILIES: dict[str, _Family] = {
    "normal": _Family(lambda d: (d.loc, d.scale), _normal_tail, _normal_pdf),
    "laplace": _Family(lambda d: (d.loc, d.scale), _laplace_tail, _laplace_pdf),
    "beta": _Family(lambda d: (d.concentration1, d.concentration0), _beta_tail, _beta_pdf),
    "continuous-bernoulli": _Family(lambda d: (d.logits,), _cb_tail, _cb_pdf),
}
# Checked in order; a subclass of a supported head keeps its parent's element distribution.
_SUPPORTED: tuple[tuple[type, str], ...] = (
    (Normal, "normal"),
    (Laplace, "laplace"),
    (Beta, "beta"),
    (ContinuousBernoulli, "continuous-bernoulli"),
)


def _log_bin_mass(lt_l: Tensor, up_l: Tensor, lt_u: Tensor, up_u: Tensor) -> tuple[Tensor, Tensor]:
    """log(F(u) - F(l)) from one log-tail per boundary (see the families), and where it is too imprecise."""
    # Both lower tails: F(u) (1 - F(l) / F(u)); both upper: S(l) (1 - S(u) / S(l)); the middle of the
    # distribution between them: 1 - (F(l) + S(u)). Edge bins enter as log F(l) = -inf or log S(u) = -inf.
    mid = up_u & ~up_l
    d = torch.where(mid, torch.logaddexp(lt_l, lt_u), torch.where(up_l, lt_u - lt_l, lt_l - lt_u))
    base = torch.where(mid, 0.0, torch.where(up_l, lt_l, lt_u))
    tiny = d > -_TINY_BIN
    # tiny bins get -1 here (replaced later), so log1mexp never sees 0 and its gradient stays finite.
    return base + _log1mexp(torch.where(tiny, -1.0, d)), tiny


class _DiscretizedElement(TorchDistribution):
    """Per-element P(x = c_k) of a continuous ``base`` distribution over ``levels`` bins (see the module)."""

    arg_constraints: ClassVar[dict] = {}
    support = constraints.unit_interval  # the grid k / (levels - 1) inside it

    def __init__(self, base: dist.Distribution, family: str, levels: int) -> None:
        self.base, self.family, self.levels = base, family, levels
        super().__init__(base.batch_shape, validate_args=False)

    def expand(self, batch_shape: Sequence[int], _instance: Any = None) -> _DiscretizedElement:
        return type(self)(self.base.expand(torch.Size(batch_shape)), self.family, self.levels)

    def log_prob(self, value: Tensor) -> Tensor:
        fam = _FAMILIES[self.family]
        params = fam.params(self.base)
        dtype = torch.promote_types(params[0].dtype, value.dtype) if value.is_floating_point() else params[0].dtype
        n = self.levels - 1
        k = torch.round(value * n).clamp(0, n)
        shape = torch.broadcast_shapes(k.shape, self.batch_shape)
        if math.prod(shape) == 0:
            return torch.zeros(shape, dtype=dtype, device=k.device)
        flat = [t.to(torch.float64).expand(shape).reshape(-1) for t in (k, *params)]
        pieces = [self._log_mass(s[0], tuple(s[1:]), fam) for s in zip(*(t.split(_SLICE) for t in flat), strict=True)]
        return torch.cat(pieces).reshape(shape).to(dtype)

    def _log_mass(self, k: Tensor, params: tuple[Tensor, ...], fam: _Family) -> Tensor:
        """log P(bin k), float64, for 1-D level indices ``k`` and parameters of the same length."""
        n = self.levels - 1
        first, last = k == 0, k == n
        # The edge bins reach the end of the support: their missing boundary is replaced by an interior point
        # (so no branch sees an infinite or out-of-support argument) and its log F / log S set to the limits.
        lo = torch.where(first, 0.25 / n, (k - 0.5) / n)
        hi = torch.where(last, 1 - 0.25 / n, (k + 0.5) / n)
        log_tail, upper = fam.tail(tuple(p.unsqueeze(0) for p in params), torch.stack((lo, hi)))
        lt_l = torch.where(first, -math.inf, log_tail[0])  # F(lower end) = 0
        up_l = upper[0] & ~first
        lt_u = torch.where(last, -math.inf, log_tail[1])  # S(upper end) = 0
        up_u = upper[1] | last
        log_mass, tiny = _log_bin_mass(lt_l, up_l, lt_u, up_u)
        tiny = tiny & ~first & ~last
        if bool(tiny.any()):  # rare (a scale ~10^7 bin widths): quadrature of the density over those bins only
            h = 0.5 / n
            sub = tuple(p[tiny] for p in params)
            nodes = torch.stack([k[tiny] / n + h * g for g in _GL_NODES])
            weights = torch.tensor(_GL_LOG_WEIGHTS, dtype=k.dtype, device=k.device).unsqueeze(-1)
            quad = torch.logsumexp(fam.log_pdf(tuple(p.unsqueeze(0) for p in sub), nodes) + weights, 0) + math.log(h)
            log_mass = log_mass.index_put((tiny,), quad)
        return log_mass

    @property
    def mean(self) -> Tensor:
        return self.base.mean  # the continuous mean (what reconstructions show), not the discretized one

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        with torch.no_grad():
            n = self.levels - 1
            x = self.base.sample(torch.Size(sample_shape))
            return (torch.round(x * n) / n).clamp(0.0, 1.0)


class Discretized(_GridLikelihood):
    """A continuous likelihood on [0, 1] scored as probabilities of ``levels`` grey levels.

    P(x = c_k | z) = F(t_{k+1} | z) - F(t_k | z) for the wrapped head's per-element CDF F, bins centred on
    c_k = k / (levels - 1) with the first and last reaching the ends of the support (see
    :mod:`ppvae.blocks.discretize`).
    Wraps ``normal``, ``laplace``, ``beta`` and ``continuous-bernoulli``; every one exactly (``method = "cdf"``).

    Args:
        likelihood: the continuous head; it stays a submodule, so its parameters (a learned scale) are shared.
        levels: grey levels of the data (256 for 8-bit images).

    Same ``num_params`` and ``data_shape`` as ``likelihood``; data must lie on the grid k / (levels - 1) (0 and 1
    included, also for ``beta``). ``mean`` is the wrapped head's; ``sample`` rounds its draws to the grid.
    """

    method: str = "cdf"

    def __init__(self, likelihood: Likelihood, levels: int = 256) -> None:
        family = _family_of(likelihood)
        super().__init__(likelihood.data_shape, levels)
        self.base = likelihood
        self.family = family
        self.num_params = likelihood.num_params

    def element(self, params: Tensor) -> dist.Distribution:
        return _DiscretizedElement(self.base.element(params), self.family, self.levels)

    def _name(self) -> str:
        return f"discretized {self.base._name()}"


def _family_of(likelihood: Any) -> str:
    for cls, family in _SUPPORTED:
        if isinstance(likelihood, cls):
            return family
    names = ", ".join(name for _, name in _SUPPORTED)
    raise ConfigError(
        f"cannot discretize likelihood {type(likelihood).__name__!r}: supported continuous likelihoods on [0, 1] are "
        f"{names} (discrete ones are scored as they are); score data on a grid with likelihood='categorical' or "
        "'discretized-logistic' instead"
    )


def discretized(likelihood: Any, levels: int = 256) -> Likelihood:
    """``likelihood`` itself if it is already a probability mass (``discrete``), else it wrapped in
    :class:`Discretized`; :class:`~ppvae.errors.ConfigError` for a continuous head that cannot be wrapped."""
    if getattr(likelihood, "discrete", False):
        return likelihood
    return Discretized(likelihood, levels)


def scoring_view(vae: Any, levels: int = 256) -> Any:
    """The same VAE (same class, same encoder, decoder, prior and guide, parameters shared, not copied) whose
    likelihood is ``discretized(vae.likelihood, levels)``, for :func:`ppvae.evaluate` and :func:`ppvae.diagnose`
    in bits/dim. ``vae`` is left unchanged; a VAE whose likelihood is already discrete is returned as it is.
    """
    likelihood = getattr(vae, "likelihood", None)
    if not isinstance(vae, nn.Module) or not isinstance(likelihood, nn.Module):
        raise ConfigError(f"scoring_view needs a ppvae.VAE (a module with a likelihood), got {type(vae).__name__}")
    scored = discretized(likelihood, levels)
    if scored is likelihood:
        return vae
    # A shallow copy keeps the class (so evaluate takes the VAE fast path) and every submodule; nn.Module keeps
    # submodules in its own _modules dict, which the copy would share, so it gets a dict of its own first.
    view = copy.copy(vae)
    view._modules = copy.copy(vae._modules)
    view.likelihood = scored
    if isinstance(getattr(vae, "pyro_name", None), str):  # under Pyro's global store, never the original's entries
        view.pyro_name = f"{vae.pyro_name}-discretized"
    return view
