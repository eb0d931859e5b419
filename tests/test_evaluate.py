"""``ppvae.evaluate`` against the exact linear-Gaussian answers, on a ppvae.VAE and on a user's own pair."""

import importlib
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvae
from ppvae.data import LinearGaussian
from ppvae.errors import ConfigError, DataError

GEN = LinearGaussian(data_dim=8, latent_dim=4, noise=0.5, orthogonal=True, seed=0)
X, _ = GEN.sample(40, seed=1)
EXACT = GEN.log_px(X).numpy()
evaluate_mod = importlib.import_module("ppvae.diagnostics.evaluation")
HALVED = torch.tensor([0.5, 0.5, 0.5, 1.0], dtype=torch.float64)  # guide sd factor per latent dimension


def exact_vae() -> ppvae.VAE:
    """A linear VAE whose decoder is the generator and whose encoder outputs the exact (diagonal) posterior."""
    vae = ppvae.VAE(
        (8,),
        4,
        prior="normal",
        likelihood={"name": "normal", "kwargs": {"scale": GEN.sigma}},
        guide="normal",
        encoder={"name": "mlp", "kwargs": {"hidden": []}},
        decoder={"name": "mlp", "kwargs": {"hidden": []}},
    )
    w, b = GEN.W.double(), GEN.b.double()
    _, cov = GEN.posterior(X[:1])
    gain = w @ cov / GEN.sigma**2  # posterior mean = (x − b) @ gain
    sd = cov.diagonal().sqrt()
    with torch.no_grad():
        vae.decoder.net[0].weight.copy_(GEN.W)
        vae.decoder.net[0].bias.copy_(GEN.b)
        vae.guide_head.loc_head.weight.copy_(gain.T)
        vae.guide_head.loc_head.bias.copy_(-(b @ gain))
        vae.guide_head.scale_head.weight.zero_()
        vae.guide_head.scale_head.bias.copy_(torch.log(torch.expm1(sd - 1e-5)))  # softplus⁻¹
    return vae


def lg_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(4, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ GEN.W.T.to(x.dtype) + GEN.b.to(x.dtype), GEN.sigma).to_event(1), obs=x)


def scaled_guide(factor: torch.Tensor):
    """q(z | x) = N(exact mean, diag(factor² · exact variances)): exact for factor = 1."""

    def guide(x):
        mean, cov = GEN.posterior(x)
        sd = cov.diagonal().sqrt() * factor
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean.to(x.dtype), sd.to(x.dtype)).to_event(1))

    return guide


def exact_kl(factor: torch.Tensor) -> float:
    """KL(q ‖ p(z | x)) for q with sds scaled by ``factor`` and the exact mean (the same for every x), nats."""
    f2 = factor**2
    return float(0.5 * (f2 - 1 - torch.log(f2)).sum())


def test_exact_guide_of_a_vae_recovers_exact_log_px():
    result = ppvae.evaluate(exact_vae(), X, num_samples=1000)
    assert result.log_px.shape == result.elbo.shape == (40,)
    np.testing.assert_allclose(result.log_px, EXACT, atol=0.05)
    # With the exact posterior every log-weight equals log p(x): the ELBO is tight too.
    np.testing.assert_allclose(result.elbo, EXACT, atol=1e-3)
    np.testing.assert_allclose(result.reconstruction - result.kl, result.elbo, atol=1e-4)
    assert np.abs(result.inference_gap).max() < 1e-3
    assert result.discrete is False and result.bits_per_dim is None


def test_user_pair_with_exact_guide_recovers_exact_log_px():
    result = ppvae.evaluate(lg_model, X, guide=scaled_guide(torch.ones(4, dtype=torch.float64)), num_samples=1000)
    np.testing.assert_allclose(result.log_px, EXACT, atol=0.05)
    assert result.reconstruction is None and result.kl is None  # a user pair has no ELBO split
    assert "reconstruction" not in result.summary() and "bits_per_dim" not in result.summary()


