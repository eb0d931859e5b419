"""Per-datapoint log-weights: exact on the linear-Gaussian model, and the data-plate convention enforced."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppvae.data import LinearGaussian
from ppvae.errors import ConfigError
from ppvae.infer.logweights import log_weights


def _exact_pair(gen: LinearGaussian, scale_factor: float = 1.0):
    W, b, sigma = gen.W.double(), gen.b.double(), gen.sigma

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(W.shape[1], dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, sigma).to_event(1), obs=x)

    def guide(x):
        mean, cov = gen.posterior(x)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(mean.double(), cov.double() * scale_factor**2))

    return model, guide


def test_exact_posterior_gives_constant_weights_equal_to_log_px():
    gen = LinearGaussian(data_dim=6, latent_dim=2, noise=0.5, seed=0)
    x, _ = gen.sample(50, seed=1)
    model, guide = _exact_pair(gen)
    lw = log_weights(model, guide, x.double(), num_samples=100)
    assert lw.shape == (50, 100)
    assert torch.allclose(lw, gen.log_px(x).double()[:, None].expand(50, 100), atol=1e-6)


def test_wider_guide_weights_average_to_log_px():
    gen = LinearGaussian(data_dim=6, latent_dim=2, noise=0.5, seed=0)
    x, _ = gen.sample(20, seed=1)
    model, guide = _exact_pair(gen, scale_factor=1.3)
    lw = log_weights(model, guide, x.double(), num_samples=20000)
    log_px_hat = lw.logsumexp(-1) - torch.log(torch.tensor(20000.0, dtype=lw.dtype))
    assert torch.allclose(log_px_hat, gen.log_px(x).double(), atol=0.02)
    assert (lw.mean(-1) < gen.log_px(x).double()).all()  # ELBO below log p(x)


def test_global_latent_is_refused_with_the_convention():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ConfigError, match="'mu' is outside the plate 'data'"):
        log_weights(model, guide, torch.randn(5), num_samples=3)


def test_nested_plate_inside_data_plate_is_summed():
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("pixels", x.shape[1], dim=-1):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(x.mean(-1, keepdim=True), 1.0))

    x = torch.randn(4, 3)
    lw = log_weights(model, guide, x, num_samples=7)
    assert lw.shape == (4, 7)
