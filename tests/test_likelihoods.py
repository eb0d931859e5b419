"""Tests for ppvae.blocks.likelihoods: shapes, normalization, known values, support checks, registry, gradients."""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from ppvae.blocks.likelihoods import LIKELIHOODS
from ppvae.errors import ConfigError, DataError

DATA_SHAPE = (1, 4, 4)
NAMES = LIKELIHOODS.names()


def in_support(name: str, shape: tuple[int, ...], levels: int = 256) -> torch.Tensor:
    """Data inside the support of likelihood ``name``."""
    if name == "bernoulli":
        return torch.randint(0, 2, shape).float()
    if name in ("continuous-bernoulli", "beta"):
        return torch.rand(shape) * 0.98 + 0.01
    if name in ("normal", "laplace"):
        return torch.randn(shape)
    if name in ("categorical", "discretized-logistic"):
        return torch.randint(0, levels, shape).float() / (levels - 1)
    return torch.randint(0, 20, shape).float()


def build(name: str, data_shape: tuple[int, ...] = DATA_SHAPE, **kwargs):
    return LIKELIHOODS.build({"name": name, "kwargs": kwargs}, data_shape=data_shape)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    pyro.clear_param_store()


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", NAMES)
def test_shapes_support_and_trace(name):
    lik = build(name)
    params = torch.randn(3, 5, lik.num_params, *DATA_SHAPE)
    d = lik(params)
    assert d.batch_shape == (3, 5) and d.event_shape == DATA_SHAPE
    x = d.sample()
    assert x.shape == (3, 5, *DATA_SHAPE)
    lik.check_data(x)  # samples lie in the support
    assert d.sample((2,)).shape == (2, 3, 5, *DATA_SHAPE)
    data = in_support(name, (3, 5, *DATA_SHAPE))
    lp = d.log_prob(data)
    assert lp.shape == (3, 5) and torch.isfinite(lp).all()
    assert torch.isfinite(d.log_prob(x)).all()
    assert lik.mean(params).shape == (3, 5, *DATA_SHAPE)
    assert d.expand((2, 3, 5)).log_prob(data).shape == (2, 3, 5)
    assert torch.allclose(d.log_prob(data.expand(2, *data.shape))[1], lp)  # value with extra leading dims
    assert torch.allclose(d.log_prob(data[0, 0])[0, 0], lp[0, 0])  # value broadcast against the batch

    def model():
        with pyro.plate("data", 5):
            pyro.sample("x", lik(params), obs=data)

    trace = poutine.trace(model).get_trace()
    trace.compute_log_prob()
    assert torch.allclose(trace.nodes["x"]["log_prob"], lp)


@pytest.mark.parametrize("name", NAMES)
def test_discrete_flag(name):
    continuous = {"continuous-bernoulli", "normal", "laplace", "beta"}
    assert build(name).discrete is (name not in continuous)


# ------------------------------------------------------------------------------------------------ normalization
CB_LOGITS = [-40.0, -8.0, -1.0, -0.09, -1e-3, 0.0, 1e-5, 0.05, 0.11, 2.0, 15.0, 30.0]


def test_continuous_bernoulli_integrates_to_one_and_mean():
    lik = build("continuous-bernoulli", data_shape=(len(CB_LOGITS),))
    logits = torch.tensor(CB_LOGITS, dtype=torch.float64)
    x = torch.linspace(0, 1, 400_001, dtype=torch.float64).unsqueeze(-1)
    dens = lik(logits.unsqueeze(0)).base_dist.log_prob(x).exp()
    assert torch.allclose(torch.trapezoid(dens, x, dim=0), torch.ones_like(logits), atol=1e-3)
    mean = torch.trapezoid(dens * x, x, dim=0)
    assert torch.allclose(lik.mean(logits.unsqueeze(0)), mean, atol=1e-4)


