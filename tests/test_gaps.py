"""Approximation and amortization gaps against the exact answers of a linear-Gaussian model.

For z ~ N(0, I), x | z ~ N(W z + b, σ² I) a linear VAE whose decoder is the generator has the exact log p(x)
(``GEN.log_px``) and the exact Gaussian posterior N(m(x), Σ) (``GEN.posterior``), so for any Gaussian q:

    L[q] = log p(x) − KL(q ‖ p(z | x)),    lw = log p(x, z) − log q(z),  z ~ q,
    sd(lw)² = ½ tr((Lᵀ Λ L − I)²) + δᵀ Λ Σ_q Λ δ        (Λ = Σ⁻¹, Σ_q = L Lᵀ, δ = m_q − m),

the last being the Monte Carlo spread of the per-sample log-weights: an S-sample ELBO has standard error
sd(lw) / √S, which sets the tolerances below. The best mean-field Gaussian has the exact means and variances
1 / Λ_dd, so its gap is KL_mf = ½ (Σ_d log Λ_dd − log det Λ) for every x (Bishop 2006, PRML §10.1.2).
"""

import copy
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

import ppvae
from ppvae.data import LinearGaussian
from ppvae.diagnostics.gaps import inference_gaps
from ppvae.errors import ConfigError, DataError

# A correlated posterior: |correlation| 0.38, so the best mean-field q falls short by KL = −½ log(1 − ρ²) = 0.08 nats;
# with |ρ| < ½ its importance weights still have finite variance (E w² = 1.33) and its IWAE estimate is accurate.
GEN = LinearGaussian(data_dim=6, latent_dim=2, noise=0.5, orthogonal=False, seed=9)
X, _ = GEN.sample(20, seed=1)
# Orthogonal columns: a diagonal posterior, so a mean-field guide contains it.
ORTH = LinearGaussian(data_dim=6, latent_dim=2, noise=0.5, orthogonal=True, seed=0)
XO, _ = ORTH.sample(20, seed=1)
IDX = [0, 3, 7, 11, 15, 19]
# q* from a nearby start: Adam's steps, learning rate and particles; S for the final estimates.
STEPS, LR, PARTICLES, S = 300, 0.02, 16, 4000


def linear_vae(gen: LinearGaussian, guide: str) -> ppvae.VAE:
    """A VAE with identity encoder features (so the guide head is a linear encoder) and the generator as decoder."""
    vae = ppvae.VAE(
        (gen.data_dim,),
        gen.latent_dim,
        likelihood={"name": "normal", "kwargs": {"scale": gen.sigma}},
        guide=guide,
        encoder={"name": "mlp", "kwargs": {"hidden": []}},
        decoder={"name": "mlp", "kwargs": {"hidden": []}},
    )
    with torch.no_grad():
        vae.decoder.net[0].weight.copy_(gen.W)
        vae.decoder.net[0].bias.copy_(gen.b)
    return vae


def set_encoder(vae: ppvae.VAE, gen: LinearGaussian, shrink: float = 1.0, widen: float = 0.0, jitter: float = 0.0):
    """Set the head so q(z | x) is the best member of its family for every x, then spoil it on purpose.

    Best member: mean (x − b) A (the exact posterior mean, linear in x) and a constant scale: the exact Cholesky
    factor for a fullrank head, the mean-field optimum 1 / √Λ_dd for a normal head. ``shrink`` scales the mean
    weights, ``widen`` is added to the pre-softplus scales, and ``jitter`` puts seeded N(0, jitter²) weights on the
    scale (and correlation) heads, so they depend slightly on x and the head has full rank (q* can reach the whole
    family); with ``jitter=0`` those rows are zero and the head has rank d.
    """
    _, cov = gen.posterior(torch.zeros(1, gen.data_dim))
    a = gen.W.double() @ cov / gen.sigma**2  # (D, d)
    head = vae.guide_head
    full = hasattr(head, "tril_head")
    tril = torch.linalg.cholesky(cov) if full else torch.linalg.inv(cov).diagonal().rsqrt().diag()
    scale = tril.diagonal() - 1e-5  # the head adds a 1e-5 floor after softplus
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.loc_head.weight.copy_(shrink * a.T)
        head.loc_head.bias.copy_(-shrink * gen.b.double() @ a)
        head.scale_head.bias.copy_(scale + torch.log(-torch.expm1(-scale)) + widen)  # softplus⁻¹
        for lin in (head.scale_head, head.tril_head) if full else (head.scale_head,):
            lin.weight.copy_(jitter * torch.randn(lin.weight.shape, generator=noise))
        if full:
            head.tril_head.bias.copy_(tril[1, 0] / tril[1, 1])  # L = diag(σ) U


