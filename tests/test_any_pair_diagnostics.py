"""Diagnostics of users' own pairs: sites found from the trace (any names, tuples of inputs), SBC through the model's
own code, the NUTS reference with enumerated latents marginalized, and the messages when one does not apply."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from torch.distributions import MultivariateNormal, kl_divergence

import ppvae
from ppvae.data import LinearGaussian
from ppvae.diagnostics.reference import reference_posterior
from ppvae.diagnostics.sbc import sbc
from ppvae.errors import NotApplicable

T = LinearGaussian(data_dim=6, latent_dim=2, noise=0.5, seed=0)
X, _ = T.sample(300, seed=1)
C = torch.linspace(-1, 1, 300).unsqueeze(-1).expand(300, 6).contiguous()  # a conditioning input per datapoint
NO_PARTS = {"collapse": False, "gaps": False, "sbc": False, "reference": False}


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("latent", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("obs", dist.Normal(z @ T.W.T + T.b, T.sigma).to_event(1), obs=x)


def guide_for(sd: float = 1.0, shift: float = 0.0):
    """The exact posterior N(mean, cov) as guide, its sd scaled by ``sd`` and its mean shifted by ``shift`` sd."""

    def guide(x):
        mean, cov = T.posterior(x)
        loc = mean + shift * cov.diagonal().sqrt()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", dist.MultivariateNormal(loc.float(), (sd**2 * cov).float()))

    return guide


class Conditional(torch.nn.Module):
    """A module pair taking (x, c): x = W z + b + c + noise, so p(z | x, c) is the posterior of x − c."""

    def model(self, x, c):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("code", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("pixels", dist.Normal(z @ T.W.T + T.b + c, T.sigma).to_event(1), obs=x)

    def guide(self, x, c):
        mean, cov = T.posterior(x - c)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("code", dist.MultivariateNormal(mean.float(), cov.float()))


def test_sbc_of_a_function_pair_with_its_own_site_names():
    good = sbc(model, guide=guide_for(), data=X, num_simulations=300, num_draws=49, seed=3)
    assert good.ranks.shape == (300, 2) and good.p_value() > 0.01, good.summary()
    for bad in (guide_for(sd=0.5), guide_for(shift=0.5)):
        assert sbc(model, guide=bad, data=X, num_simulations=300, num_draws=49, seed=3).p_value() < 1e-4


def test_sbc_and_reference_of_a_module_taking_a_tuple_of_inputs_through_diagnose():
    d = ppvae.diagnose(Conditional(), (X, C), num_samples=100, **(NO_PARTS | {"sbc": True, "reference": True}),
                       sbc_simulations=300, num_reference_points=1, reference_warmup=200,
                       reference_samples=400)  # fmt: skip
    assert d.skipped == {} and d.failed == {}
    assert d.sbc.p_value() > 0.01, d.sbc.summary()
    # NUTS on the exact posterior of x − c: the guide (that posterior) matches it.
    assert np.abs(d.reference.metrics["mean_error_sd"]).max() < 0.3
    assert np.abs(d.reference.metrics["sd_ratio"] - 1).max() < 0.25


def test_reference_of_renamed_sites_matches_the_exact_posterior():
    r = reference_posterior(model, X, guide=guide_for(), index=[7], num_warmup=150, num_samples=300, seed=0)
    mean, cov = T.posterior(X[7:8])
    pooled = r.draws[0].reshape(-1, 2)
    sd = cov.diagonal().sqrt().numpy()
    assert np.abs((pooled.mean(0) - mean[0].numpy()) / sd).max() < 0.25
    assert np.abs(pooled.std(0) / sd - 1).max() < 0.2


def mixture_model(x):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(torch.tensor([0.3, 0.7])))
        z = pyro.sample("z", dist.Normal(torch.tensor([-2.0, 2.0])[y], 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


@config_enumerate
def mixture_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Categorical(torch.tensor([0.5, 0.5])))
        pyro.sample("z", dist.Normal(x, 0.5))


def test_reference_marginalizes_an_enumerated_latent_exactly():
    """p(z | x) = Σ_y p(y | x) N(z; m_y, v): the NUTS draws' mean and sd match this mixture's."""
    x = torch.tensor([0.3])
    r = reference_posterior(mixture_model, x, guide=mixture_guide, num_warmup=150, num_samples=300, seed=1)
    mu, prior, s2 = np.array([-2.0, 2.0]), np.array([0.3, 0.7]), 0.25
    v = 1 / (1 + 1 / s2)
    m = v * (mu + 0.3 / s2)
    w = prior * np.exp(-((0.3 - mu) ** 2) / (2 * (1 + s2)))
    w /= w.sum()
    mean = (w * m).sum()
    sd = math.sqrt((w * (v + m**2)).sum() - mean**2)
    pooled = r.draws[0].reshape(-1)
    assert abs(pooled.mean() - mean) < 0.15 * sd and abs(pooled.std() / sd - 1) < 0.15


def test_parts_that_cannot_run_say_why_and_the_others_stand():
    def computed_obs_model(x):  # observes x + 1: a value the guide never sees as an argument
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z @ T.W.T + T.b, T.sigma).to_event(1), obs=x + 1)

    d = ppvae.diagnose(computed_obs_model, X[:20], guide=guide_for(), num_samples=50,
                       **(NO_PARTS | {"sbc": True}), sbc_simulations=20)  # fmt: skip
    assert "computed inside the model" in d.skipped["sbc"] and d.failed == {}

    d = ppvae.diagnose(model, X[:20], guide=guide_for(), num_samples=50, latent_sites="data",
                       **(NO_PARTS | {"sbc": True, "reference": True}), sbc_simulations=20)  # fmt: skip
    for part in ("sbc", "reference"):
        assert "'data' is the data plate (a plate, not a variable)" in d.skipped[part]
        assert "pass latent_sites= some of ['latent']" in d.skipped[part]

    def global_model(x):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 0.1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z @ T.W.T + T.b, scale * T.sigma).to_event(1), obs=x)

    with pytest.raises(NotApplicable, match=r"global latent sites \['scale'\]"):
        sbc(global_model, guide=guide_for(), data=X, num_simulations=20)
    with pytest.raises(NotApplicable, match=r"global latent sites \['scale'\]"):
        reference_posterior(global_model, X, guide=guide_for(), num_points=1)
    with pytest.raises(ppvae.ConfigError, match="latent_sites must be"):
        ppvae.diagnose(model, X[:20], guide=guide_for(), num_samples=50, latent_sites=[3])


def test_collapse_of_a_function_pair_against_the_closed_form():
    """Exact guide N(A x + c, Σ): Var_x E_q[z] is the variance of the exact means (+ Σ_dd / S of Monte Carlo),
    E KL(q ‖ p) and the KL per dimension are closed-form Gaussian KLs."""
    from ppvae.diagnostics.collapse import pair_collapse

    x = X[:100]
    c = pair_collapse(model, x, guide=guide_for(), num_samples=256, seed=0)
    mean, cov = T.posterior(x)
    q = torch.distributions.MultivariateNormal(mean, cov)
    p = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=mean.dtype), torch.eye(2, dtype=mean.dtype))
    np.testing.assert_allclose(c.activity, (mean.var(0) + cov.diagonal(dim1=-2, dim2=-1).mean(0) / 256).numpy(),
                               rtol=0.05)  # fmt: skip
    assert c.kl_total == pytest.approx(torch.distributions.kl_divergence(q, p).mean().item(), abs=0.05)
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    per_dim = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, sd), torch.distributions.Normal(0.0, 1.0)
    )
    np.testing.assert_allclose(c.kl_per_dim, per_dim.mean(0).numpy(), rtol=1e-5)
    assert c.active_units == 2 and 0 <= c.mutual_information <= math.log(100) and c.marginal_kl > -0.05


def test_collapse_runs_through_diagnose_for_a_module_with_a_tuple_of_inputs():
    d = ppvae.diagnose(Conditional(), (X[:60], C[:60]), num_samples=50, **(NO_PARTS | {"collapse": True}))
    assert d.skipped == {} and d.failed == {}
    assert d.collapse.active_units == 2 and d.collapse.kl_per_dim is not None


# Gaps against the exact answers of a correlated linear-Gaussian model (as tests/test_gaps.py does for a VAE): the
# posterior is N(m(x), Σ), so q* in a full-covariance family is the posterior (approximation gap 0) and the best
# mean-field q* falls short by KL_mf = ½ (Σ_d log Λ_dd − log det Λ), Λ = Σ⁻¹, for every x (Bishop 2006, §10.1.2).
G = LinearGaussian(data_dim=6, latent_dim=2, noise=0.5, orthogonal=False, seed=9)
XG, _ = G.sample(20, seed=1)
IDX = [0, 3, 7, 11, 15, 19]


def g_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("latent", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("obs", dist.Normal(z @ G.W.T + G.b, G.sigma).to_event(1), obs=x)


def g_guide(family: str):
    """A spoiled amortized guide of the given family: means shrunk to 0.7 m(x), covariance widened."""

    def guide(x):
        mean, cov = G.posterior(x)
        loc = (0.7 * mean).float()
        sd = cov.diagonal().sqrt().float()
        with pyro.plate("data", x.shape[0]):
            if family == "normal":
                pyro.sample("latent", dist.Normal(loc, 1.5 * sd).to_event(1))
            elif family == "mvn":
                pyro.sample("latent", dist.MultivariateNormal(loc, (2 * cov).float()))
            else:
                pyro.sample("latent", dist.LowRankMultivariateNormal(loc, 0.1 * torch.ones(2, 1), 2 * sd**2))

    return guide


@pytest.mark.parametrize("family", ["normal", "mvn", "lowrank"])
def test_gaps_of_a_function_pair_against_the_closed_form(family):
    from ppvae.diagnostics.gaps import inference_gaps

    g = inference_gaps(g_model, XG, guide=g_guide(family), index=IDX, steps=300, lr=0.02, num_particles=16,
                       num_samples=4000, seed=0)  # fmt: skip
    mean, cov = G.posterior(XG[IDX])
    log_px = G.log_px(XG[IDX]).numpy()
    lam = torch.linalg.inv(cov)
    kl_mf = 0.5 * (lam.diagonal().log().sum() - torch.logdet(lam)).item() if family == "normal" else 0.0
    assert g.converged
    np.testing.assert_allclose(g.log_px, log_px, atol=0.02)
    np.testing.assert_allclose(g.approximation, kl_mf, atol=0.02)
    np.testing.assert_allclose(g.elbo_local, log_px - kl_mf, atol=0.03)
    # The amortized guide's ELBO: log p(x) − KL(q ‖ p(z | x)), within 4 Monte Carlo standard errors sd(lw) / √S,
    # sd(lw)² = ½ tr((Lᵀ Λ L − I)²) + δᵀ Λ Σ_q Λ δ (tests/test_gaps.py).
    q_cov = {"normal": (2.25 * cov.diagonal()).diag(), "mvn": 2 * cov}.get(family)
    if q_cov is None:
        q_cov = 0.01 * torch.ones(2, 2, dtype=cov.dtype) + (2 * cov.diagonal()).diag()
    kl = kl_divergence(MultivariateNormal(0.7 * mean, q_cov), MultivariateNormal(mean, cov)).numpy()
    chol = torch.linalg.cholesky(q_cov)
    spread = chol.T @ lam @ chol - torch.eye(2, dtype=cov.dtype)
    delta = -0.3 * mean
    var = 0.5 * torch.trace(spread @ spread) + torch.einsum("kd,de,ef,fg,kg->k", delta, lam, q_cov, lam, delta)
    assert (np.abs(g.elbo_amortized - (log_px - kl)) < 4 * np.sqrt(var.numpy() / 4000)).all()
    # Their mean: 4 standard errors of the mean of the amortized ELBOs, plus q*'s tolerance above.
    tol = 4 * np.sqrt(var.numpy().sum() / 4000) / len(IDX) + 0.03
    assert g.amortization.mean() == pytest.approx((kl - kl_mf).mean(), abs=tol)


def test_gaps_of_a_family_ppvae_cannot_refit_are_skipped_with_the_family_named():
    def laplace_guide(x):
        mean, _ = G.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("latent", dist.Laplace(mean.float(), 0.3).to_event(1))

    d = ppvae.diagnose(g_model, XG, guide=laplace_guide, num_samples=50, **(NO_PARTS | {"gaps": True}))
    assert "draws from Laplace" in d.skipped["gaps"] and d.failed == {}
