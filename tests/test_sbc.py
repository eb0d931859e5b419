"""Simulation-based calibration: exact guides pass, biased guides are rejected, VAEs and pairs both work."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvae
from ppvae.data import LinearGaussian
from ppvae.diagnostics.sbc import SBCResult, sbc, sbc_plot

TRUTH = LinearGaussian(data_dim=6, latent_dim=2, noise=0.5, seed=0)
SEED = 1


def make_pair(shift: float = 0.0, sd_factor: float = 1.0):
    """The linear-Gaussian model and its exact posterior as guide (mean shifted by ``shift`` sd, sd scaled)."""

    def model(x=None, batch_size=1):
        n = batch_size if x is None else x.shape[0]
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            return pyro.sample("x", dist.Normal(z @ TRUTH.W.T + TRUTH.b, TRUTH.sigma).to_event(1), obs=x)

    def guide(x=None, batch_size=1):
        mean, cov = TRUTH.posterior(x)
        sd = cov.diagonal().sqrt()
        loc = (mean + shift * sd).float()
        cov = (sd_factor**2 * cov).float()
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=cov))

    return model, guide


def test_exact_guide_is_calibrated():
    model, guide = make_pair()
    result = sbc(model, guide=guide, num_simulations=500, num_draws=99, seed=SEED)
    assert result.ranks.shape == (500, 2)
    assert result.ranks.min() >= 0 and result.ranks.max() <= 99
    assert result.bins == 20 and result.p_values.shape == (2,)
    assert result.p_value() > 0.01, result.summary()
    again = sbc(model, guide=guide, num_simulations=500, num_draws=99, seed=SEED)
    np.testing.assert_array_equal(result.ranks, again.ranks)  # deterministic with the seed


@pytest.mark.parametrize("shift,sd_factor", [(0.5, 1.0), (0.0, 0.5)], ids=["shifted-mean", "halved-sd"])
def test_biased_guide_is_rejected(shift, sd_factor):
    model, guide = make_pair(shift, sd_factor)
    result = sbc(model, guide=guide, num_simulations=500, num_draws=99, seed=SEED)
    assert result.p_value() < 1e-4, result.summary()


def test_summary_and_bonferroni():
    result = SBCResult(ranks=np.zeros((10, 3), dtype=np.int64), num_draws=9, bins=2, p_values=np.array([0.2, 0.1, 1]))
    assert result.p_value() == pytest.approx(0.3)
    summary = result.summary()
    assert summary["latent_dim"] == 3 and summary["num_draws"] == 9 and summary["rank_mean"] == [0.0] * 3


def test_vae_runs():
    vae = ppvae.VAE((6,), 2, likelihood="normal")
    result = sbc(vae, num_simulations=100, num_draws=19, batch_size=32)
    assert result.ranks.shape == (100, 2)
    assert result.ranks.min() >= 0 and result.ranks.max() <= 19
    assert vae.training  # mode restored


def exact_vae() -> ppvae.VAE:
    """A linear VAE whose decoder is the linear-Gaussian truth and whose full-rank guide is its exact posterior."""
    linear = {"name": "mlp", "kwargs": {"hidden": []}}
    vae = ppvae.VAE(
        (6,),
        2,
        likelihood={"name": "normal", "kwargs": {"scale": TRUTH.sigma}},
        guide="fullrank",
        encoder=linear,
        decoder=linear,
    )
    w, b, s2 = TRUTH.W.double(), TRUTH.b.double(), TRUTH.sigma**2
    _, cov = TRUTH.posterior(torch.zeros(1, 6))
    chol = torch.linalg.cholesky(cov)
    gain = cov @ w.T / s2  # posterior mean = gain (x - b)
    head = vae.guide_head
    with torch.no_grad():
        vae.decoder.net[0].weight.copy_(TRUTH.W)
        vae.decoder.net[0].bias.copy_(TRUTH.b)
        head.loc_head.weight.copy_(gain)
        head.loc_head.bias.copy_(-(gain @ b))
        head.scale_head.weight.zero_()
        sigma = chol.diagonal()
        head.scale_head.bias.copy_(torch.log(torch.expm1(sigma - 1e-5)))  # softplus^-1, minus the 1e-5 floor
        head.tril_head.weight.zero_()
        head.tril_head.bias.copy_((chol / sigma[:, None])[1, 0].reshape(1))
    x = torch.randn(4, 6)
    q = vae.encode(x)
    mean, _ = TRUTH.posterior(x)
    torch.testing.assert_close(q.mean.double(), mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q.covariance_matrix.double(), cov.expand(4, 2, 2), atol=1e-4, rtol=1e-4)
    return vae


def test_exact_vae_is_calibrated():
    result = sbc(exact_vae(), num_simulations=500, num_draws=99, seed=SEED)
    assert result.p_value() > 0.01, result.summary()


def test_plot_writes_png(tmp_path):
    model, guide = make_pair()
    result = sbc(model, guide=guide, num_simulations=100, num_draws=19)
    path = sbc_plot(result, tmp_path / "figs" / "sbc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_factor_analysis_module_pair():
    """A module with model/guide methods (the generation-path convention) runs without guide=."""

    class Pair(torch.nn.Module):
        def model(self, x=None, batch_size=1):
            return make_pair()[0](x, batch_size)

        def guide(self, x=None, batch_size=1):
            if x is None:
                return None
            return make_pair()[1](x)

    result = sbc(Pair(), num_simulations=50, num_draws=9)
    assert result.ranks.shape == (50, 2)


def test_guide_sampling_outside_pyro_is_run_once_per_draw():
    """A guide drawing z with torch (a Delta site) would give one draw expanded L times: sbc runs it L times."""
    model, _ = make_pair()

    def guide(x, batch_size=1):
        mean, cov = TRUTH.posterior(x)
        z = mean + torch.randn(x.shape[0], 2, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
        return pyro.sample("z", dist.Delta(z.float(), event_dim=2))

    result = sbc(model, guide=guide, num_simulations=500, num_draws=99, seed=SEED)
    assert result.p_value() > 0.01, result.summary()


def test_model_without_generation_path_raises():
    def model(x, batch_size=1):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ TRUTH.W.T, 1.0).to_event(1), obs=x)

    _, guide = make_pair()
    with pytest.raises(ppvae.ConfigError, match="generation-path convention"):
        sbc(model, guide=guide, num_simulations=20, num_draws=5)
    with pytest.raises(ppvae.ConfigError, match="num_simulations"):
        sbc(make_pair()[0], guide=guide, num_simulations=5)
