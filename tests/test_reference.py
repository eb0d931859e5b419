"""NUTS reference posteriors against the exact linear-Gaussian posterior, and the guide-vs-reference metrics."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvae
from ppvae.data import LinearGaussian
from ppvae.diagnostics.reference import posterior_metrics, reference_posterior
from ppvae.errors import ConfigError, DataError

GEN = LinearGaussian(data_dim=6, latent_dim=2, noise=0.5, seed=0)
X, _ = GEN.sample(20, seed=1)


def exact_vae() -> ppvae.VAE:
    """A linear VAE whose decoder is the generator, so its exact posterior is ``GEN.posterior``."""
    vae = ppvae.VAE(
        (6,),
        2,
        prior="normal",
        likelihood={"name": "normal", "kwargs": {"scale": 0.5}},
        guide="fullrank",
        encoder={"name": "mlp", "kwargs": {"hidden": []}},
        decoder={"name": "mlp", "kwargs": {"hidden": []}},
    )
    with torch.no_grad():
        vae.decoder.net[0].weight.copy_(GEN.W)
        vae.decoder.net[0].bias.copy_(GEN.b)
    return vae


def lg_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ GEN.W.T + GEN.b, GEN.sigma).to_event(1), obs=x)


def exact_guide(sd_scale: float = 1.0):
    """A guide q(z | x) = N(exact mean, sd_scale² · exact covariance), looked up by matching x to X."""

    def guide(x):
        mean, cov = GEN.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean.float(), (sd_scale**2 * cov).float()))

    return guide


def test_nuts_matches_exact_posterior_of_a_vae():
    vae = exact_vae()
    ref = reference_posterior(vae, X, index=[0, 7, 13], num_warmup=200, num_samples=400, num_guide_samples=200)
    assert ref.draws.shape == (3, 2, 400, 2) and ref.guide_draws.shape == (3, 200, 2)
    assert ref.rhat.shape == ref.ess.shape == (3, 2) and ref.metrics["mmd"].shape == (3,)
    assert ref.draws.dtype == np.float64 and ref.seconds > 0
    np.testing.assert_array_equal(ref.index, [0, 7, 13])
    mean, cov = GEN.posterior(X[[0, 7, 13]])
    sd = cov.diagonal().sqrt().numpy()
    pooled = ref.draws.reshape(3, -1, 2)
    assert (ref.rhat < 1.05).all() and (ref.ess > 150).all()
    assert (np.abs(pooled.mean(1) - mean.numpy()) < 4 * sd / np.sqrt(ref.ess)).all()
    np.testing.assert_allclose(pooled.std(1), np.broadcast_to(sd, (3, 2)), rtol=0.1)
    rows = ref.summary()["points"]
    assert ref.summary()["converged"] == bool(ref.converged().all())
    assert [r["index"] for r in rows] == [0, 7, 13] and set(rows[0]) >= {"rhat_max", "ess_min", "mmd", "w1"}
    assert ref.converged().shape == (3,)
    # the weights were frozen only while sampling, and nothing entered the global parameter store
    assert all(p.requires_grad for p in vae.parameters())
    assert len(pyro.get_param_store()) == 0


def test_metrics_of_exact_and_overconfident_guides_for_a_function_pair():
    ref = reference_posterior(lg_model, X, guide=exact_guide(), num_points=2, num_warmup=200, num_samples=500)
    np.testing.assert_array_equal(ref.index, [0, 19])
    m = ref.metrics
    assert (np.abs(m["mean_error_sd"]) < 0.2).all()
    np.testing.assert_allclose(m["sd_ratio"], 1.0, atol=0.12)
    assert (m["w1"] < 0.2).all() and (np.abs(m["mmd"]) < 0.01).all()

    narrow = reference_posterior(
        lg_model, X, guide=exact_guide(0.5), index=[0], num_warmup=200, num_samples=500, seed=1
    ).metrics
    np.testing.assert_allclose(narrow["sd_ratio"], 0.5, atol=0.07)
    assert (narrow["mmd"] > 0.05).all() and (narrow["mmd"] > 10 * np.abs(m["mmd"]).max()).all()
    assert (narrow["w1"] > 0.25).all()


def test_posterior_metrics_on_known_gaussians():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 2))
    same = posterior_metrics(ref, rng.normal(size=(1000, 2)))
    shifted = posterior_metrics(ref, rng.normal(loc=[1.0, 0.0], scale=[1.0, 2.0], size=(1000, 2)))
    assert abs(same["mmd"]) < 0.005 and shifted["mmd"] > 0.1
    np.testing.assert_allclose(shifted["mean_error_sd"], [1.0, 0.0], atol=0.1)
    np.testing.assert_allclose(shifted["sd_ratio"], [1.0, 2.0], rtol=0.1)
    np.testing.assert_allclose(shifted["w1"][0], 1.0, atol=0.1)  # a pure shift moves W1 by its size


def test_user_errors():
    with pytest.raises(ConfigError, match="latent sample site 'w'"):
        reference_posterior(exact_vae(), X, latent_site="w", num_points=1)
    with pytest.raises((ConfigError, DataError)):
        reference_posterior(exact_vae(), torch.empty(0, 6))
    with pytest.raises(ConfigError, match="num_chains"):
        reference_posterior(exact_vae(), X, num_chains=0)
    with pytest.raises(ConfigError, match="guide"):
        reference_posterior(lg_model, X)
    with pytest.raises(ConfigError, match="index"):
        reference_posterior(exact_vae(), X, index=[20])
