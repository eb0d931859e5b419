"""``ppvae.diagnose``: PSIS k̂ per datapoint against known good and bad guides, the report, ArviZ export."""

import dataclasses
import json
import math
from typing import ClassVar

import numpy as np
import pytest
import torch

import ppvae
import ppvae.diagnostics.config
from ppvae.diagnostics import arviz_io
from ppvae.diagnostics.diagnosis import importance_ess
from ppvae.errors import ConfigError, NotApplicable

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
    text = d.report()
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
    assert d.skipped == {} and d.failed == {}  # every part: sites found from the trace, the guide's family re-fitted
    assert d.collapse.active_units == 4 and d.gaps is not None
    assert d.reference is not None
    # NUTS on z reproduces the exact posterior that this guide samples from.
    assert np.abs(d.reference.metrics["mean_error_sd"]).max() < 0.5
    assert "skipped" not in d.report() and "amortization gap" in d.report()


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
    assert "nan" not in d.report().split("PSIS")[1].split("\n")[0]
    assert "non-finite datapoints" in d.report() and "k̂ not computed" in d.report()
    json.dumps(d.to_dict(), allow_nan=False)


def test_too_few_samples_for_a_tail_fit_warns():
    with pytest.warns(UserWarning, match="too few for a Pareto tail fit"):
        d = ppvae.diagnose(lg_model, X, guide=scaled_guide(HALVED), num_samples=20, collapse=False, gaps=False,
                           sbc=False, reference=False)  # fmt: skip
    assert np.isinf(d.khat).all() and d.share_khat_above == 1.0


def test_exact_guide_on_high_dimensional_data_has_constant_weights():
    """784 data dimensions, noise 0.05: an exact guide's float32 log-weights, ≈ +1200 nats, vary only by float32
    rounding (a few steps of 1.2e-4). Every k̂ is −inf (constant weights), none +inf, and the finding says so."""
    splits = ppvae.data.load("linear-gaussian", n=200, data_dim=784, latent_dim=2, noise=0.05)
    gen, x = splits.generator, splits.test
    vae = ppvae.VAE((784,), 2, likelihood={"name": "normal", "kwargs": {"scale": gen.sigma}}, guide="normal",
                    encoder={"name": "mlp", "kwargs": {"hidden": []}},
                    decoder={"name": "mlp", "kwargs": {"hidden": []}})  # fmt: skip
    _, cov = gen.posterior(x[:1])
    gain = gen.W.double() @ cov / gen.sigma**2  # posterior mean = (x − b) @ gain
    sd = cov.diagonal().sqrt()
    with torch.no_grad():
        vae.decoder.net[0].weight.copy_(gen.W)
        vae.decoder.net[0].bias.copy_(gen.b)
        vae.guide_head.loc_head.weight.copy_(gain.T)
        vae.guide_head.loc_head.bias.copy_(-(gen.b.double() @ gain))
        vae.guide_head.scale_head.weight.zero_()
        vae.guide_head.scale_head.bias.copy_(torch.log(torch.expm1(sd - 1e-5)))  # softplus⁻¹
    assert (cov - cov.diagonal().diag()).abs().max() < 1e-6 * sd.min() ** 2  # orthogonal W: a diagonal posterior
    d = ppvae.diagnose(vae, x, num_samples=1000, collapse=False, gaps=False, sbc=False, reference=False)
    lw = d.evaluation.log_weights.astype(np.float64)
    exact = gen.log_px(x).numpy()
    assert np.abs(lw - exact[:, None]).max() < 1e-3 and np.ptp(lw, axis=1).max() > 1e-4  # rounding, above 1e-4
    assert (d.khat == -np.inf).all() and d.share_khat_above == 0.0
    assert d.findings()[0].text.startswith("q is a good importance proposal (median PSIS k̂ −inf: constant weights)")