def amortized_q(vae: ppvae.VAE, x: torch.Tensor) -> MultivariateNormal:
    """The guide's q(z | x) as a float64 MultivariateNormal."""
    with torch.no_grad():
        q = vae.encode(x)
    if isinstance(q, torch.distributions.MultivariateNormal):
        return MultivariateNormal(q.loc.double(), scale_tril=q.scale_tril.double())
    return MultivariateNormal(q.mean.double(), scale_tril=torch.diag_embed(q.stddev.double()))


def exact_posterior(gen: LinearGaussian, x: torch.Tensor) -> MultivariateNormal:
    mean, cov = gen.posterior(x)
    return MultivariateNormal(mean, covariance_matrix=cov)


def lw_sd(q: MultivariateNormal, p: MultivariateNormal) -> np.ndarray:
    """sd of log p(x, z) − log q(z) under z ~ q, per datapoint (closed form, see the module docstring)."""
    lam, tril = p.precision_matrix, q.scale_tril
    m = tril.mT @ lam @ tril - torch.eye(tril.shape[-1], dtype=tril.dtype)
    delta = (q.loc - p.loc).unsqueeze(-1)
    var = 0.5 * (m @ m).diagonal(dim1=-2, dim2=-1).sum(-1) + (delta.mT @ lam @ tril @ tril.mT @ lam @ delta)[..., 0, 0]
    return var.sqrt().numpy()


def kl_mean_field(gen: LinearGaussian) -> float:
    """KL(q* ‖ p(z | x)) of the best diagonal Gaussian: ½ (Σ log Λ_dd − log det Λ), the same for every x."""
    _, cov = gen.posterior(torch.zeros(1, gen.data_dim))
    lam = torch.linalg.inv(cov)
    return float(0.5 * (lam.diagonal().log().sum() - torch.logdet(lam)))


def test_closed_forms_used_as_references():
    assert kl_mean_field(ORTH) < 1e-9 and kl_mean_field(GEN) == pytest.approx(0.0795, abs=1e-4)
    vae = linear_vae(GEN, "fullrank")
    set_encoder(vae, GEN, shrink=0.75, widen=0.3, jitter=0.02)
    x = X[IDX]
    q, p = amortized_q(vae, x), exact_posterior(GEN, x)
    z = q.sample((20000,))
    lw = GEN.log_joint(x.expand(20000, *x.shape), z) - q.log_prob(z)  # (20000, K)
    kl, sd = kl_divergence(q, p).numpy(), lw_sd(q, p)
    # 20000 draws: the mean has se sd/141, the sd a relative se ≈ 1/200 (more for heavy-tailed lw): 4 se margins.
    np.testing.assert_allclose(lw.mean(0).numpy(), GEN.log_px(x).numpy() - kl, atol=4 * sd.max() / 141)
    np.testing.assert_allclose(lw.std(0).numpy(), sd, rtol=0.05)


def test_exact_amortized_posterior_has_no_gaps():
    vae = linear_vae(GEN, "fullrank")
    set_encoder(vae, GEN)
    x = X[IDX]
    assert kl_divergence(amortized_q(vae, x), exact_posterior(GEN, x)).max() < 1e-9
    # The exact encoder reads no feature into the scales: its head has rank 2 of 5 outputs (q* moves only the means).
    with pytest.warns(UserWarning, match="rank 2"):
        g = inference_gaps(vae, X, index=IDX, steps=100, num_samples=1000)
    log_px = GEN.log_px(x).numpy()
    # q = p(z | x): every log-weight equals log p(x), so the S-sample estimates are exact up to float32 rounding.
    np.testing.assert_allclose(g.elbo_amortized, log_px, atol=1e-3)
    np.testing.assert_allclose(g.log_px, log_px, atol=0.01)
    # q* starts at the optimum; the averaged Adam iterate (lr 1e-2) ends within KL ≈ 0.01 nats of it.
    assert (np.abs(g.amortization) < 0.02).all() and (g.approximation < 0.02).all()
    assert (g.approximation >= 0).all() and g.converged