def test_continuous_bernoulli_float32_matches_float64_and_torch():
    logits = torch.tensor(CB_LOGITS)
    lik = build("continuous-bernoulli", data_shape=(len(CB_LOGITS),))
    x = torch.rand(len(CB_LOGITS))
    lp32 = lik(logits.unsqueeze(0)).base_dist.log_prob(x)
    lp64 = lik(logits.double().unsqueeze(0)).base_dist.log_prob(x.double())
    assert torch.allclose(lp32.double(), lp64, atol=1e-4)
    moderate = (logits.abs() > 0.5) & (logits.abs() < 10)  # torch's own version is accurate there
    ref = torch.distributions.ContinuousBernoulli(logits=logits[moderate]).log_prob(x[moderate])
    assert torch.allclose(lp32[moderate], ref, atol=1e-4)


def test_continuous_bernoulli_samples_match_mean():
    logits = torch.tensor([-50.0, -3.0, 0.0, 5e-4, 0.5, 5.0, 50.0])
    d = build("continuous-bernoulli", data_shape=(7,))(logits.unsqueeze(0))
    x = d.sample((40_000,))
    assert ((x >= 0) & (x <= 1)).all()
    assert torch.allclose(x.mean(0), d.mean, atol=5e-3)


def grid_probs(lik, params: torch.Tensor) -> torch.Tensor:
    """Probabilities of every grid value: (levels, *data_shape) for params (num_params, *data_shape)."""
    n = lik.levels - 1
    grid = (torch.arange(n + 1, dtype=params.dtype) / n).reshape(-1, *[1] * len(lik.data_shape))
    return lik(params).base_dist.log_prob(grid.expand(n + 1, *lik.data_shape)).exp()


@pytest.mark.parametrize("levels", [256, 17])
@pytest.mark.parametrize("components", [1, 3])
def test_discretized_logistic_sums_to_one(levels, components):
    lik = build("discretized-logistic", data_shape=(50,), levels=levels, components=components)
    params = torch.randn(3 * components, 50, dtype=torch.float64)
    params[components : 2 * components] = torch.rand(components, 50, dtype=torch.float64) * 1.4 - 0.2  # locations
    params[2 * components :] = torch.randn(components, 50, dtype=torch.float64) * 4  # tiny to huge scales
    probs = grid_probs(lik, params)
    assert torch.allclose(probs.sum(0), torch.ones(50, dtype=torch.float64), atol=1e-5)
    grid = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    assert torch.allclose(lik.mean(params), (probs * grid[:, None]).sum(0), atol=1e-6)


def test_discretized_logistic_tiny_scale_hits_nearest_bin():
    lik = build("discretized-logistic", data_shape=(6,))
    params = torch.stack([torch.zeros(6), torch.full((6,), 0.31), torch.full((6,), -20.0)])
    probs = grid_probs(lik, params)
    assert (probs[79] > 1 - 1e-4).all()  # 0.31 * 255 = 79.05
    assert torch.allclose(lik.mean(params), torch.full((6,), 79 / 255), atol=1e-4)
    assert (lik(params).sample((10,)) == 79 / 255).all()


def test_discretized_logistic_mixture_samples_match_mean():
    lik = build("discretized-logistic", data_shape=(4,), components=3, levels=17)
    params = torch.randn(9, 4)
    params[6:] -= 2
    x = lik(params).sample((40_000,))
    lik.check_data(x)
    assert torch.allclose(x.mean(0), lik.mean(params), atol=5e-3)


def test_categorical_sums_to_one_and_samples():
    lik = build("categorical", data_shape=(5,), levels=17)
    params = torch.randn(17, 5, dtype=torch.float64) * 2
    probs = grid_probs(lik, params)
    assert torch.allclose(probs, params.softmax(0))
    grid = torch.arange(17, dtype=torch.float64) / 16
    assert torch.allclose(lik.mean(params), (probs * grid[:, None]).sum(0))
    x = lik(params).sample((40_000,))
    lik.check_data(x)
    assert torch.allclose(x.mean(0), lik.mean(params), atol=5e-3)


