"""``ppvae.diagnose``: PSIS k̂ per datapoint against known good and bad guides, the report, ArviZ export."""

import json
import math

import numpy as np
import pytest
import torch

import ppvae
from ppvae import arviz_io
from ppvae.diagnostics import importance_ess

from .test_evaluate import GEN, HALVED, X, assert_same_rng_states, exact_vae, lg_model, rng_states, scaled_guide

CHEAP = {"num_gap_points": 5, "gap_steps": 20, "sbc_simulations": 50, "num_reference_points": 1,
         "reference_warmup": 50, "reference_samples": 100}  # fmt: skip


def test_exact_guide_has_small_khat():
    d = ppvae.diagnose(exact_vae(), X, num_samples=1000, collapse=False, gaps=False, sbc=False, reference=False)
    assert (d.khat < 0.5).mean() >= 0.95
    np.testing.assert_allclose(d.ess_per_sample, 1.0, atol=1e-3)  # equal weights
    assert d.share_khat_above == 0.0
    assert d.to_dict()["psis"]["khat_median"] == "-inf"  # constant weights: no tail at all


def test_slightly_wide_guide_has_good_khat():
    """A guide 20% wider than the posterior has bounded weights: the fitted tail gives k̂ < 0.5."""
    guide = scaled_guide(torch.full((4,), 1.2, dtype=torch.float64))
    d = ppvae.diagnose(lg_model, X, guide=guide, num_samples=1000, gaps=False, sbc=False, reference=False)
    assert np.isfinite(d.khat).all()
    assert (d.khat < 0.5).mean() >= 0.9
    assert np.median(d.ess_per_sample) > 0.5


def test_halved_scales_give_large_khat_for_most_datapoints():
    """q narrower than p(z|x) in 3 of 4 dims: the weights' tail has index k = 1 − ... > 0.7 (infinite variance)."""
    d = ppvae.diagnose(lg_model, X, guide=scaled_guide(HALVED), num_samples=1000, gaps=False, sbc=False,
                       reference=False)  # fmt: skip
    assert (d.khat > 0.7).mean() > 0.5
    assert d.khat_threshold == pytest.approx(min(1 - 1 / math.log10(1000), 0.7))
    assert d.share_khat_above > 0.5
    assert np.median(d.ess_per_sample) < 0.3


def test_khat_matches_arviz_directly():
    lw = np.random.default_rng(0).standard_t(3, size=(5, 2000))
    _, k = arviz_io.psis(lw)
    import arviz as az

    for i in range(5):
        _, k_i = az.psislw(lw[i], reff=1.0)
        assert k[i] == pytest.approx(float(k_i))


def test_psis_rows_without_a_tail_and_nan_rows():
    lw = np.zeros((3, 100))
    lw[1] = np.random.default_rng(0).normal(size=100)
    lw[2, 5] = np.nan
    smoothed, k = arviz_io.psis(lw)
    assert k[0] == -np.inf and np.isfinite(k[1]) and np.isnan(k[2])
    np.testing.assert_allclose(np.exp(smoothed[:2]).sum(1), 1.0)


def test_importance_ess():
    assert importance_ess(np.zeros((1, 50)))[0] == pytest.approx(1.0)
    lw = np.full((1, 50), -1e3)
    lw[0, 0] = 0.0  # one weight dominates
    assert importance_ess(lw)[0] == pytest.approx(1 / 50)