CASES = {  # guide, generator, its data, KL(q* ‖ p(z | x)) of the family's best member
    "fullrank": ("fullrank", GEN, X, 0.0),
    "normal-diagonal-posterior": ("normal", ORTH, XO, 0.0),
    "normal-correlated-posterior": ("normal", GEN, X, kl_mean_field(GEN)),
}


@pytest.mark.parametrize("case", CASES)
def test_gaps_of_a_wrong_encoder_match_the_exact_kls(case):
    """approximation = KL(q* ‖ p), amortization = KL(q ‖ p) − KL(q* ‖ p), with q the encoder's guide.

    Error budget at S = 4000: the amortized ELBO has the closed-form se = sd(lw) / √S (≤ 0.06 here); under q* the
    log-weights have sd |ρ| = 0.38 for the mean-field case (0 when q* = p), so its ELBO has se ≈ 0.006 and its IWAE
    sd ≈ √(χ² / S) ≈ 0.01 (χ² = E_q*[w²] − 1 = 0.33); the averaged Adam iterate leaves KL(q* ‖ best) ≲ 0.005.
    """
    guide, gen, data, kl_best = CASES[case]
    vae = linear_vae(gen, guide)
    set_encoder(vae, gen, shrink=0.75, widen=0.3, jitter=0.02)  # means shrunk by a quarter, scales too wide
    x = data[IDX]
    q, p = amortized_q(vae, x), exact_posterior(gen, x)
    kl, se = kl_divergence(q, p).numpy(), lw_sd(q, p) / math.sqrt(S)
    assert kl.min() > 0.15 and kl.mean() > 0.5 and se.max() < 0.07  # a clear amortization gap, measured sharply
    g = inference_gaps(vae, data, index=IDX, steps=STEPS, lr=LR, num_particles=PARTICLES, num_samples=S)
    log_px = gen.log_px(x).numpy()
    assert g.converged
    # The amortized ELBO is log p(x) − KL(q ‖ p) within 4 closed-form standard errors.
    assert (np.abs(g.elbo_amortized - (log_px - kl)) < 4 * se).all()
    # q* is the family's best member: its ELBO is log p(x) − KL(q* ‖ p).
    np.testing.assert_allclose(g.elbo_local, log_px - kl_best, atol=0.03)
    assert (np.abs(g.amortization - (kl - kl_best)) < 4 * se + 0.03).all()
    np.testing.assert_allclose(g.log_px, log_px, atol=0.01 if kl_best == 0 else 0.05)
    assert g.approximation.mean() == pytest.approx(kl_best, abs=0.015)
    assert (g.approximation >= kl_best / 2).all()


def test_gaps_of_the_optimal_mean_field_encoder_are_unbiased():
    """q is already the best mean-field Gaussian for every x (q* = q): the approximation gap is KL_mf = 0.0795 nats
    and the amortization gap 0, for every datapoint, and log_px is log p(x) up to IWAE's bias −χ²/(2S) = −0.0002.

    Choosing between q and q* by the ELBO of the same draws that give the IWAE picked whichever came out high:
    +0.0075 nats on the mean approximation gap and log_px, 7 standard errors at K = 200, S = 1000. Error budget:
    per datapoint the estimates have sd ≈ 0.016 (lw has sd |ρ| = 0.38 under q*, so an ELBO has se 0.38 / √S),
    0.0012 on the mean of K = 200; from a start at the optimum, Adam at lr 1e-3 moves q* by KL ≲ 1e-4.
    """
    data, _ = GEN.sample(200, seed=5)
    vae = linear_vae(GEN, "normal")
    set_encoder(vae, GEN)
    with pytest.warns(UserWarning, match="rank 2"):  # the exact scales are constant: q* moves only the means
        g = inference_gaps(vae, data, index=range(200), steps=200, lr=1e-3, num_samples=1000)
    assert g.converged
    kl = kl_mean_field(GEN)
    error = g.log_px - GEN.log_px(data).numpy()
    for values, exact in ((g.approximation, kl), (g.amortization, 0.0), (error, 0.0)):
        se = values.std(ddof=1) / math.sqrt(len(values))
        assert se < 0.0015 and abs(values.mean() - exact) < 3 * se


