"""NUTS reference posteriors against the exact linear-Gaussian posterior, and the guide-vs-reference metrics."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvae
from ppvae.data import LinearGaussian
from ppvae.diagnostics import reference
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


W2 = torch.tensor([[1.0, 0.8], [0.5, 0.7], [-0.3, -0.1], [0.9, 1.0], [0.0, 0.2], [0.4, 0.3]])  # correlating columns


def noisy_model(x, noise):
    """A linear-Gaussian model with a noise scale per datapoint: posteriors of very different widths, correlated."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W2.T, noise[:, None]).to_event(1), obs=x)


def poor_guide(x, noise):
    """The same wrong guess for every datapoint: N((1, -1), 0.3² I), whatever x and its noise."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 0.3).to_event(1))


def exact_noisy_posterior(x, noise):
    """Mean and covariance of p(z | x_k) for a noise scale per datapoint: Σ = (I + WᵀW/s²)⁻¹, μ = Σ Wᵀ(x − b)/s²."""
    w = W2.double()
    prec = torch.eye(2, dtype=torch.float64) + (w.T @ w) / noise.double()[:, None, None] ** 2
    cov = torch.linalg.inv(prec)
    mean = (cov @ (x.double() @ w)[..., None])[..., 0] / noise.double()[:, None] ** 2
    return mean.numpy(), cov.numpy()


def test_many_datapoints_in_one_run_each_match_their_exact_posterior_despite_a_poor_guide():
    # Ten datapoints whose posterior sds span 100×, sampled together and whitened by a guide that is wrong for all
    # of them: every one must still match its own exact posterior (the whitening changes speed, not the target).
    noise = torch.logspace(-2, 0.5, 10)
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(3))
    x = z @ W2.T + noise[:, None] * torch.randn(10, 6, generator=torch.Generator().manual_seed(4))
    ref = reference_posterior(noisy_model, (x, noise), guide=poor_guide, num_points=10, num_warmup=300,
                              num_samples=500, seed=0)  # fmt: skip
    # One run of all ten; those that did not converge in it were sampled again together (a run of their own).
    again = ref.attempts == 2
    assert (ref.run_sizes[~again] == 10).all() and (ref.run_sizes[again] == again.sum()).all()
    assert ref.ess_tail.shape == (10, 2)
    mean, cov = exact_noisy_posterior(x, noise)
    pooled = ref.draws.reshape(10, -1, 2)
    sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    assert ref.converged().all(), ref.summary()
    assert (np.abs(pooled.mean(1) - mean) < 4 * sd / np.sqrt(ref.ess)).all()
    np.testing.assert_allclose(pooled.std(1), sd, rtol=0.12)
    corr = [np.corrcoef(p.T)[0, 1] for p in pooled]
    np.testing.assert_allclose(corr, cov[:, 0, 1] / sd.prod(1), atol=0.08)
    np.testing.assert_allclose(ref.metrics["sd_ratio"], 0.3 / sd, rtol=0.15)  # the guide's 0.3 against the truth


def test_datapoints_that_do_not_converge_are_sampled_again_and_say_so(monkeypatch):
    # With R-hat < 0.5 required no run can pass: every datapoint fails its first run and is sampled a second time.
    monkeypatch.setattr(reference, "RHAT_MAX", 0.5)
    monkeypatch.setattr(reference, "ESS_MIN", 100.0)  # 2 chains × 60 draws could pass it
    ref = reference_posterior(exact_vae(), X, index=[0, 5, 9], num_warmup=50, num_samples=60, num_guide_samples=50)
    assert (ref.attempts == 2).all() and not ref.converged().any()
    assert [p["attempts"] for p in ref.summary()["points"]] == [2, 2, 2]
    assert ref.draws.shape == (3, 2, 60, 2)
    one = reference_posterior(exact_vae(), X, index=[0, 5], num_warmup=200, num_samples=400, points_per_run=1)
    assert (one.run_sizes == 1).all()


def test_runs_too_short_for_the_ess_criterion_are_not_sampled_again():
    # 2 chains × 60 draws cannot give a bulk ESS of 400 (ArviZ's bound: 120 log10 120 = 249), nor could a second
    # run: the first one is kept, unconverged.
    ref = reference_posterior(exact_vae(), X, index=[0, 5, 9], num_warmup=50, num_samples=60, num_guide_samples=50)
    assert (ref.attempts == 1).all() and not ref.converged().any()
    assert reference._ess_bound(120) <= reference.ESS_MIN < reference._ess_bound(300)


def test_a_quick_run_of_2_by_150_draws_is_still_sampled_again(monkeypatch):
    # 300 draws can show a bulk ESS up to 743 (antithetic NUTS chains often exceed N), so a failed quick run may pass
    # a second time and is retried; R-hat < 0.5 makes every first run fail.
    monkeypatch.setattr(reference, "RHAT_MAX", 0.5)
    ref = reference_posterior(exact_vae(), X, index=[0], num_warmup=50, num_samples=150, num_guide_samples=50)
    assert (ref.attempts == 2).all()


def test_constrained_latents_of_several_datapoints_match_the_conjugate_posterior():
    # Gamma–Poisson per datapoint: z_k ~ Gamma(2, 1), five counts ~ Poisson(z_k); p(z_k | x_k) = Gamma(2 + Σx, 1 + 5).
    # NUTS samples log z (Pyro's transform and its Jacobian) for eight datapoints at once.
    rates = torch.linspace(0.5, 20.0, 8)[:, None].expand(8, 5)
    counts = torch.poisson(rates, generator=torch.Generator().manual_seed(0))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Poisson(z[:, None]).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.LogNormal(x.mean(1).clamp_min(0.5).log(), 0.5))

    ref = reference_posterior(model, counts, guide=guide, num_points=8, num_warmup=300, num_samples=600, seed=2)
    shape, rate = 2 + counts.sum(1).numpy(), 6.0
    pooled = ref.draws.reshape(8, -1)
    np.testing.assert_allclose(pooled.mean(1), shape / rate, rtol=0.05)
    np.testing.assert_allclose(pooled.std(1), np.sqrt(shape) / rate, rtol=0.12)
    assert (pooled > 0).all() and ref.converged().all()


def test_a_model_written_for_minibatches_gets_its_untempered_posterior():
    # pyro.plate("data", 16, subsample=...) scales each site by 16/len(x) for training; the reference must sample
    # p(z_k | x_k) itself, not that posterior tempered by the scale (which also changed with the run's size).
    w = torch.tensor([[1.0, 0.5], [0.2, -0.7], [0.3, 0.3]])

    def model(x):
        with pyro.plate("data", 16, subsample=torch.arange(x.shape[0])):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T, 0.5).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", 16, subsample=torch.arange(x.shape[0])):
            pyro.sample("z", dist.Normal(x[:, :2] * 0.5, 0.3).to_event(1))

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    sd = np.sqrt(np.diag(np.linalg.inv(np.eye(2) + w.numpy().T @ w.numpy() / 0.25)))  # the same for every x
    for per_run in (4, 1):
        ref = reference_posterior(model, x, guide=guide, num_points=4, num_warmup=150, num_samples=300,
                                  num_guide_samples=200, points_per_run=per_run)  # fmt: skip
        np.testing.assert_allclose(ref.draws.reshape(4, -1, 2).std(1) / sd, 1.0, atol=0.15)


def test_whitening_floors_a_coordinate_the_guide_does_not_vary_in_both_of_its_forms():
    # A point-mass coordinate (sd 0) gets a scale of 1e-3 of the median sd, not 0 (NUTS could not move it) — in the
    # dense form (L > 2D draws, the covariance's Cholesky factor) as in the diagonal one.
    from ppvae.diagnostics.nuts_batch import whitening

    g = torch.Generator().manual_seed(0)
    for num in (200, 4):  # dense, then diagonal (L ≤ 2D)
        draws = torch.randn(num, 3, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 0.0])
        white = whitening(draws)
        scales = torch.linalg.norm(white.tril, dim=-1)  # each coordinate's sd under the whitening: row norms
        median = draws.std(0).median()
        assert (scales[:, 3] >= 0.999e-3 * median).all() and (scales[:, 3] <= 1.01e-3 * median).all(), scales
        np.testing.assert_allclose(scales[:, :3], draws.std(0)[:, :3], rtol=1e-4)
        u = draws[0]
        torch.testing.assert_close(white(white.inverse(u)), u)


def test_the_laplace_whitening_of_gaussian_posteriors_is_their_exact_mean_and_covariance():
    # Each linear-Gaussian posterior is its own Laplace approximation: from a guide wrong for every datapoint (mean
    # (1, -1), sd 0.3, against sds from 0.007 to 0.7) the refined whitening must be each datapoint's exact Gaussian.
    from ppvae.diagnostics.nuts_batch import guide_particles, laplace_whitening, model_layout, pair_potential, whitening

    pyro.set_rng_seed(0)
    noise = torch.logspace(-2, 0.5, 10)
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(3))
    x = z @ W2.T + noise[:, None] * torch.randn(10, 6, generator=torch.Generator().manual_seed(4))
    layout, start = model_layout(noisy_model, poor_guide, (x, noise), "data")
    guide_white = whitening(guide_particles(noisy_model, poor_guide, (x, noise), layout, 100))
    potential = pair_potential(noisy_model, (x, noise), layout, start, None)
    white = laplace_whitening(potential, layout, guide_white, max_iter=20)
    mean, cov = exact_noisy_posterior(x, noise)
    sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    np.testing.assert_allclose(white.loc.numpy(), mean, atol=1e-3 * sd.max(), rtol=0)
    np.testing.assert_allclose((white.loc.numpy() - mean) / sd, 0.0, atol=1e-3)
    got = (white.tril @ white.tril.mT).double().numpy()
    np.testing.assert_allclose(got / (sd[:, :, None] * sd[:, None, :]), cov / (sd[:, :, None] * sd[:, None, :]),
                               atol=1e-3)  # fmt: skip
    assert np.abs(guide_white.loc.numpy() - mean).max() > 0.5  # the guide's whitening was far from it


def test_a_datapoint_without_a_laplace_approximation_keeps_the_guide_whitening():
    # Datapoint 1's potential is flat in its second coordinate (no mode, a singular Hessian): it keeps the guide's
    # whitening, while datapoint 0, a Gaussian N((2, -1), diag(0.5², 0.25²)), gets its own.
    from ppvae.diagnostics.nuts_batch import Layout, Whitening, laplace_whitening

    identity = torch.distributions.transforms.identity_transform
    layout = Layout(("z",), {"z": torch.Size([2, 2])}, {"z": 0}, {"z": identity}, {"z": 1})
    guide_white = Whitening(torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2).clone())
    centre, scale = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.25])

    def potential(params):
        z = params["z"]
        return 0.5 * (((z[0] - centre) / scale) ** 2).sum() + 0.5 * (z[1, 0] - 3.0) ** 2

    white = laplace_whitening(potential, layout, guide_white, max_iter=20)
    torch.testing.assert_close(white.loc[0], centre, atol=1e-4, rtol=0)
    torch.testing.assert_close(white.tril[0], torch.diag(scale), atol=1e-4, rtol=0)
    torch.testing.assert_close(white.loc[1], guide_white.loc[1])
    torch.testing.assert_close(white.tril[1], guide_white.tril[1])
    assert laplace_whitening(potential, layout, guide_white, max_iter=0) is guide_white


def test_one_datapoint_without_a_finite_hessian_leaves_the_others_their_laplace_whitening():
    # Datapoint 1's potential has an infinite second derivative where Newton starts (|z|^1.5 at 0): it is frozen and
    # keeps the guide's whitening, and datapoints 0 and 2, Gaussians far from the guide's mean, still get their own.
    from ppvae.diagnostics.nuts_batch import Layout, Whitening, laplace_whitening

    identity = torch.distributions.transforms.identity_transform
    layout = Layout(("z",), {"z": torch.Size([3, 2])}, {"z": 0}, {"z": identity}, {"z": 1})
    guide_white = Whitening(torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2).clone())
    centre = torch.tensor([[6.0, -1.0], [0.0, 0.0], [-9.0, 2.0]])
    scale = torch.tensor([[0.5, 2.0], [1.0, 1.0], [0.05, 0.3]])

    def potential(params):
        z = params["z"]
        gauss = 0.5 * (((z - centre) / scale)[[0, 2]] ** 2).sum()
        return gauss + 0.5 * (z[1] ** 2).sum() + z[1, 0].abs() ** 1.5

    white = laplace_whitening(potential, layout, guide_white, max_iter=20)
    for k in (0, 2):
        torch.testing.assert_close(white.loc[k], centre[k], atol=1e-3 * float(scale[k].min()), rtol=0)
        torch.testing.assert_close(white.tril[k], torch.diag(scale[k]), atol=1e-3 * float(scale[k].max()), rtol=0)
    torch.testing.assert_close(white.loc[1], guide_white.loc[1])
    torch.testing.assert_close(white.tril[1], guide_white.tril[1])