def test_beta_integrates_to_one():
    lik = build("beta", data_shape=(3,))
    params = torch.tensor([[1.0, 3.0, 6.0], [2.0, 0.7, 4.0]], dtype=torch.float64)
    x = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:-1].unsqueeze(-1)
    dens = lik(params).base_dist.log_prob(x).exp()
    assert torch.allclose(torch.trapezoid(dens, x, dim=0), torch.ones(3, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(lik.mean(params), torch.trapezoid(dens * x, x, dim=0), atol=1e-4)


@pytest.mark.parametrize("name", ["poisson", "negative-binomial", "zinb"])
def test_count_pmfs_sum_to_one(name):
    lik = build(name, data_shape=(4,))
    params = torch.randn(lik.num_params, 4, dtype=torch.float64)
    params[-2 if lik.num_params > 1 else -1] += 2.0  # mean counts of a few to tens
    k = torch.arange(0, 3000, dtype=torch.float64).unsqueeze(-1).expand(-1, 4)
    probs = lik(params).base_dist.log_prob(k).exp()
    assert torch.allclose(probs.sum(0), torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(lik.mean(params), (probs * k).sum(0), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ known values
def test_normal_and_laplace_fixed_scale_closed_form():
    m, x = torch.randn(2, 1, 10), torch.randn(2, 10)
    lp = build("normal", data_shape=(10,), scale=0.3)(m).log_prob(x)
    ref = (-((x - m[:, 0]) ** 2) / (2 * 0.09) - math.log(0.3) - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(lp, ref, atol=1e-5)
    lp = build("laplace", data_shape=(10,), scale=0.3)(m).log_prob(x)
    assert torch.allclose(lp, (-(x - m[:, 0]).abs() / 0.3 - math.log(0.6)).sum(-1), atol=1e-5)


def test_bernoulli_matches_bce():
    logits, x = torch.randn(7, 1, 12) * 5, torch.randint(0, 2, (7, 12)).float()
    lp = build("bernoulli", data_shape=(12,))(logits).log_prob(x)
    ref = -F.binary_cross_entropy_with_logits(logits[:, 0], x, reduction="none").sum(-1)
    assert torch.allclose(lp, ref, atol=1e-5)


def test_count_closed_forms():
    x = torch.tensor([0.0, 3.0, 10.0])
    p = torch.tensor([[0.4, 1.0, 2.0]])
    rate = F.softplus(p[0]) + 1e-6
    ref = (x * rate.log() - rate - torch.lgamma(x + 1)).sum()
    assert torch.allclose(build("poisson", data_shape=(3,))(p).log_prob(x), ref)
    log_mu, log_r = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.3, -1.0, 2.0])
    mu, r = log_mu.exp(), log_r.exp()
    nb = (
        torch.lgamma(x + r)
        - torch.lgamma(r)
        - torch.lgamma(x + 1)
        + r * torch.log(r / (r + mu))
        + x * torch.log(mu / (r + mu))
    )
    lp = build("negative-binomial", data_shape=(3,))(torch.stack([log_mu, log_r])).log_prob(x)
    assert torch.allclose(lp, nb.sum(), atol=1e-5)
    g = torch.sigmoid(torch.tensor([0.2, -0.5, 1.0]))
    zinb = torch.where(x == 0, torch.log(g + (1 - g) * nb.exp()), torch.log(1 - g) + nb)
    lik = build("zinb", data_shape=(3,))
    lp = lik(torch.stack([torch.logit(g), log_mu, log_r])).log_prob(x)
    assert torch.allclose(lp, zinb.sum(), atol=1e-5)
    assert torch.allclose(lik.mean(torch.stack([torch.logit(g), log_mu, log_r])), (1 - g) * mu)


# ------------------------------------------------------------------------------------------------ check_data
BAD = [
    ("bernoulli", {}, [0.0, 1.0, 0.5, 0.5], "saw 0.5 in 2 of 4"),
    ("continuous-bernoulli", {}, [0.0, 1.5, 0.2, 1.0], "saw 1.5"),
    ("beta", {}, [0.0, 0.5, 0.2, 0.3], "saw 0.0"),
    ("beta", {}, [0.1, 0.5, 1.0, 0.3], "saw 1.0"),
    ("categorical", {}, [0.0, 0.5, 1.0, 1.0], "saw 0.5"),
    ("categorical", {"levels": 17}, [0.0, 3 / 255, 1.0, 1.0], "levels="),
    ("categorical", {}, [0.0, 255.0, 3.0, 1.0], "saw 255.0"),
    ("discretized-logistic", {"levels": 17}, [0.0, 0.03, 1.0, 1.0], "saw 0.03"),
    ("poisson", {}, [0.0, -1.0, 2.0, 3.0], "saw -1.0"),
    ("poisson", {}, [0.0, 1.5, 2.0, 3.0], "saw 1.5"),
    ("negative-binomial", {}, [0.0, -2.0, 2.0, 3.0], "saw -2.0"),
    ("negative-binomial", {}, [0.0, 0.25, 2.0, 3.0], "saw 0.25"),
    ("zinb", {}, [-3.0, 1.0, 2.0, 3.0], "saw -3.0"),
    ("zinb", {}, [0.0, 1.0, 2.5, 3.0], "saw 2.5"),
]


@pytest.mark.parametrize("name, kwargs, values, needle", BAD)
def test_check_data_rejects_outside_support(name, kwargs, values, needle):
    with pytest.raises(DataError, match=needle) as err:
        build(name, data_shape=(4,), **kwargs).check_data(torch.tensor([values]))
    assert "\n" not in str(err.value) and name in str(err.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_data_rejects_non_finite(name, bad):
    lik = build(name, data_shape=(4,))
    x = in_support(name, (10, 4))
    lik.check_data(x)
    x[3, 2] = bad
    with pytest.raises(DataError, match=f"saw {bad} in 1 of 40"):
        lik.check_data(x)


def test_check_data_bernoulli_message_names_the_fix():
    with pytest.raises(DataError, match="binarize.*continuous-bernoulli"):
        build("bernoulli", data_shape=(4,)).check_data(torch.full((2, 4), 0.5))
    build("categorical", data_shape=(4,), levels=17).check_data(torch.arange(16.0).reshape(4, 4) / 16)


# ------------------------------------------------------------------------------------------------ registry
def test_registry():
    with pytest.raises(ConfigError, match="bernoulli.*zinb"):
        LIKELIHOODS.build("nope", data_shape=(4,))
    lik = LIKELIHOODS.build("normal", data_shape=(4,))
    assert lik.spec == {"name": "normal", "kwargs": {"data_shape": [4], "scale": 0.1, "min_scale": 0.001}}
    assert build("categorical", levels=17).num_params == 17
    assert build("discretized-logistic", components=3).num_params == 9
    for name in NAMES:
        spec = json.loads(json.dumps(build(name).spec))
        rebuilt = LIKELIHOODS.build(spec)
        assert spec["name"] == name and rebuilt.num_params == build(name).num_params


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("normal", {"scale": -1.0}),
        ("laplace", {"scale": "big"}),
        ("categorical", {"levels": 1}),
        ("discretized-logistic", {"components": 0}),
    ],
)
def test_bad_options(name, kwargs):
    with pytest.raises(ConfigError):
        build(name, **kwargs)


def test_wrong_decoder_output_shape():
    with pytest.raises(ConfigError, match="out_shape"):
        build("beta")(torch.randn(5, 1, *DATA_SHAPE))


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow(name):
    lik = build(name, data_shape=(8,))
    params = torch.randn(6, lik.num_params, 8, requires_grad=True)
    lik(params).log_prob(in_support(name, (6, 8))).sum().backward()
    assert torch.isfinite(params.grad).all() and params.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["normal", "laplace"])
def test_learned_scale(name):
    lik = build(name, data_shape=(8,), scale="learned")
    assert lik.log_scale.shape == (8,)
    lik(torch.zeros(3, 1, 8)).log_prob(torch.randn(3, 8)).sum().backward()
    assert torch.isfinite(lik.log_scale.grad).all() and lik.log_scale.grad.abs().sum() > 0
    assert torch.allclose(lik.scale(), torch.full((8,), 0.101))


def test_gradients_finite_at_edge_cases():
    logits = torch.tensor([[0.0, 1e-6, -0.1, 0.1, 60.0, -60.0]], requires_grad=True)
    lik = build("continuous-bernoulli", data_shape=(6,))
    (lik(logits).log_prob(torch.rand(6)) + lik.mean(logits).sum()).backward()
    assert torch.isfinite(logits.grad).all()
    params = torch.tensor([[0.0] * 3, [0.5, -30.0, 30.0], [-30.0, -30.0, 30.0]], requires_grad=True)
    build("discretized-logistic", data_shape=(3,))(params).log_prob(torch.tensor([0.5, 0.0, 1.0])).backward()
    assert torch.isfinite(params.grad).all()