def test_trained_linear_vae_has_small_amortization_gap():
    """The best amortized q of a linear-Gaussian VAE is linear in x with a constant covariance, so a linear encoder
    with a fullrank head can learn it: after training, KL(q ‖ p(z | x)) under the learned decoder is small for every
    x, and the amortization gap must report that KL (not merely be small because q* never left the encoder)."""
    gen = LinearGaussian(data_dim=6, latent_dim=2, noise=0.5, orthogonal=False, seed=0)
    data, _ = gen.sample(1000, seed=2)
    vae = linear_vae(gen, "fullrank")
    vae.decoder.net[0].reset_parameters()  # learn the decoder too
    ppvae.fit(vae, data, epochs=25, batch_size=100, lr=5e-2, progress=False)
    ppvae.fit(vae, data, epochs=15, batch_size=250, lr=2e-3, num_particles=8, progress=False)  # settle
    learned = copy.copy(gen)  # the same linear-Gaussian model with the learned decoder: its exact posterior
    learned.W, learned.b = (t.detach().clone() for t in (vae.decoder.net[0].weight, vae.decoder.net[0].bias))
    x = data[:8]
    q, p = amortized_q(vae, x), exact_posterior(learned, x)
    kl, se = kl_divergence(q, p).numpy(), lw_sd(q, p) / math.sqrt(2000)
    g = inference_gaps(vae, data, index=range(8), steps=200, num_samples=2000)
    assert g.converged
    assert g.amortization.mean() < 0.02 and g.amortization.max() < 0.05
    assert (np.abs(g.amortization - kl) < 4 * se + 0.01).all()
    assert g.approximation.mean() < 0.01
    np.testing.assert_allclose(g.log_px, learned.log_px(x).numpy(), atol=0.01)


def test_summary_and_decomposition():
    vae = linear_vae(GEN, "normal")
    set_encoder(vae, GEN, shrink=0.75, widen=0.3, jitter=0.02)
    g = inference_gaps(vae, X, num_points=5, steps=40, lr=0.02, num_samples=200, seed=3)
    assert len(g.index) == 5 and len(set(g.index)) == 5 and (np.diff(g.index) > 0).all()
    fields = ("log_px", "elbo_amortized", "elbo_local", "approximation", "amortization")
    for name in fields:
        value = getattr(g, name)
        assert value.shape == (5,) and value.dtype == np.float64
    np.testing.assert_allclose(g.approximation + g.amortization, g.log_px - g.elbo_amortized, atol=1e-9)
    np.testing.assert_allclose(g.approximation, g.log_px - g.elbo_local, atol=1e-12)
    s = g.summary()
    assert s["num_datapoints"] == 5 and s["steps"] == 40 and s["num_samples"] == 200 and s["units"] == "nats"
    for name in fields:
        values = getattr(g, name)
        assert s[name] == pytest.approx(values.mean())
        assert s[f"{name}_se"] == pytest.approx(values.std(ddof=1) / math.sqrt(5))
    assert g.approximation.min() >= 0  # the chosen IWAE ≥ its own ELBO ≥ ELBO[q*]
    # more rows than the data has: all of them
    np.testing.assert_array_equal(inference_gaps(vae, X[:3], num_points=10, steps=1, num_samples=2).index, [0, 1, 2])


def test_unconverged_local_optimization_warns():
    vae = linear_vae(GEN, "normal")  # untrained: after 100 steps q* is still nats from its optimum
    with pytest.warns(UserWarning, match="not converged"):
        g = inference_gaps(vae, X, index=IDX, steps=100, lr=2e-2, num_samples=100)
    assert not g.converged and (g.elbo_local < GEN.log_px(X[IDX]).numpy() - kl_mean_field(GEN) - 1.0).any()


def test_index_is_honoured():
    vae = linear_vae(GEN, "fullrank")
    set_encoder(vae, GEN)
    with pytest.warns(UserWarning, match="rank"):
        g = inference_gaps(vae, X, index=torch.tensor([5, -1, 2]), steps=2, num_samples=50)
    np.testing.assert_array_equal(g.index, [5, 19, 2])
    np.testing.assert_allclose(g.elbo_amortized, GEN.log_px(X[[5, 19, 2]]).numpy(), atol=1e-3)