def test_halved_scales_inference_gap_matches_exact_kl():
    kl = exact_kl(HALVED)  # 3 · 0.5 (0.25 − 1 − log 0.25) ≈ 0.954 nats
    result = ppvae.evaluate(lg_model, X[:20], guide=scaled_guide(HALVED), num_samples=10_000, keep_log_weights=True)
    # ELBO = log p(x) − KL exactly in expectation; its Monte Carlo error over 20 × 10⁴ draws is ≈ 0.003.
    assert abs(np.mean(EXACT[:20] - result.elbo) - kl) < 0.02
    # IWAE tightens the bound from below: 0 < KL − gap, and a narrow guide leaves a bias that shrinks with S.
    gap = result.inference_gap.mean()
    assert kl - 0.15 < gap < kl + 0.01
    # Each p̂ is unbiased, so E log p̂ ≤ log p(x); single datapoints may land above it (heavy-tailed weights).
    assert np.mean(result.log_px - EXACT[:20]) < 0.02
    assert result.log_weights.shape == (20, 10_000) and result.log_weights.dtype == np.float32


def test_summary_means_and_standard_errors():
    result = ppvae.evaluate(lg_model, X, guide=scaled_guide(HALVED), num_samples=50, split="test")
    s = result.summary()
    assert s["split"] == "test" and s["num_datapoints"] == 40 and s["num_samples"] == 50
    assert s["elbo"] == pytest.approx(result.elbo.mean())
    assert s["elbo_se"] == pytest.approx(result.elbo.std(ddof=1) / math.sqrt(40))
    assert s["log_px"] >= s["elbo"] and "IWAE_50" in s["estimator"] and s["num_nonfinite"] == 0


def test_chunking_does_not_change_the_result(monkeypatch):
    vae = exact_vae()
    whole = ppvae.evaluate(vae, X, num_samples=64, seed=3)
    monkeypatch.setattr(evaluate_mod, "_CHUNK_ELEMENTS", 8 * 5 * 2)  # ≈ 2 particles per chunk of 7 rows
    chunked = ppvae.evaluate(vae, X, num_samples=64, batch_size=7, seed=3, keep_log_weights=True)
    assert chunked.log_weights.shape == (40, 64)
    np.testing.assert_allclose(chunked.elbo, whole.elbo, atol=1e-3)  # exact guide: every weight is log p(x)
    # And with a non-exact guide, chunked particle blocks are joined before the logsumexp.
    guide = scaled_guide(HALVED)
    lw = ppvae.evaluate(lg_model, X, guide=guide, num_samples=30, batch_size=7, keep_log_weights=True).log_weights
    assert lw.shape == (40, 30) and np.isfinite(lw).all()


def test_same_seed_same_numbers():
    a = ppvae.evaluate(lg_model, X, guide=scaled_guide(HALVED), num_samples=20, seed=5)
    b = ppvae.evaluate(lg_model, X, guide=scaled_guide(HALVED), num_samples=20, seed=5)
    np.testing.assert_array_equal(a.log_px, b.log_px)


def rng_states() -> tuple:
    """The global RNG states a library call could change: torch's, NumPy's and Python's."""
    import random

    numpy_state = np.random.get_state()
    return torch.get_rng_state(), numpy_state[1].copy(), numpy_state[2:], random.getstate()


def assert_same_rng_states(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]


def test_a_seed_leaves_the_callers_rng_state_and_gives_the_numbers_of_a_global_reseed():
    """evaluate(seed=5) samples as after pyro.set_rng_seed(5), but on copies: the global RNGs are as they were."""
    torch.manual_seed(123)
    np.random.seed(123)
    before = rng_states()
    seeded = ppvae.evaluate(lg_model, X, guide=scaled_guide(HALVED), num_samples=20, seed=5)
    assert_same_rng_states(before, rng_states())
    pyro.set_rng_seed(5)
    reseeded = ppvae.evaluate(lg_model, X, guide=scaled_guide(HALVED), num_samples=20, seed=None)
    np.testing.assert_array_equal(seeded.log_px, reseeded.log_px)
    np.testing.assert_array_equal(seeded.elbo, reseeded.elbo)


def test_fast_path_of_a_vae_equals_its_pyro_pair():
    """evaluate(vae) skips tracing; the same VAE seen as a plain Pyro pair must give the same estimates."""
    torch.manual_seed(0)
    vae = ppvae.VAE((8,), 4, likelihood={"name": "normal", "kwargs": {"scale": 0.5}}, guide="fullrank")
    fast = ppvae.evaluate(vae, X, num_samples=2000)
    traced = ppvae.evaluate(vae.model, X, guide=vae.guide, num_samples=2000)
    assert fast.reconstruction is not None and traced.reconstruction is None
    se = np.sqrt(2) * fast.elbo.std() / np.sqrt(40)
    assert abs(fast.elbo.mean() - traced.elbo.mean()) < 4 * se + 0.05