@pytest.mark.filterwarnings("ignore:the per-datapoint optimization of q\\* had not converged")  # 20 cheap steps
def test_dynamically_binarized_data_are_drawn_once_and_shared(monkeypatch):
    """Every part of diagnose sees the binary draws evaluate scores, never DynamicBinarized's grey levels (outside a
    Bernoulli's support): one draw seeded by ``seed``, the same numbers as diagnose on that binary tensor."""
    import importlib

    from ppvae.data import DynamicBinarized

    grey = torch.rand(30, 8, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.1  # no 0/1 grey level
    mlp = {"name": "mlp", "kwargs": {"hidden": [16]}}
    vae = ppvae.VAE((8,), 2, likelihood="bernoulli", guide="normal", encoder=mlp, decoder=mlp)
    seen: dict[str, list[torch.Tensor]] = {}

    def spy(module: str, name: str, position: int) -> None:
        mod = importlib.import_module(module)
        real = getattr(mod, name)

        def wrapper(*args, **kwargs):
            seen.setdefault(name, []).append(args[position])
            return real(*args, **kwargs)

        monkeypatch.setattr(mod, name, wrapper)

    spy("ppvae.diagnostics.diagnosis", "evaluate", 1)
    spy("ppvae.diagnostics.collapse", "posterior_collapse", 1)
    spy("ppvae.diagnostics.gaps", "inference_gaps", 1)
    spy("ppvae.diagnostics.reference", "reference_posterior", 1)
    options = {**CHEAP, "sbc": False, "num_samples": 100, "seed": 5, "reference_warmup": 20, "reference_samples": 20}
    d = ppvae.diagnose(vae, DynamicBinarized(grey), **options)
    assert d.skipped == {} and all(len(v) == 1 for v in seen.values()) and len(seen) == 4
    scored = seen["evaluate"][0]
    assert torch.is_tensor(scored) and scored.shape == grey.shape
    assert ((scored == 0) | (scored == 1)).all() and 0.2 < scored.mean() < 0.8
    for name in ("posterior_collapse", "inference_gaps", "reference_posterior"):
        assert torch.equal(torch.as_tensor(seen[name][0]), scored), name
    # Diagnosing that draw as a tensor gives the same numbers.
    again = ppvae.diagnose(vae, scored.clone(), **options)
    np.testing.assert_array_equal(again.evaluation.log_px, d.evaluation.log_px)
    np.testing.assert_array_equal(again.gaps.log_px, d.gaps.log_px)
    assert again.collapse.kl_total == d.collapse.kl_total
    np.testing.assert_array_equal(again.reference.draws, d.reference.draws)
    # The draw depends on the seed alone, not on the global RNG.
    only_evaluate = {"collapse": False, "gaps": False, "reference": False}
    torch.manual_seed(99)
    ppvae.diagnose(vae, DynamicBinarized(grey), **options | only_evaluate)
    ppvae.diagnose(vae, DynamicBinarized(grey), **options | only_evaluate | {"seed": 6})
    assert torch.equal(seen["evaluate"][2], scored) and not torch.equal(seen["evaluate"][3], scored)


def test_a_failing_part_is_reported_and_the_others_stand(monkeypatch):
    """An error inside a part (here SBC, as from a flow prior whose support raises NotImplementedError) is kept
    under ``failed`` with its message; evaluate and the other parts are still there."""
    import ppvae.diagnostics.sbc as sbc_mod

    def broken(*args, **kwargs):
        raise NotImplementedError("support of this flow prior is not implemented")

    monkeypatch.setattr(sbc_mod, "sbc", broken)
    vae = exact_vae()
    d = ppvae.diagnose(vae, X, num_samples=100, **{**CHEAP, "sbc": True, "reference": False})
    assert d.failed == {"sbc": "NotImplementedError: support of this flow prior is not implemented"}
    assert d.sbc is None and "sbc" not in d.skipped
    assert d.evaluation is not None and d.collapse is not None and d.gaps is not None
    record = d.summary()
    assert record["failed"] == d.failed and "collapse" in record and "gaps" in record
    assert "failed" in d.report() and str(d) == d.report()
    # one summary() type across results: JSON-ready dicts
    assert all(isinstance(part.summary(), dict) for part in (d, d.evaluation, d.collapse, d.gaps))


@pytest.mark.parametrize(
    "option,value",
    [("gap_steps", 0), ("num_gap_points", 0), ("sbc_simulations", 5), ("reference_samples", 1), ("gap_steps", 2.5)],
)
def test_a_bad_setting_is_the_callers_error_before_any_work(monkeypatch, option, value):
    import ppvae.diagnostics.diagnosis as diagnosis_mod

    monkeypatch.setattr(diagnosis_mod, "evaluate", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(ConfigError, match=f"{option} must be a whole number"):
        ppvae.diagnose(exact_vae(), X, num_samples=100, **{**CHEAP, "sbc": True, "reference": True, option: value})


def test_not_applicable_means_skipped_and_only_that():
    from ppvae.diagnostics.collapse import posterior_collapse

    with pytest.raises(NotApplicable, match="posterior collapse needs q"):
        posterior_collapse(lg_model, X)
    assert issubclass(NotApplicable, ConfigError)  # direct callers that caught ConfigError still do


def test_every_default_comes_from_the_configs():
    """diagnose, each diagnostic, the CLI flags and the compare preset read one source of defaults."""
    import inspect

    from ppvae.cli import app
    from ppvae.cli.compare import QUICK_DIAGNOSE
    from ppvae.diagnostics import config, gaps, reference, sbc

    d = config.DiagnoseConfig()
    assert config.DiagnoseConfig.from_options() == d  # diagnose() with no options runs the defaults
    assert config.DiagnoseConfig.from_options(**d.diagnose_kwargs()) == d
    assert inspect.signature(gaps.inference_gaps).parameters["steps"].default == d.gaps.steps
    assert inspect.signature(reference.reference_posterior).parameters["num_points"].default == d.reference.num_points
    assert inspect.signature(sbc.sbc).parameters["num_simulations"].default == d.sbc.num_simulations
    args = app.build_parser().parse_args(["diagnose", "RUN"])
    assert (args.num_gap_points, args.gap_steps, args.sbc_simulations) == (
        d.gaps.num_points,
        d.gaps.steps,
        d.sbc.num_simulations,
    )
    assert (args.num_reference_points, args.reference_warmup, args.reference_samples, args.num_samples) == (
        d.reference.num_points,
        d.reference.num_warmup,
        d.reference.num_nuts_draws,
        d.num_importance_samples,
    )
    quick = config.DiagnoseConfig.quick().diagnose_kwargs()
    assert QUICK_DIAGNOSE == {k: quick[k] for k in QUICK_DIAGNOSE} and QUICK_DIAGNOSE["gap_steps"] == 150
    off = config.DiagnoseConfig(sbc=None, reference=None).diagnose_kwargs()
    assert off["sbc"] is False and off["reference"] is False and off["gaps"] is True


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


def test_sbc_of_a_pair_without_a_generation_path_runs_through_the_model_itself():
    """model(x) with no model(None, batch_size=n) path: diagnose simulates with the model's observed site
    unconditioned on the data's own inputs, so SBC runs (it was skipped before)."""
    d = ppvae.diagnose(lg_model, X, guide=scaled_guide(HALVED), num_samples=100, collapse=False, gaps=False,
                       reference=False, sbc_simulations=20)  # fmt: skip
    assert d.skipped == {} and d.failed == {} and d.sbc.ranks.shape == (20, 4)


def test_parts_are_declared_once_and_reach_diagnose_the_cli_and_the_grid():
    """A part is its config class in DiagnoseConfig: diagnose runs it, the CLI has its flags, the grid checks it."""
    from ppvae.cli import app
    from ppvae.cli.scoring import diagnose_config
    from ppvae.diagnostics import config

    names = [c.part for c in config.part_configs()]
    assert names == ["collapse", "gaps", "sbc", "reference"]
    for c in config.part_configs():
        assert callable(config.runner(c))
    options = [s.option for _, _, s in config.part_settings()]
    assert len(options) == len(set(options))  # one keyword per setting
    parser = app.build_parser()
    args = parser.parse_args(["diagnose", "RUN", "--no-sbc", "--gap-steps", "7", "--reference-warmup", "0"])
    cfg = diagnose_config(args)
    assert cfg.sbc is None and cfg.gaps.steps == 7 and cfg.reference.num_warmup == 0 and cfg.collapse is not None
    assert dataclasses.replace(cfg, gaps=None).diagnose_kwargs()["gaps"] is False
    with pytest.raises(ppvae.ConfigError, match=r"gap_steps must be a whole number ≥ 1, got 0"):
        config.DiagnoseConfig.from_options(gap_steps=0)
    with pytest.raises(ppvae.ConfigError, match="unknown diagnose option gap_step; its options are collapse, gaps"):
        config.DiagnoseConfig.from_options(gap_step=5)
    with pytest.raises(ppvae.ConfigError, match="sbc must be True or False"):
        config.DiagnoseConfig.from_options(sbc="no")


def test_diagnose_takes_a_config_or_options_not_both():
    from ppvae.diagnostics.config import DiagnoseConfig

    with pytest.raises(ppvae.ConfigError, match="not both"):
        ppvae.diagnose(exact_vae(), X, config=DiagnoseConfig(), gaps=False)
    only_psis = DiagnoseConfig(collapse=None, gaps=None, sbc=None, reference=None)
    d = ppvae.diagnose(exact_vae(), X, config=only_psis, num_samples=200)
    assert d.parts == {} and d.gaps is None and set(d.seconds) == {"evaluate_psis"}
    with pytest.raises(AttributeError):
        d.not_a_part  # noqa: B018


@dataclasses.dataclass
class _ToyResult:
    """A new diagnostic's result: the mean ELBO it was handed, and a row for the report."""

    mean_elbo: float

    def summary(self):
        return {"mean_elbo": self.mean_elbo}

    def rows(self):
        return [("toy part", f"{self.mean_elbo:.3f}", "the ELBO it read")]


def _toy_run(inputs, config):
    if config.fail:
        raise ValueError("toy part broke")
    return _ToyResult(float(np.mean(inputs.evaluation.elbo)) * config.factor)


@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    part: ClassVar[str] = "toy"
    runner: ClassVar[str] = "tests.test_diagnostics:_toy_run"
    about: ClassVar[str] = "a toy"
    factor: float = 1.0
    fail: bool = False


@dataclasses.dataclass(frozen=True)
class _WithToy(ppvae.diagnostics.config.DiagnoseConfig):
    toy: _ToyConfig | None = dataclasses.field(default_factory=_ToyConfig)


def test_a_new_part_needs_only_its_config_and_runner(tmp_path):
    """A part declared outside ppvae (config class + runner) runs in diagnose, reaches the JSON, the table and the
    failed list, with no change to diagnosis.py."""
    only_toy = dict(collapse=None, gaps=None, sbc=None, reference=None)
    d = ppvae.diagnose(exact_vae(), X, config=_WithToy(**only_toy, toy=_ToyConfig(factor=2.0)), num_samples=200)
    assert d.toy.mean_elbo == pytest.approx(2 * d.evaluation.elbo.mean())
    assert d.to_dict()["toy"] == {"mean_elbo": pytest.approx(d.toy.mean_elbo)}
    assert ("toy part", f"{d.toy.mean_elbo:.3f}", "the ELBO it read") in d.table() and "toy" in d.seconds
    assert "toy" in json.loads(d.save(tmp_path)["json"].read_text())
    broken = ppvae.diagnose(exact_vae(), X, config=_WithToy(**only_toy, toy=_ToyConfig(fail=True)), num_samples=200)
    assert broken.failed == {"toy": "ValueError: toy part broke"} and broken.toy is None