def test_state_is_restored_and_results_reproducible():
    vae = linear_vae(GEN, "fullrank")
    vae.decoder.net[0].bias.requires_grad_(False)
    flags = [p.requires_grad for p in vae.parameters()]
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    g1 = inference_gaps(vae, X, num_points=3, steps=5, num_samples=20, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [p.requires_grad for p in vae.parameters()] == flags and vae.training
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())  # decoder and encoder untouched
    assert len(pyro.get_param_store()) == 0
    vae.eval()
    g2 = inference_gaps(vae, X, guide=vae.guide, num_points=3, steps=5, num_samples=20, seed=7)  # its own guide
    assert not vae.training
    for name in ("index", "log_px", "elbo_amortized", "elbo_local"):
        np.testing.assert_array_equal(getattr(g1, name), getattr(g2, name))


def test_state_is_restored_after_an_error(monkeypatch):
    vae = linear_vae(GEN, "fullrank")
    vae.encoder.requires_grad_(False)
    flags = [p.requires_grad for p in vae.parameters()]
    rng = torch.get_rng_state()

    def broken(z):
        raise RuntimeError("decoder failed")

    monkeypatch.setattr(vae, "decode", broken)
    with pytest.raises(RuntimeError, match="decoder failed"):
        inference_gaps(vae, X, num_points=3, steps=5, num_samples=20)
    assert [p.requires_grad for p in vae.parameters()] == flags and vae.training
    assert torch.equal(torch.get_rng_state(), rng)


def lg_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ GEN.W.T + GEN.b, GEN.sigma).to_event(1), obs=x)


def lg_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def test_user_errors():
    vae = linear_vae(GEN, "normal")
    cheap = {"steps": 4, "num_points": 2, "num_samples": 8, "num_particles": 2}

    class OwnModel(ppvae.VAE):  # a subclass with its own model: not the pair the VAE's local guide is built for
        def model(self, x=None, batch_size=1):
            return super().model(x, batch_size)

    subclassed = linear_vae(GEN, "normal")
    subclassed.__class__ = OwnModel
    # Not the built-in VAE: a function pair, a VAE with another guide and a subclass go to pair_gaps, which re-fits
    # the guide's own (Normal) family at its site z (tested against the closed form in test_any_pair_diagnostics).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4 steps: not converged, and said so
        for pair in ((lg_model, lg_guide), (vae, lg_guide), (subclassed, None)):
            assert len(inference_gaps(pair[0], X, guide=pair[1], **cheap).index) == 2
    for bad in ({"steps": 0}, {"steps": 2.5}, {"steps": True}, {"num_particles": 0}, {"num_samples": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            inference_gaps(vae, X, **bad)
    for lr in (0, -1e-2, float("nan"), float("inf"), "0.01"):
        with pytest.raises(ConfigError, match="lr"):
            inference_gaps(vae, X, lr=lr)
    with pytest.raises(ConfigError, match="num_points"):
        inference_gaps(vae, X, num_points=0)
    with pytest.raises(DataError, match="empty"):
        inference_gaps(vae, torch.empty(0, 6))
    for wrong in (X[:, :5], X[0], X.reshape(20, 2, 3)):
        with pytest.raises(DataError, match=r"\(N, \*\(6,\)\)"):
            inference_gaps(vae, wrong)
    for index in ([20], [-21], [0, 25], []):
        with pytest.raises(ConfigError, match="index"):
            inference_gaps(vae, X, index=index)
    bad = X.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(DataError):
        inference_gaps(vae, bad, index=[4])


def test_a_guide_of_two_local_sites_in_one_plate_gets_its_gaps():
    # Two latents in the data plate, each observed through its own Gaussian: the exact posterior factorizes, the guide
    # below is it, so both gaps are about 0. (The per-datapoint guide opened the plate once per site: Pyro refused.)
    def model(x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(torch.stack([a, b], -1), 0.5).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):  # prior precision 1 + likelihood precision 4
            pyro.sample("a", dist.Normal(0.8 * x[:, 0], 5**-0.5))
            pyro.sample("b", dist.Normal(0.8 * x[:, 1], 5**-0.5))

    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0)) * 1.2
    g = inference_gaps(model, x, guide=guide, index=np.arange(5), steps=100, num_samples=500)
    assert (np.abs(g.amortization) < 0.02).all() and (np.abs(g.approximation) < 0.02).all()
