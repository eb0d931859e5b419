"""The ArviZ layer: model comparison with paired standard errors, InferenceData layout, NetCDF round trip."""

import numpy as np
import pytest

from ppvae.diagnostics import arviz_io


def test_compare_gives_paired_differences_and_standard_errors():
    rng = np.random.default_rng(0)
    a = rng.normal(-90.0, 5.0, size=300)  # per-datapoint log p̂ of three models on the same test points
    b = a - 0.2 + 0.1 * rng.normal(size=300)  # slightly worse, almost perfectly paired
    c = a - 0.1 + 3.0 * rng.normal(size=300)  # close on average, unpaired noise
    table = arviz_io.compare({"a": a, "b": b, "c": c})
    assert list(table.index) == ["a", "c", "b"] and list(table["rank"]) == [0, 1, 2]
    assert table.loc["a", "elpd"] == pytest.approx(a.sum())
    assert table.loc["b", "elpd_diff"] == pytest.approx((a - b).sum())
    # Paired: the se of the difference is far below the models' own se (between-datapoint spread cancels).
    assert table.loc["b", "dse"] == pytest.approx(np.sqrt(300) * np.std(a - b), rel=0.01)
    assert table.loc["b", "dse"] < 0.05 * table.loc["b", "se"]
    assert table.loc["c", "dse"] == pytest.approx(np.sqrt(300) * np.std(a - c), rel=0.01)
    assert table.loc["a", "dse"] == 0.0


def test_compare_refuses_different_test_points_and_nonfinite_scores():
    with pytest.raises(ValueError, match="same datapoints"):
        arviz_io.compare({"a": np.zeros(3), "b": np.zeros(4)})
    with pytest.raises(ValueError, match="finite"):
        arviz_io.compare({"a": np.zeros(3), "b": np.array([0.0, np.nan, 0.0])})
    with pytest.raises(ValueError, match="two models"):
        arviz_io.compare({"a": np.zeros(3)})


def test_per_datapoint_values_are_not_padded_next_to_log_weights(tmp_path):
    lw = np.random.default_rng(1).normal(size=(1, 50, 7))  # (chain, draw = S, datapoint)
    idata = arviz_io.to_inference_data(
        sample_stats={"log_weights": lw},
        per_datapoint={"khat": np.linspace(0, 1, 7)},
        dims={"log_weights": ["datapoint"]},
        attrs={"num_samples": 50},
    )
    path = arviz_io.save_netcdf(idata, tmp_path / "sub" / "x.nc")
    back = arviz_io.load_netcdf(path)
    assert back.sample_stats["khat"].dims == ("datapoint",)
    np.testing.assert_array_equal(back.sample_stats["khat"].values, np.linspace(0, 1, 7))
    np.testing.assert_allclose(back.sample_stats["log_weights"].values, lw)
    assert back.sample_stats.attrs["num_samples"] == 50


def test_rhat_and_ess_of_independent_chains():
    draws = np.random.default_rng(2).normal(size=(4, 1000, 3))
    assert np.all(np.abs(arviz_io.rhat(draws) - 1) < 0.01)
    assert np.all(arviz_io.ess(draws) > 3000)
    stuck = draws.copy()
    stuck[0] += 3.0  # one chain elsewhere
    assert np.all(arviz_io.rhat(stuck) > 1.1)


def test_psis_calls_weights_equal_to_float32_rounding_constant_at_any_magnitude():
    """An exact proposal's float32 log-weights at −1219 nats differ only by float32 steps (1.2e-4 there): k̂ = −inf.

    ArviZ's tail fit of such a row sees a handful of tied values and returns k̂ = +inf ("unreliable"); rows with a
    real spread at the same magnitude are still fitted.
    """
    rng = np.random.default_rng(0)
    base = np.float32(-1219.0)
    step = np.spacing(np.abs(base))  # one float32 step at 1219: 2^-13 ≈ 1.2e-4 nats
    assert step == np.float32(2.0**-13)
    lw = np.full((3, 1000), base, dtype=np.float32)
    lw[0] += step * rng.integers(0, 2, size=1000).astype(np.float32)  # one-step jitter
    lw[1] += step * rng.integers(-3, 4, size=1000).astype(np.float32)  # ± 3 steps: float32 rounding of a sum
    lw[2] += rng.normal(scale=0.5, size=1000).astype(np.float32)  # a real, light-tailed spread
    assert np.ptp(lw[0].astype(np.float64)) == pytest.approx(step) and step > 1e-4
    smoothed, k = arviz_io.psis(lw)
    assert k[0] == -np.inf and k[1] == -np.inf
    np.testing.assert_allclose(smoothed[:2], -np.log(1000))
    assert np.isfinite(k[2]) and k[2] < 0.5
    # Near zero the tolerance stays absolute: a spread of 1e-3 nats is a real (if tiny) variation, fitted.
    small = rng.normal(scale=3e-4, size=(1, 1000))
    assert np.isfinite(arviz_io.psis(small)[1]).all()
