"""The direct VAE ELBO equals Pyro's Trace_ELBO (value and gradients) for every building block."""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

import ppvae
from ppvae.blocks.guides import GUIDES
from ppvae.blocks.likelihoods import LIKELIHOODS
from ppvae.blocks.priors import PRIORS
from ppvae.infer.objectives import ScaleLatents, scale_latents, vae_elbo_loss
from ppvae.infer.pair import is_builtin_vae
from tests.test_vae import SHAPE, _data_for

CASES = (
    [(p, "normal", "normal") for p in PRIORS.names()]
    + [("normal", g, "normal") for g in GUIDES.names()]
    + [("normal", "normal", lik) for lik in LIKELIHOODS.names()]
    + [("vamp", "iaf", "categorical"), ("flow", "fullrank", "beta")]
)


def _pyro_loss(vae, x, beta, particles):
    factor = beta
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)
    return elbo.differentiable_loss(scale_latents(vae.model, factor), scale_latents(vae.guide, factor), x)


@pytest.mark.parametrize("prior,guide,likelihood", CASES)
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_direct_elbo_equals_trace_elbo(prior, guide, likelihood, beta):
    vae = ppvae.VAE(SHAPE, 3, prior=prior, guide=guide, likelihood=likelihood)
    x = _data_for(likelihood, n=4)
    losses, grads = [], []
    for compute in (_pyro_loss, lambda v, x, b, s: vae_elbo_loss(v, x, b, s)):
        vae.zero_grad()
        pyro.set_rng_seed(3)
        loss = compute(vae, x, beta, 1)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None]))
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-4), losses
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_direct_elbo_with_particles_matches_trace_elbo():
    vae = ppvae.VAE(SHAPE, 3, likelihood="bernoulli")
    x = _data_for("bernoulli", n=5)
    pyro.set_rng_seed(5)
    a = _pyro_loss(vae, x, 1.0, 4)
    pyro.set_rng_seed(5)
    b = vae_elbo_loss(vae, x, 1.0, 4)
    assert torch.allclose(a, b, rtol=1e-5)


def test_fast_path_only_for_unmodified_vae():
    class Custom(ppvae.VAE):
        def model(self, x=None, batch_size=1):
            return super().model(x, batch_size)

    assert is_builtin_vae(ppvae.VAE(SHAPE, 2))
    assert not is_builtin_vae(Custom(SHAPE, 2))
    assert not is_builtin_vae(torch.nn.Linear(2, 2))


def test_scale_latents_leaves_observed_sites():
    vae = ppvae.VAE(SHAPE, 2, likelihood="bernoulli")
    x = _data_for("bernoulli", n=3)
    with ScaleLatents(0.0):
        tr = pyro.poutine.trace(vae.model).get_trace(x)
    assert tr.nodes["z"]["scale"] == 0.0 and tr.nodes["x"]["scale"] == 1.0
