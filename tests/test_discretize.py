"""Tests for ppvae.blocks.discretize: bin masses against scipy and mpmath, normalization, far tails, gradients, the
``discretized`` dispatch, and ``scoring_view`` through ``ppvae.evaluate`` / ``ppvae.diagnose``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import ppvae
from ppvae.blocks.discretize import Discretized, discretized, scoring_view
from ppvae.blocks.likelihoods import LIKELIHOODS, Likelihood
from ppvae.errors import ConfigError, DataError
from ppvae.infer.pair import is_builtin_vae

LEVELS = 256
N = LEVELS - 1
GRID64 = torch.arange(LEVELS, dtype=torch.float64) / N

# (name, raw decoder output per element, likelihood kwargs): ordinary settings and extreme ones.
CASES = [
    ("normal", [0.5], {}),
    ("normal", [100 / 255], {"scale": 1e-3}),  # tiny scale on a grid point: one bin holds ~all the mass
    ("normal", [1.7], {"scale": 1e-2}),  # mean outside [0, 1]
    ("normal", [-3.0], {"scale": 1e-3}),
    ("normal", [0.3], {"scale": 1e7}),  # bins ~10^-10 of the scale: quadrature fallback
    ("laplace", [0.5], {}),
    ("laplace", [1.7], {"scale": 1e-2}),
    ("laplace", [0.2], {"scale": 1e-4}),
    ("laplace", [0.3], {"scale": 1e7}),
    ("beta", [0.0, 0.0], {}),  # a = b = 0.69
    ("beta", [-9.0, -9.0], {}),  # a = b = 2.2e-4: mass piled at 0 and 1
    ("beta", [50.0, 5.0], {}),
    ("beta", [8.0, 400.0], {}),  # a = 8, b = 400: far upper tail
    ("beta", [3000.0, 3000.0], {}),  # sharper than a bin
    ("continuous-bernoulli", [0.0], {}),  # uniform
    ("continuous-bernoulli", [1e-9], {}),
    ("continuous-bernoulli", [-0.05], {}),
    ("continuous-bernoulli", [30.0], {}),
    ("continuous-bernoulli", [-1000.0], {}),
]
IDS = [f"{name}-{raw}-{kw}" for name, raw, kw in CASES]


def build(name: str, data_shape=(1,), **kwargs) -> Likelihood:
    return LIKELIHOODS.build({"name": name, "kwargs": kwargs}, data_shape=data_shape)


def log_masses(name: str, raw: list[float], kwargs: dict, dtype=torch.float32) -> tuple[torch.Tensor, Likelihood]:
    """log P(x = k / 255) for k = 0 .. 255 under one element with decoder output ``raw``."""
    lik = build(name, **kwargs).to(dtype)
    params = torch.tensor(raw, dtype=dtype).reshape(len(raw), 1)
    d = Discretized(lik)(params)  # batch (), event (1,)
    return d.log_prob(GRID64.to(dtype).reshape(LEVELS, 1)), lik


def element_params(lik: Likelihood, raw: list[float]) -> list[float]:
    """The wrapped distribution's own parameters (loc, scale / a, b / logit) as floats."""
    d = lik.element(torch.tensor(raw, dtype=torch.float64).reshape(len(raw), 1))
    if isinstance(d, (torch.distributions.Normal, torch.distributions.Laplace)):
        return [d.loc.item(), float(d.scale)]
    if isinstance(d, torch.distributions.Beta):
        return [d.concentration1.item(), d.concentration0.item()]
    return [d.logits.item()]


def reference_masses(cdf, sf, lo_end: float, hi_end: float) -> np.ndarray:
    """F(u) - F(l) on the 256 bins in float64, from the tail on the side of the bin (no 1 - 1 cancellation)."""
    t = (np.arange(LEVELS + 1) - 0.5) / N
    t[0], t[-1] = lo_end, hi_end
    lo, hi = t[:-1], t[1:]
    cdf_hi = cdf(hi)
    return np.where(cdf_hi < 0.5, cdf_hi - cdf(lo), sf(lo) - sf(hi))


