"""VAE composition: every building block plugs in, the Pyro conventions hold, generation works."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive

import ppvae
from ppvae.blocks.guides import GUIDES
from ppvae.blocks.likelihoods import LIKELIHOODS
from ppvae.blocks.priors import PRIORS
from ppvae.errors import ConfigError

SHAPE = (1, 8, 8)


def _data_for(likelihood, n=6):
    u = torch.rand(n, *SHAPE)
    return {
        "bernoulli": (u > 0.5).float(),
        "continuous-bernoulli": u,
        "normal": u,
        "laplace": u,
        "beta": u * 0.9 + 0.05,
        "categorical": torch.randint(0, 256, (n, *SHAPE)) / 255.0,
        "discretized-logistic": torch.randint(0, 256, (n, *SHAPE)) / 255.0,
        "poisson": torch.poisson(u * 5),
        "negative-binomial": torch.poisson(u * 5),
        "zinb": torch.poisson(u * 5),
    }[likelihood]


@pytest.mark.parametrize("likelihood", LIKELIHOODS.names())
def test_every_likelihood_trains_one_step(likelihood):
    vae = ppvae.VAE(SHAPE, 4, likelihood=likelihood)
    result = ppvae.fit(vae, _data_for(likelihood), epochs=2, batch_size=3, progress=False)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)


@pytest.mark.parametrize("prior", PRIORS.names())
@pytest.mark.parametrize("guide", GUIDES.names())
def test_every_prior_and_guide_compose(prior, guide):
    vae = ppvae.VAE(SHAPE, 3, prior=prior, guide=guide, likelihood="normal")
    x = torch.rand(5, *SHAPE)
    tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=tr)).get_trace(x)
    assert tr.nodes["z"]["value"].shape == (5, 3)
    assert model_tr.nodes["x"]["is_observed"]
    assert [f.name for f in model_tr.nodes["z"]["cond_indep_stack"]] == ["data"]
    loss = pyro.infer.Trace_ELBO(num_particles=2, vectorize_particles=True).differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("encoder,decoder", [("conv", "conv"), ("mlp", "conv"), ("conv", "mlp")])
def test_conv_networks(encoder, decoder):
    vae = ppvae.VAE((1, 28, 28), 5, encoder=encoder, decoder=decoder, likelihood="bernoulli")
    x = (torch.rand(4, 1, 28, 28) > 0.5).float()
    result = ppvae.fit(vae, x, epochs=1, batch_size=2, progress=False)
    assert len(result.history) == 1
    assert vae.reconstruct(x).shape == x.shape


def test_generation_path_with_predictive():
    vae = ppvae.VAE(SHAPE, 4, likelihood="bernoulli")
    draws = Predictive(vae.model, num_samples=3)(None, batch_size=5)
    assert draws["x"].shape == (3, 5, *SHAPE)
    assert set(draws["x"].unique().tolist()) <= {0.0, 1.0}
    assert vae.generate(7).shape == (7, *SHAPE)


def test_models_have_separate_weights():
    a, b = ppvae.VAE(SHAPE, 4), ppvae.VAE(SHAPE, 4)
    assert not any(pa.data_ptr() == pb.data_ptr() for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def test_bad_configuration():
    with pytest.raises(ConfigError, match="unknown prior 'gauss'.*normal"):
        ppvae.VAE(SHAPE, 4, prior="gauss")
    with pytest.raises(ConfigError, match="latent_dim"):
        ppvae.VAE(SHAPE, 0)
    with pytest.raises(ConfigError, match="conv"):
        ppvae.VAE((64,), 4, encoder="conv")
    with pytest.raises(ConfigError, match="unknown guide"):
        ppvae.VAE(SHAPE, 4, guide="exact")