def test_bits_per_dim_for_a_discrete_likelihood():
    x = (torch.rand(30, 12, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    torch.manual_seed(0)
    vae = ppvae.VAE((12,), 2, likelihood="bernoulli")
    result = ppvae.evaluate(vae, x, num_samples=20)
    assert result.discrete is True
    np.testing.assert_allclose(result.bits_per_dim, -result.log_px / (math.log(2) * 12))
    # A Bernoulli probability is at most 1, so log p̂(x) ≤ 0 and bits/dim ≥ 0.
    assert (result.log_px <= 0).all() and result.summary()["bits_per_dim"] > 0


@pytest.mark.parametrize("bad", [1, 0, -5, 2.5, True, "10"])
def test_fewer_than_two_samples_is_refused(bad):
    with pytest.raises(ConfigError, match="num_samples"):
        ppvae.evaluate(exact_vae(), X, num_samples=bad)


def test_empty_data_is_refused():
    with pytest.raises(DataError, match="empty"):
        ppvae.evaluate(exact_vae(), torch.zeros(0, 8), num_samples=10)


def test_nonfinite_log_weights_are_reported_per_datapoint():
    """A datapoint whose model log-density is NaN is flagged, not a crash, and left out of the means."""

    def model(x):
        bad = x[:, :1] > 50  # (N, 1): the model breaks on this datapoint only
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))
            loc = torch.where(bad, torch.full_like(x, math.nan), z @ GEN.W.T + GEN.b)
            pyro.sample("x", dist.Normal(loc, GEN.sigma, validate_args=False).to_event(1), obs=x)

    x = X.clone()
    x[3, 0] = 100.0
    with pyro.validation_enabled(False):
        result = ppvae.evaluate(model, x, guide=scaled_guide(HALVED), num_samples=20)
    np.testing.assert_array_equal(result.nonfinite, [3])
    assert np.isnan(result.log_px[3]) and np.isfinite(np.delete(result.log_px, 3)).all()
    s = result.summary()
    assert s["num_nonfinite"] == 1 and math.isfinite(s["log_px"])
    assert s["log_px"] == pytest.approx(np.delete(result.log_px, 3).mean())


def test_global_latent_is_refused_with_the_convention():
    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(torch.zeros(8) + shift[..., None], 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("shift", dist.Normal(0.0, 1.0))

    with pytest.raises(ConfigError, match="outside the plate 'data'"):
        ppvae.evaluate(model, X, guide=guide, num_samples=5)


def test_data_plate_name_is_configurable():
    def model(x):
        with pyro.plate("rows", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ GEN.W.T + GEN.b, GEN.sigma).to_event(1), obs=x)

    def guide(x):
        mean, cov = GEN.posterior(x)
        with pyro.plate("rows", x.shape[0]):
            pyro.sample("z", dist.Normal(mean.float(), cov.diagonal().sqrt().float()).to_event(1))

    with pytest.raises(ConfigError, match="data_plate"):
        ppvae.evaluate(model, X, guide=guide, num_samples=5)
    result = ppvae.evaluate(model, X, guide=guide, num_samples=200, data_plate="rows")
    np.testing.assert_allclose(result.log_px, EXACT, atol=0.05)


def test_saved_and_reloaded_vae_evaluates_identically(tmp_path):
    vae = exact_vae()
    ppvae.save(vae, tmp_path / "model.pt")
    loaded = ppvae.load(tmp_path / "model.pt")
    np.testing.assert_array_equal(
        ppvae.evaluate(vae, X, num_samples=30, seed=1).log_px, ppvae.evaluate(loaded, X, num_samples=30, seed=1).log_px
    )


def test_corrupt_or_missing_run_is_a_clear_error(tmp_path):
    from ppvae.errors import CheckpointError

    with pytest.raises(CheckpointError):
        ppvae.load(tmp_path / "missing.pt")
    ppvae.save(exact_vae(), tmp_path / "model.pt")
    blob = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError):
        ppvae.load(tmp_path / "model.pt")