def scipy_masses(name: str, params: list[float]) -> np.ndarray:
    if name in ("normal", "laplace"):
        rv = (stats.norm if name == "normal" else stats.laplace)(params[0], params[1])
        masses = reference_masses(rv.cdf, rv.sf, -np.inf, np.inf)
        if params[1] > 1e3:  # CDF differences cancel for bins ~1e-10 of the scale; pdf x width is exact to 1e-20
            masses[1:-1] = rv.pdf(np.arange(1, N) / N) / N
        return masses
    if name == "beta":
        rv = stats.beta(*params)
        return reference_masses(rv.cdf, rv.sf, 0.0, 1.0)
    (lam,) = params  # continuous Bernoulli, not in scipy: F = (e^(l x) - 1) / (e^l - 1), rearranged not to overflow
    if lam == 0.0:
        return reference_masses(lambda x: x, lambda x: 1 - x, 0.0, 1.0)

    def log_expm1(y):  # log(e^y - 1), y >= 0
        with np.errstate(divide="ignore"):
            return y + np.log(-np.expm1(-y))

    if lam > 0:
        cdf = lambda x: np.exp(-lam + log_expm1(lam * x) - np.log(-np.expm1(-lam)))  # noqa: E731
        sf = lambda x: np.expm1(-lam * (1 - x)) / np.expm1(-lam)  # noqa: E731
    else:
        cdf = lambda x: np.expm1(lam * x) / np.expm1(lam)  # noqa: E731
        sf = lambda x: np.exp(lam + log_expm1(lam * (x - 1)) - np.log(-np.expm1(lam)))  # noqa: E731
    return reference_masses(cdf, sf, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ bin masses
@pytest.mark.parametrize(("name", "raw", "kwargs"), CASES, ids=IDS)
def test_masses_sum_to_one_and_are_finite(name, raw, kwargs):
    lp, _ = log_masses(name, raw, kwargs)  # float32 decoder output: the path evaluate takes
    assert lp.dtype == torch.float32
    assert torch.isfinite(lp).all(), lp[~torch.isfinite(lp)]  # no -inf even where the mass underflows float64
    assert (lp <= 1e-6).all()
    assert abs(torch.logsumexp(lp.double(), 0).exp().item() - 1.0) < 1e-5


@pytest.mark.parametrize(("name", "raw", "kwargs"), CASES, ids=IDS)
def test_masses_match_scipy(name, raw, kwargs):
    lp, lik = log_masses(name, raw, kwargs, dtype=torch.float64)
    ref = scipy_masses(name, element_params(lik, raw))
    ok = ref > 1e-280  # scipy underflows beyond; the far tails are checked against mpmath below
    assert ok.sum() >= 1
    np.testing.assert_allclose(lp.exp().numpy()[ok], ref[ok], rtol=1e-8, atol=0)


FAR_TAILS = [  # (name, raw, kwargs, bins): bins whose mass is far below float64's range
    ("normal", [1.7], {"scale": 1e-2}, [0, 1, 128, 254]),
    ("normal", [-2.0], {"scale": 1e-3}, [1, 255]),
    ("laplace", [0.2], {"scale": 1e-4}, [0, 255]),
    ("beta", [8.0, 400.0], {}, [240, 255]),
    ("continuous-bernoulli", [-1000.0], {}, [200, 255]),
]


@pytest.mark.parametrize(("name", "raw", "kwargs", "bins"), FAR_TAILS, ids=[c[0] for c in FAR_TAILS])
def test_far_tail_log_masses_match_mpmath(name, raw, kwargs, bins):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    lp, lik = log_masses(name, raw, kwargs, dtype=torch.float64)
    params = [mpmath.mpf(p) for p in element_params(lik, raw)]
    if name == "normal":
        cdf, sf = (lambda x: mpmath.ncdf(x, params[0], params[1])), (lambda x: mpmath.ncdf(-x, -params[0], params[1]))
    elif name == "laplace":

        def cdf(x):
            t = (x - params[0]) / params[1]
            return mpmath.exp(t) / 2 if t < 0 else 1 - mpmath.exp(-t) / 2

        def sf(x):
            return cdf(2 * params[0] - x)
    elif name == "beta":
        a, b = params
        cdf, sf = (
            (lambda x: mpmath.betainc(a, b, 0, x, regularized=True)),
            (lambda x: mpmath.betainc(b, a, 0, 1 - x, regularized=True)),
        )
    else:
        (lam,) = params
        cdf, sf = (
            (lambda x: mpmath.expm1(lam * x) / mpmath.expm1(lam)),
            (lambda x: mpmath.expm1(-lam * (1 - x)) / mpmath.expm1(-lam)),
        )
    unbounded = name in ("normal", "laplace")
    for k in bins:
        lo = (-mpmath.inf if unbounded else mpmath.mpf(0)) if k == 0 else mpmath.mpf(2 * k - 1) / 510
        hi = (mpmath.inf if unbounded else mpmath.mpf(1)) if k == N else mpmath.mpf(2 * k + 1) / 510
        if hi == mpmath.inf:
            mass = sf(lo)
        elif lo == -mpmath.inf:
            mass = cdf(hi)
        else:
            mass = cdf(hi) - cdf(lo) if cdf(hi) < 0.5 else sf(lo) - sf(hi)
        expected = float(mpmath.log(mass))
        assert expected < -745  # beyond float64: exp(expected) underflows to 0
        assert lp[k].item() == pytest.approx(expected, rel=1e-10), k


@pytest.mark.parametrize("name", ["normal", "laplace", "beta", "continuous-bernoulli"])
def test_gradients_match_finite_differences(name):
    raws = {
        "normal": [[0.3], [1.4], [-0.2], [0.5]],
        "laplace": [[0.3], [1.4], [-0.2], [0.5]],
        "beta": [[0.5, 1.0], [3.0, -2.0], [-3.0, 0.0], [6.0, 6.0]],
        "continuous-bernoulli": [[0.0], [4.0], [-30.0], [1e-12]],
    }[name]
    lik = build(name, data_shape=(4,), scale="learned") if name in ("normal", "laplace") else build(name, (4,))
    lik = lik.double()
    params = torch.tensor(raws, dtype=torch.float64).T.contiguous().requires_grad_()  # (num_params, 4)
    x = torch.tensor([0.0, 3 / 255, 128 / 255, 1.0], dtype=torch.float64)
    dl = Discretized(lik)
    assert torch.autograd.gradcheck(lambda p: dl.element(p).log_prob(x), (params,))
    if name in ("normal", "laplace"):  # the learned scale is shared with the wrapped head, and trained through it
        dl(params).log_prob(x).backward()
        assert lik.log_scale.grad is not None and torch.isfinite(lik.log_scale.grad).all()


def test_gradients_finite_in_far_tails():
    for name, raw, kwargs, _ in FAR_TAILS:
        lik = build(name, **kwargs).double()
        params = torch.tensor(raw, dtype=torch.float64).reshape(len(raw), 1).requires_grad_()
        Discretized(lik)(params).log_prob(GRID64.reshape(LEVELS, 1)).sum().backward()
        assert torch.isfinite(params.grad).all(), name


# ------------------------------------------------------------------------------------------------ the head
def test_shapes_broadcasting_sampling_and_mean():
    torch.manual_seed(0)
    lik = build("beta", data_shape=(1, 3, 3))
    head = discretized(lik)
    assert isinstance(head, Discretized) and head.discrete and head.method == "cdf" and head.levels == LEVELS
    assert head.num_params == lik.num_params == 2 and head.data_shape == lik.data_shape
    params = torch.randn(5, 4, 2, 1, 3, 3)  # (particles, batch, num_params, *data_shape)
    x = torch.randint(0, LEVELS, (4, 1, 3, 3)).float() / N  # (batch, *data_shape): broadcasts against particles
    d = head(params)
    assert d.batch_shape == (5, 4) and d.event_shape == (1, 3, 3)
    lp = d.log_prob(x)
    assert lp.shape == (5, 4) and torch.isfinite(lp).all()
    assert torch.allclose(lp[3, 2], head(params[3, 2]).log_prob(x[2]))  # x[j] scored under params[:, j]
    assert torch.allclose(d.expand((2, 5, 4)).log_prob(x)[1], lp)
    s = d.sample((3,))
    assert s.shape == (3, 5, 4, 1, 3, 3)
    assert torch.equal(s, torch.round(s * N) / N) and s.min() >= 0 and s.max() <= 1
    head.check_data(s)  # samples lie on the grid
    assert torch.allclose(head.mean(params), lik.mean(params))


def test_check_data_wants_the_grid():
    head = discretized(build("beta", data_shape=(4,)))
    head.check_data(torch.tensor([0.0, 1 / 255, 254 / 255, 1.0]))  # 0 and 1 are fine once discretized
    with pytest.raises(DataError, match="grid"):
        head.check_data(torch.tensor([0.0, 0.5, 0.2, 1.0]))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        head.check_data(torch.tensor([0.0, 1.2, 0.2, 1.0]))
    seventeen = discretized(build("normal", data_shape=(1,)), levels=17)
    seventeen.check_data(torch.tensor([0.0, 3 / 16]))
    lp = seventeen(torch.full((1, 1), 0.3)).log_prob(torch.arange(17.0).reshape(17, 1) / 16)
    assert torch.logsumexp(lp.double(), 0).exp().item() == pytest.approx(1.0, abs=1e-5)


def test_discretized_passes_discrete_heads_through():
    for name in ("bernoulli", "categorical", "discretized-logistic", "poisson", "zinb"):
        lik = build(name, data_shape=(3,))
        assert discretized(lik) is lik
    head = discretized(build("normal", (3,)))
    assert discretized(head) is head


def test_discretized_refuses_unsupported_likelihoods():
    class StudentT(Likelihood):  # a continuous head on the reals that discretize knows nothing about
        def element(self, params):
            return torch.distributions.StudentT(3.0, params.squeeze(-2), 0.1)

    for bad in (StudentT((3,)), torch.nn.Linear(2, 2), None):
        with pytest.raises(ConfigError, match="normal, laplace, beta, continuous-bernoulli"):
            discretized(bad)
    with pytest.raises(ConfigError, match="levels"):
        discretized(build("normal", (3,)), levels=1)


# ------------------------------------------------------------------------------------------------ scoring_view
def constant_vae(scale: float = 0.1) -> ppvae.VAE:
    """A VAE whose decoder outputs 0.5 for every z: log p(x | z) is known exactly."""
    vae = ppvae.VAE((16,), 2, likelihood={"name": "normal", "kwargs": {"scale": scale}})
    with torch.no_grad():
        vae.decoder.net[-1].weight.zero_()
        vae.decoder.net[-1].bias.fill_(0.5)
    return vae


def test_scoring_view_evaluates_in_bits_per_dim_and_leaves_the_vae_alone():
    vae = constant_vae()
    x = torch.full((6, 16), 128 / 255)
    view = scoring_view(vae)
    assert type(view) is type(vae) and is_builtin_vae(view)  # evaluate's untraced fast path
    assert isinstance(view.likelihood, Discretized) and view.likelihood.base is vae.likelihood
    assert type(vae.likelihood).__name__ == "Normal" and "likelihood" in dict(vae.named_children())
    assert view.encoder is vae.encoder and view.decoder is vae.decoder and view.prior is vae.prior
    assert {id(p) for p in view.parameters()} == {id(p) for p in vae.parameters()}  # shared, not copied

    dense = ppvae.evaluate(vae, x, num_samples=16)
    scored = ppvae.evaluate(view, x, num_samples=16)
    assert not dense.discrete and dense.bits_per_dim is None
    assert (dense.log_px > 0).all()  # a density: positive log p(x) at a sharp mean
    assert scored.discrete and scored.reconstruction is not None  # fast path: reconstruction and KL reported
    assert (scored.log_px <= 0).all() and np.isfinite(scored.bits_per_dim).all()
    # The decoder ignores z, so E_q log P(x | z) is exactly 16 log P(bin 128 | N(0.5, 0.1)).
    s = float(vae.likelihood.scale())
    mass = stats.norm.cdf(128.5 / 255, 0.5, s) - stats.norm.cdf(127.5 / 255, 0.5, s)
    np.testing.assert_allclose(scored.reconstruction, 16 * math.log(mass), rtol=1e-5)
    np.testing.assert_allclose(scored.kl, dense.kl, rtol=1e-5)  # same guide and prior, same seed
    assert scored.summary()["bits_per_dim"] == pytest.approx(-scored.log_px.mean() / (16 * math.log(2)))
    assert isinstance(vae.likelihood, LIKELIHOODS.get("normal"))  # the VAE keeps its density afterwards
    assert ppvae.evaluate(vae, x, num_samples=16).bits_per_dim is None


@pytest.mark.parametrize("likelihood", ["normal", "laplace", "beta", "continuous-bernoulli"])
def test_scoring_view_of_every_supported_head(likelihood):
    torch.manual_seed(0)
    vae = ppvae.VAE((16,), 2, likelihood=likelihood)
    x = torch.randint(0, LEVELS, (8, 16)).float() / N
    x[0] = 0.0
    x[1] = 1.0  # the edge bins, outside the continuous beta's open support
    ev = ppvae.evaluate(scoring_view(vae), x, num_samples=8)
    assert ev.discrete and np.isfinite(ev.bits_per_dim).all() and (ev.log_px <= 0).all()
    assert not getattr(vae.likelihood, "discrete", True)


def test_scoring_view_of_a_discrete_vae_is_the_vae():
    vae = ppvae.VAE((16,), 2, likelihood="categorical")
    assert scoring_view(vae) is vae
    with pytest.raises(ConfigError, match="scoring_view"):
        scoring_view(object())


def test_scoring_view_under_diagnose():
    vae = constant_vae()
    x = torch.full((3, 16), 128 / 255)
    diag = ppvae.diagnose(
        scoring_view(vae),
        x,
        num_samples=100,
        gaps=False,
        sbc=False,
        num_reference_points=1,
        reference_warmup=20,
        reference_samples=20,
    )
    assert diag.evaluation.discrete and np.isfinite(diag.evaluation.bits_per_dim).all()
    assert "collapse" not in diag.skipped and "reference" not in diag.skipped
    assert isinstance(vae.likelihood, LIKELIHOODS.get("normal"))