@pytest.mark.filterwarnings("ignore:guide head NormalGuide reads")  # the hand-set exact head is rank-deficient
def test_full_diagnosis_of_a_vae_report_and_files(tmp_path):
    d = ppvae.diagnose(exact_vae(), X, num_samples=200, **CHEAP)
    assert d.skipped == {}
    assert d.collapse.active_units == 4 and d.collapse.collapsed_dims == []
    assert abs(d.gaps.summary()["approximation"]) < 0.05  # the guide family holds the exact posterior
    assert d.sbc.ranks.shape == (50, 4) and d.reference.draws.shape[0] == 1
    assert set(d.seconds) == {"evaluate_psis", "collapse", "gaps", "sbc", "reference"}
    text = d.summary()
    for row in ("ELBO", "log p̂(x) (IWAE_200)", "PSIS k̂", "active units", "amortization gap", "SBC p-value",
                "NUTS reference"):  # fmt: skip
        assert row in text
    info = json.loads(json.dumps(d.to_dict(), allow_nan=False))  # strict JSON
    assert info["evaluation"]["num_samples"] == 200 and info["psis"]["share_above_threshold"] == 0.0
    paths = d.save(tmp_path)
    assert {"json", "netcdf", "khat", "kl_per_dim", "sbc", "reference"} <= set(paths)
    for path in paths.values():
        assert path.exists() and path.stat().st_size > 0
    assert paths["khat"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    idata = arviz_io.load_netcdf(paths["netcdf"])
    np.testing.assert_array_equal(idata.sample_stats["khat"].values, d.khat)  # (datapoint,), no NaN padding
    assert idata.sample_stats["log_weights"].shape == (1, 200, 40)
    assert idata.posterior["z"].shape[-2:] == (1, 4) and "reference_posterior" in idata.groups()


def test_users_own_pair_gets_the_diagnostics_that_apply():
    d = ppvae.diagnose(lg_model, X, guide=scaled_guide(torch.ones(4, dtype=torch.float64)), num_samples=100,
                       sbc=False, **CHEAP)  # fmt: skip
    assert set(d.skipped) == {"collapse", "gaps"}
    assert "ppvae.VAE" in d.skipped["gaps"]
    assert d.reference is not None
    # NUTS on z reproduces the exact posterior that this guide samples from.
    assert np.abs(d.reference.metrics["mean_error_sd"]).max() < 0.5
    assert "skipped" in d.summary()


def test_sbc_of_a_users_pair_through_diagnose():
    def model(x=None, batch_size=None):
        import pyro
        import pyro.distributions as dist

        n = batch_size if x is None else x.shape[0]
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))
            return pyro.sample("x", dist.Normal(z @ GEN.W.T + GEN.b, GEN.sigma).to_event(1), obs=x)

    d = ppvae.diagnose(model, X, guide=scaled_guide(torch.ones(4, dtype=torch.float64)), num_samples=50,
                       collapse=False, gaps=False, reference=False, sbc_simulations=200)  # fmt: skip
    assert d.sbc.p_value() > 1e-3  # exact guide: calibrated (fails with probability ≈ 1e-3)


def test_nan_datapoint_is_reported_not_a_crash():
    def model(x):
        import pyro
        import pyro.distributions as dist

        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))
            loc = torch.where(x[:, :1] > 50, torch.full_like(x, math.nan), z @ GEN.W.T + GEN.b)
            pyro.sample("x", dist.Normal(loc, GEN.sigma, validate_args=False).to_event(1), obs=x)

    x = X.clone()
    x[2, 0] = 100.0
    import pyro

    with pyro.validation_enabled(False):
        d = ppvae.diagnose(model, x, guide=scaled_guide(HALVED), num_samples=50, gaps=False, sbc=False,
                           reference=False)  # fmt: skip
    assert np.isnan(d.khat[2]) and np.isfinite(np.delete(d.khat, 2)).all()
    assert d.to_dict()["evaluation"]["num_nonfinite"] == 1
    assert "nan" not in d.summary().split("PSIS")[1].split("\n")[0]
    assert "non-finite datapoints" in d.summary() and "k̂ not computed" in d.summary()
    json.dumps(d.to_dict(), allow_nan=False)


def test_too_few_samples_for_a_tail_fit_warns():
    with pytest.warns(UserWarning, match="too few for a Pareto tail fit"):
        d = ppvae.diagnose(lg_model, X, guide=scaled_guide(HALVED), num_samples=20, collapse=False, gaps=False,
                           sbc=False, reference=False)  # fmt: skip
    assert np.isinf(d.khat).all() and d.share_khat_above == 1.0


def test_diagnose_leaves_the_callers_rng_state():
    """Every part (evaluate, collapse, gaps, SBC, NUTS reference) seeds copies of the global RNGs, not them."""
    vae = exact_vae()
    torch.manual_seed(7)
    np.random.seed(7)
    before = rng_states()
    cheap = dict(CHEAP, num_gap_points=2, gap_steps=5, sbc_simulations=10, reference_warmup=10, reference_samples=10)
    d = ppvae.diagnose(vae, X[:6], num_samples=30, **cheap)
    assert d.collapse is not None and d.gaps is not None and d.sbc is not None and d.reference is not None
    assert_same_rng_states(before, rng_states())