def test_vectorize_false_is_honoured_for_a_vae():
    """A ppvae.VAE with vectorize=False goes through Pyro's traces one particle at a time: the same estimator."""
    vae = exact_vae()
    a = ppvae.evaluate(vae, X, num_samples=200, seed=0)
    b = ppvae.evaluate(vae, X, num_samples=200, seed=0, vectorize=False)
    assert a.particles == "vectorized" and b.particles.startswith("sequential")
    np.testing.assert_allclose(b.log_px, a.log_px, atol=1e-3)  # the exact guide: every weight is log p(x)


def _masked_pair(kind):
    """A Bernoulli observation of 6 binary elements, some masked out (by the distribution or by a handler), or not."""
    from pyro import poutine

    keep = torch.tensor([True, True, True, True, False, False])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pixel = dist.Bernoulli(logits=z[..., None].expand(*z.shape, 6))
            if kind == "mask()":
                pyro.sample("x", pixel.mask(keep).to_event(1), obs=x)
            elif kind == "poutine.mask":
                with poutine.mask(mask=x[:, 0] > 0.5):  # whole datapoints left out, as a missing-data mask does
                    pyro.sample("x", pixel.to_event(1), obs=x)
            elif kind == "mask(True)":
                pyro.sample("x", pixel.mask(True).to_event(1), obs=x)
            else:
                pyro.sample("x", pixel.to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    return model, guide


@pytest.mark.parametrize(
    "kind,masked", [("mask()", ("x",)), ("poutine.mask", ("x",)), ("mask(True)", ()), ("none", ())]
)
def test_masked_observations_give_no_bits_per_dim_and_say_so(kind, masked):
    # A pair that masks elements scores a probability of the ones it keeps: dividing by all 6 into bits/dim would
    # understate it, and ranking it against a model of every element would be wrong.
    from ppvae.compare.cells import group_of

    model, guide = _masked_pair(kind)
    x = (torch.rand(40, 6, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    ev = ppvae.evaluate(model, x, guide=guide, num_samples=20, seed=0)
    assert ev.masked == masked and ev.discrete
    assert (ev.bits_per_dim is None) == bool(masked)
    assert ("masked_sites" in ev.summary()) == bool(masked)
    splits = ppvae.data.load("digits", binarize="static")
    group = group_of(splits, ev.discrete, masked=ev.masked, mask_key=ev.mask_key, label="mine")
    assert (f"probability of the elements its masks keep (x masked; masks {ev.mask_key})" in group) == bool(masked)
    assert (group == group_of(splits, True)) != bool(masked)


def test_a_mask_only_later_batches_have_is_found_and_a_deterministic_site_is_no_observation():
    from pyro import poutine

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            probs = pyro.deterministic("probs", torch.sigmoid(z)[..., None].expand(*z.shape, 6))
            with poutine.mask(mask=x[:, 0] >= 0):  # rows whose first entry is missing (−1) are left out
                pyro.sample("x", dist.Bernoulli(probs).to_event(1), obs=x.clamp(min=0))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    x = (torch.rand(600, 6, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    ev = ppvae.evaluate(model, x, guide=guide, num_samples=4, seed=0)
    assert ev.masked == () and ev.discrete and ev.bits_per_dim is not None  # pyro.deterministic is not observed
    x[400:, 0] = -1.0  # missing entries only after the first batch of 256 rows
    ev = ppvae.evaluate(model, x, guide=guide, num_samples=4, seed=0)
    assert ev.masked == ("x",) and ev.bits_per_dim is None and ev.mask_key is None


def test_pairs_whose_masks_keep_the_same_elements_share_a_group():
    from ppvae.compare.cells import group_of

    splits = ppvae.data.load("digits", binarize="static")
    x = (torch.rand(40, 6, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    def scored(kind, seed):
        model, guide = _masked_pair(kind)
        return ppvae.evaluate(model, x, guide=guide, num_samples=4, seed=seed)

    first, second, other = scored("mask()", 0), scored("mask()", 1), scored("poutine.mask", 0)
    key = {ev.mask_key for ev in (first, second)}
    assert len(key) == 1 and None not in key and other.mask_key not in key | {None}
    groups = [group_of(splits, ev.discrete, masked=ev.masked, mask_key=ev.mask_key, label=label) for ev, label in
              ((first, "a"), (second, "b"), (other, "c"))]  # fmt: skip
    assert groups[0] == groups[1] != groups[2] and "masks" in groups[0]
    # the same masks on a density: never ranked with the probabilities
    density = group_of(splits, False, masked=first.masked, mask_key=first.mask_key)
    assert density != groups[0] and "density of the elements" in density and "probability of" in groups[0]
