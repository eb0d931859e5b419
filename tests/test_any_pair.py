"""Any model/guide pair scores correctly (issue 12, items 2 and 3): one particle at a time when it does not broadcast,
in eval mode without changing the model, and with log-weights that are right or refused, never silently wrong."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, config_enumerate
from torch import nn

import ppvae
from ppvae.data import LinearGaussian
from ppvae.errors import ConfigError
from ppvae.infer.eval_mode import modules_of, scoring_mode
from ppvae.infer.logweights import log_weights, particles_broadcast

D, H = 6, 2


def _state(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class BatchNormPair(nn.Module):
    """A decoder with BatchNorm1d (ProdLDA, scVI): it refuses a leading particle dim. ``delta``: a guide that is a
    point (log q = 0), so every log-weight is log p(x, f(x)) exactly."""

    def __init__(self, delta: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.delta = delta
        self.enc = nn.Linear(D, 2 * H)
        self.dec = nn.Sequential(nn.Linear(H, 8), nn.BatchNorm1d(8), nn.Dropout(dropout), nn.Tanh(), nn.Linear(8, D))
        with torch.no_grad():  # running statistics away from their initial (0, 1), so eval mode visibly differs
            self.dec[1].running_mean.fill_(0.3)
            self.dec[1].running_var.fill_(2.0)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(H), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        h = self.enc(x)
        with pyro.plate("data", x.shape[0]):
            if self.delta:
                pyro.sample("z", dist.Delta(h[..., :H]).to_event(1))
            else:
                pyro.sample("z", dist.Normal(h[..., :H], h[..., H:].exp()).to_event(1))

    def exact_elbo(self, x):
        """log p(x, z = f(x)) per datapoint in eval mode, by hand (the Delta guide's log-weight)."""
        with torch.no_grad():
            z = self.enc(x)[..., :H]
            return dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Normal(self.dec(z), 1.0).log_prob(x).sum(-1)


def _data(n=12, seed=1):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_a_batchnorm_decoder_is_scored_one_particle_at_a_time_without_changing_the_model():
    pair = BatchNormPair().train()
    before = _state(pair)
    ev = ppvae.evaluate(pair, _data(), num_samples=8, batch_size=5)
    assert ev.particles.startswith("sequential") and "running_mean" in ev.particles
    assert ev.elbo.shape == (12,) and (ev.elbo <= ev.log_px + 1e-9).all()
    assert _same_state(before, _state(pair)) and all(m.training for m in pair.modules())
    # The NUTS reference runs the decoder too (on one datapoint: BatchNorm's batch statistics would refuse it).
    d = ppvae.diagnose(
        pair, _data(), num_samples=100, seed=0, num_reference_points=1, reference_warmup=10, reference_samples=10
    )
    assert d.khat.shape == (12,) and d.reference is not None and not d.failed
    assert _same_state(before, _state(pair)) and all(m.training for m in pair.modules())


def test_a_batchnorm_pair_gives_exactly_its_eval_mode_log_weights():
    pair = BatchNormPair(delta=True).train()
    x = _data()
    ev = ppvae.evaluate(pair, x, num_samples=3, batch_size=5)
    pair.eval()
    torch.testing.assert_close(torch.as_tensor(ev.elbo), pair.exact_elbo(x).double(), rtol=0, atol=1e-5)
    pair.train()  # the same numbers in train mode would use batch statistics: far off
    assert (pair.exact_elbo(x).double() - torch.as_tensor(ev.elbo)).abs().max() > 0.1


def test_evaluate_elbo_equals_pyros_trace_elbo_in_eval_mode():
    pair = BatchNormPair()
    x = _data(8)
    ev = ppvae.evaluate(pair, x, num_samples=4000, seed=0, keep_log_weights=True)
    pair.eval()
    with torch.no_grad():
        pyro_elbo = -Trace_ELBO(num_particles=4000, vectorize_particles=False).differentiable_loss(
            pair.model, pair.guide, x
        )
    # Both are sums over the 8 datapoints of means of 4000 log-weights: the difference has standard error
    # √2 · √(Σ_i Var lw_i / S).
    se = math.sqrt(2 * ev.log_weights.astype("float64").var(1).sum() / 4000)
    assert abs(ev.elbo.sum() - pyro_elbo.item()) < 4 * se


def test_evaluate_elbo_equals_trace_elbo_per_datapoint_with_a_point_guide():
    pair = BatchNormPair(delta=True)
    x = _data(5)
    ev = ppvae.evaluate(pair, x, num_samples=2)
    pair.eval()
    with torch.no_grad():
        per_point = [-Trace_ELBO().differentiable_loss(pair.model, pair.guide, x[i : i + 1]).item() for i in range(5)]
    torch.testing.assert_close(
        torch.as_tensor(ev.elbo), torch.tensor(per_point, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_a_dropout_decoder_is_scored_without_dropout_and_left_in_train_mode():
    pair = BatchNormPair(delta=True, dropout=0.5).train()
    x = _data()
    a = ppvae.evaluate(pair, x, num_samples=4, seed=0).elbo
    b = ppvae.evaluate(pair, x, num_samples=4, seed=1).elbo
    assert (a == b).all()  # no dropout: a point guide gives the same weights whatever the seed
    pair.eval()
    torch.testing.assert_close(torch.as_tensor(a), pair.exact_elbo(x).double(), rtol=0, atol=1e-5)
    assert pair.training is False  # (set by the test)
    pair.train()
    ppvae.evaluate(pair, x, num_samples=4)
    assert all(m.training for m in pair.modules())


# A pair of functions calling pyro.module on networks it reaches through its globals.
_enc = nn.Linear(D, 2 * H)
_dec = nn.Sequential(nn.Linear(H, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, D))


def _fn_model(x):
    pyro.module("dec", _dec)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(H), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(_dec(z), 1.0).to_event(1), obs=x)


def _fn_guide(x):
    pyro.module("enc", _enc)
    h = _enc(x)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(h[..., :H], h[..., H:].exp()).to_event(1))


def test_a_function_pair_with_pyro_module_is_scored_in_eval_mode_and_left_as_it_was():
    assert {id(m) for m in modules_of(_fn_model)} | {id(m) for m in modules_of(_fn_guide)} == {id(_enc), id(_dec)}
    _enc.train(), _dec.train()
    before = _state(_dec)
    ev = ppvae.evaluate(_fn_model, _data(), guide=_fn_guide, num_samples=16, seed=3)
    assert _same_state(before, _state(_dec)) and _dec.training and _dec[1].training and _enc.training
    _dec.eval()
    try:
        manual = ppvae.evaluate(_fn_model, _data(), guide=_fn_guide, num_samples=16, seed=3, vectorize=False)
    finally:
        _dec.train()
    assert (ev.elbo == manual.elbo).all() and ev.particles.startswith("sequential")


def test_a_module_reached_only_through_its_forward_is_switched_too():
    hidden = {"net": nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))}  # not a global name the code mentions
    net = hidden["net"].train()
    with scoring_mode():
        assert not torch.is_grad_enabled()
        net(torch.randn(4, 2))
        assert not net.training and not net[1].training
    assert net.training and net[1].training and int(net[1].num_batches_tracked) == 0


class RaisingPair(BatchNormPair):
    """Raises in the model after its BatchNorm layer ran, from the fourth call on (the second batch)."""

    calls = 0

    def model(self, x):
        self.dec(torch.zeros(x.shape[0], H))
        RaisingPair.calls += 1
        if RaisingPair.calls > 3:
            raise RuntimeError("a bug in the user's model")
        super().model(x)


def test_the_model_is_unchanged_by_an_evaluation_that_raises():
    pair = RaisingPair().train()
    before = _state(pair)
    with pytest.raises(RuntimeError, match="a bug in the user's model"):
        ppvae.evaluate(pair, _data(), num_samples=4, batch_size=4, vectorize=False)
    assert _same_state(before, _state(pair)) and all(m.training for m in pair.modules())
    pair.dec(torch.randn(4, H))  # a train-mode forward does move the statistics: the check above could fail
    assert not _same_state(before, _state(pair))


def test_buffers_rebound_or_changed_in_place_in_eval_mode_are_put_back():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))
            self.register_buffer("total", torch.zeros(3))

        def forward(self, x):
            self.seen += 1  # in place, in any mode
            self.total = self.total + x.sum(0)  # rebound
            return x

    c = Counter()
    seen, total = c.seen, c.total
    with scoring_mode(c):
        c(torch.ones(2, 3))
    assert c.seen is seen and c.total is total and float(c.seen) == 0 and (c.total == 0).all()


class MaskedModelPair(nn.Module):
    """Completes masked inputs (Pyro's CVAE tutorial): the model scores only the masked half, picked with a boolean
    mask of shape (batch, D) and reshaped with .view(batch, -1); neither broadcasts over a particle dim."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(D, 2 * H)
        self.dec = nn.Linear(H, D)

    def model(self, x):
        mask = torch.zeros(x.shape, dtype=torch.bool)
        mask[:, D // 2 :] = True
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(H), 1.0).to_event(1))
            loc = self.dec(z)[mask].view(x.shape[0], -1)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x[mask].view(x.shape[0], -1))

    def guide(self, x):
        h = self.enc(torch.where(x > 0, x, torch.zeros(())))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(h[..., :H], h[..., H:].exp()).to_event(1))


def test_a_masked_pair_scores_through_evaluate_and_diagnose():
    pair = MaskedModelPair()
    reason = particles_broadcast(pair.model, pair.guide, _data())
    assert reason is not None and "raised" in reason
    ev = ppvae.evaluate(pair, _data(), num_samples=10)
    assert ev.particles.startswith("sequential") and torch.isfinite(torch.as_tensor(ev.elbo)).all()
    d = ppvae.diagnose(pair, _data(), num_samples=100, seed=0, reference=False)
    assert d.khat.shape == (12,) and not d.failed


def _batch_centred_pair():
    """Centres z over dim 0, meant as the batch: with particles in front it averages particles instead, silently."""
    dec = nn.Linear(H, D)
    with torch.no_grad():
        dec.weight.mul_(3.0)  # a decoder that depends on z enough for the wrong centring to show

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(H), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(dec(z - z.mean(0)), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], H), 1.0).to_event(1))

    return model, guide


def test_a_pair_that_broadcasts_wrongly_without_raising_is_caught_and_scored_one_by_one():
    model, guide = _batch_centred_pair()
    x = _data()
    reason = particles_broadcast(model, guide, x)
    assert reason is not None and "differs" in reason
    auto = ppvae.evaluate(model, x, guide=guide, num_samples=50, seed=0)
    sequential = ppvae.evaluate(model, x, guide=guide, num_samples=50, seed=0, vectorize=False)
    wrong = ppvae.evaluate(model, x, guide=guide, num_samples=50, seed=0, vectorize=True)
    assert auto.particles.startswith("sequential") and (auto.elbo == sequential.elbo).all()
    assert abs(wrong.elbo - sequential.elbo).max() > 0.5  # what the trial protects against


def test_a_broadcasting_pair_is_vectorized_and_the_trial_leaves_its_draws_alone():
    gen = LinearGaussian(data_dim=D, latent_dim=H, noise=0.5, seed=0)
    x, _ = gen.sample(20, seed=1)
    model, guide = _gaussian_pair(gen, widen=1.5)
    assert particles_broadcast(model, guide, x) is None
    auto = ppvae.evaluate(model, x, guide=guide, num_samples=30, seed=0)
    forced = ppvae.evaluate(model, x, guide=guide, num_samples=30, seed=0, vectorize=True)
    assert auto.particles == "vectorized" and (auto.elbo == forced.elbo).all() and (auto.log_px == forced.log_px).all()


def test_sequential_and_vectorized_particles_agree_on_identical_draws():
    """The guide draws z = loc + scale·ε from noise the test supplies, with log q from the Normal: both paths see the
    same ε, so they must give the same log-weights."""
    gen = LinearGaussian(data_dim=D, latent_dim=H, noise=0.5, seed=0)
    x, _ = gen.sample(7, seed=1)
    S = 5
    noise = torch.randn(S, 7, H, dtype=torch.float64)
    source: dict = {}
    W, b = gen.W.double(), gen.b.double()

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(H, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, gen.sigma).to_event(1), obs=x)

    def guide(x):
        q = dist.Normal(x[:, :H] * 0.3, torch.full((len(x), H), 0.8, dtype=x.dtype))
        eps = source["all"] if "all" in source else next(source["each"])
        z = q.loc + q.scale * eps
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Delta(z, log_density=q.log_prob(z).sum(-1), event_dim=1))

    source["all"] = noise
    together = log_weights(model, guide, x.double(), num_samples=S, vectorize=True, max_plate_nesting=1)
    source.clear()
    source["each"] = iter(noise)
    alone = log_weights(model, guide, x.double(), num_samples=S, vectorize=False, max_plate_nesting=1)
    assert together.shape == alone.shape == (7, S)
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-10)
    assert together.std(1).min() > 0.01  # the particles differ: the comparison is not of constants


def test_sequential_and_vectorized_evaluations_agree_within_monte_carlo_error():
    gen = LinearGaussian(data_dim=D, latent_dim=H, noise=0.5, seed=0)
    x, _ = gen.sample(10, seed=1)
    model, guide = _gaussian_pair(gen, widen=1.3)
    a = ppvae.evaluate(model, x, guide=guide, num_samples=3000, seed=0, vectorize=True)
    b = ppvae.evaluate(model, x, guide=guide, num_samples=3000, seed=1, vectorize=False)
    assert b.particles == "sequential (asked for)"
    exact = gen.log_px(x).double().numpy()
    assert abs(a.elbo.mean() - b.elbo.mean()) < 0.05
    assert abs(a.log_px - exact).max() < 0.05 and abs(b.log_px - exact).max() < 0.05


def _gaussian_pair(gen: LinearGaussian, widen: float = 1.0, scale: float | None = None, factor=None):
    """The linear-Gaussian model with its exact posterior (times ``widen``) as guide; optionally the likelihood
    under poutine.scale(``scale``) and a pyro.factor(``factor(x)``) in the data plate."""
    W, b, sigma = gen.W.double(), gen.b.double(), gen.sigma

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(H, dtype=x.dtype), 1.0).to_event(1))
            with poutine.scale(scale=scale) if scale is not None else _nothing():
                pyro.sample("x", dist.Normal(z @ W.T + b, sigma).to_event(1), obs=x)
            if factor is not None:
                pyro.factor("extra", factor(x))

    def guide(x):
        mean, cov = gen.posterior(x)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(mean.double(), cov.double() * widen**2))

    return model, guide


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.fixture
def gaussian():
    gen = LinearGaussian(data_dim=D, latent_dim=H, noise=0.5, seed=0)
    x, _ = gen.sample(9, seed=1)
    return gen, x.double(), gen.log_px(x).double()


def test_a_model_that_observes_nothing_is_refused(gaussian):
    gen, x, _ = gaussian

    def model(x, y=None):  # a conditional model called with only its inputs
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(H, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=y)

    def guide(x, y=None):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x[:, :H], 1.0).to_event(1))

    with pytest.raises(ConfigError, match="the model observes nothing: .*pass the data"):
        ppvae.evaluate(model, x, guide=guide, num_samples=4)
    y = x.sum(-1)
    assert ppvae.evaluate(model, (x, y), guide=guide, num_samples=4).elbo.shape == (9,)


def test_poutine_scale_is_divided_out_with_a_warning(gaussian):
    gen, x, exact = gaussian
    model, guide = _gaussian_pair(gen, scale=0.01)
    with pytest.warns(UserWarning, match=r"'x' \(scale 0.01\).*unscaled"):
        lw = log_weights(model, guide, x, num_samples=6)
    torch.testing.assert_close(lw, exact[:, None].expand(9, 6), atol=1e-6, rtol=0)  # the exact log p(x)
    with pytest.warns(UserWarning, match="scaled"):
        ev = ppvae.evaluate(model, x, guide=guide, num_samples=6)
    torch.testing.assert_close(torch.as_tensor(ev.log_px), exact, atol=1e-6, rtol=0)
    # Training objectives keep the scale (β, a user's weighting): the IWAE bound of the scaled pair is not log p(x).
    scaled = log_weights(model, guide, x, num_samples=6, scaled=True)
    assert (scaled - exact[:, None]).abs().min() > 1.0


def test_a_subsampling_plate_is_scored_per_datapoint_without_a_warning(gaussian):
    gen, x, exact = gaussian
    W, b, sigma = gen.W.double(), gen.b.double(), gen.sigma
    idx = torch.arange(len(x))

    def model(x):
        with pyro.plate("data", 1000, subsample=idx):  # a minibatch of 9 out of 1000: scale 1000/9
            z = pyro.sample("z", dist.Normal(torch.zeros(H, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, sigma).to_event(1), obs=x)

    def guide(x):
        mean, cov = gen.posterior(x)
        with pyro.plate("data", 1000, subsample=idx):
            pyro.sample("z", dist.MultivariateNormal(mean.double(), cov.double()))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lw = log_weights(model, guide, x, num_samples=4)
    torch.testing.assert_close(lw, exact[:, None].expand(9, 4), atol=1e-6, rtol=0)


def test_a_model_factor_adds_exactly_its_value_to_every_log_weight(gaussian):
    gen, x, exact = gaussian
    model, guide = _gaussian_pair(gen, factor=lambda x: torch.tensor(1.25, dtype=x.dtype))
    lw = log_weights(model, guide, x, num_samples=5)
    torch.testing.assert_close(lw, (exact + 1.25)[:, None].expand(9, 5), atol=1e-6, rtol=0)
    model, guide = _gaussian_pair(gen, factor=lambda x: x.sum(-1))  # one value per datapoint
    ev = ppvae.evaluate(model, x, guide=guide, num_samples=5, batch_size=4)
    torch.testing.assert_close(torch.as_tensor(ev.elbo), exact + x.sum(-1), atol=1e-6, rtol=0)


def test_a_model_factor_outside_the_data_plate_is_refused(gaussian):
    gen, x, _ = gaussian
    model, guide = _gaussian_pair(gen)

    def with_global_factor(x):
        model(x)
        pyro.factor("penalty", torch.tensor(3.0, dtype=x.dtype))

    with pytest.raises(ConfigError, match="pyro.factor site 'penalty' is outside the plate 'data'"):
        ppvae.evaluate(with_global_factor, x, guide=guide, num_samples=4)


def test_a_guide_factor_or_observation_is_left_out_with_a_warning(gaussian):
    gen, x, exact = gaussian
    model, guide = _gaussian_pair(gen)

    def guide_with_auxiliary_loss(x):
        mean, cov = gen.posterior(x)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(mean.double(), cov.double()))
            pyro.factor("classifier_loss", torch.full((len(x),), -7.0, dtype=x.dtype), has_rsample=True)
            pyro.sample("label", dist.Bernoulli(torch.full((len(x),), 0.3, dtype=x.dtype)), obs=torch.ones(len(x)))

    with pytest.warns(UserWarning, match="'classifier_loss', 'label' .* leave them out"):
        lw = log_weights(model, guide_with_auxiliary_loss, x, num_samples=3)
    torch.testing.assert_close(lw, exact[:, None].expand(9, 3), atol=1e-6, rtol=0)


def test_a_guide_latent_the_model_does_not_draw_is_refused(gaussian):
    gen, x, _ = gaussian
    model, guide = _gaussian_pair(gen)

    def misspelt(x):
        with pyro.plate("data", len(x)):
            pyro.sample("Z", dist.Normal(torch.zeros(len(x), H, dtype=x.dtype), 1.0).to_event(1))

    with pytest.raises(ConfigError, match="the guide draws 'Z', which the model does not have"):
        log_weights(model, misspelt, x, num_samples=2)


def test_deterministic_sites_contribute_nothing(gaussian):
    gen, x, exact = gaussian
    model, guide = _gaussian_pair(gen)

    def with_deterministic(x):
        model(x)
        pyro.deterministic("total", x.sum())  # outside every plate: a record, not a density

    lw = log_weights(with_deterministic, guide, x, num_samples=3)
    torch.testing.assert_close(lw, exact[:, None].expand(9, 3), atol=1e-6, rtol=0)


MEANS, SD, PRIOR = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64), 0.7, torch.tensor([0.2, 0.5, 0.3]).double()


def _mixture_model(x):
    with pyro.plate("data", len(x)):
        y = pyro.sample("y", dist.Categorical(PRIOR), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(MEANS[y], SD), obs=x)


def _mixture_exact(x):
    joint = PRIOR.log() + dist.Normal(MEANS, SD).log_prob(x[:, None])  # (N, 3): log p(x, y)
    return joint.logsumexp(-1), joint - joint.logsumexp(-1, keepdim=True)


def test_an_enumerated_guide_latent_is_summed_exactly():
    x = torch.tensor([-2.5, -0.3, 0.4, 1.7, 3.3], dtype=torch.float64)
    log_px, log_post = _mixture_exact(x)

    @config_enumerate
    def exact_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Categorical(logits=_mixture_exact(x)[1]))

    # Sampled (log_weights' default): with the exact posterior as q, every weight is log p(x).
    lw = log_weights(_mixture_model, exact_guide, x, num_samples=50)
    torch.testing.assert_close(lw, log_px[:, None].expand(5, 50), atol=1e-6, rtol=0)

    @config_enumerate
    def uniform_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Categorical(logits=torch.zeros(len(x), 3, dtype=x.dtype)))

    # Summed (evaluate): log p̂ is exact whatever q is, and the ELBO is TraceEnum_ELBO's exact one for this guide,
    # Σ_y q(y) [log p(x, y) − log q(y)] with q uniform, not the mean of the (now constant) log-weights.
    ev = ppvae.evaluate(_mixture_model, x, guide=uniform_guide, num_samples=20, seed=0)
    assert ev.enumerated == "summed: y"
    np.testing.assert_allclose(ev.log_px, log_px.numpy(), atol=1e-9)
    elbo = ((PRIOR.log() + dist.Normal(MEANS, SD).log_prob(x[:, None]) + math.log(3)) / 3).sum(-1)
    np.testing.assert_allclose(ev.elbo, elbo.numpy(), atol=1e-9)


def _sequential_mixture_model(x):
    with pyro.plate("data", len(x)):
        y = pyro.sample("y", dist.Categorical(PRIOR), infer={"enumerate": "sequential"})
        pyro.sample("x", dist.Normal(MEANS[y], SD), obs=x)


def test_a_model_side_enumerated_latent_is_summed_and_one_that_cannot_be_is_its_own_proposal():
    x = torch.tensor([-2.5, 0.4, 3.3], dtype=torch.float64)
    log_px, _ = _mixture_exact(x)

    def no_guide(x):
        pass

    ev = ppvae.evaluate(_mixture_model, x, guide=no_guide, num_samples=10, seed=0)
    assert ev.enumerated == "summed: y"
    np.testing.assert_allclose(ev.log_px, log_px.numpy(), atol=1e-9)
    np.testing.assert_allclose(ev.elbo, log_px.numpy(), atol=1e-9)  # no continuous latent: ELBO = log p(x)

    # Sequential enumeration is TraceEnum_ELBO's own scheme: scoring draws y from the model's prior instead.
    ev = ppvae.evaluate(_sequential_mixture_model, x, guide=no_guide, num_samples=20000, seed=0, keep_log_weights=True)
    assert ev.enumerated.startswith("sampled (site 'y' is marked for sequential enumeration")
    # lw = log p(x | y), y ~ p(y): the prior is the proposal. Its weights vary a lot (relative variance ≈ 4 at
    # x = −2.5, where one component in five explains the point): standard error ≈ 0.015 at S = 20000.
    assert abs(ev.log_px - log_px.numpy()).max() < 0.06
    expected_elbo = (PRIOR * dist.Normal(MEANS, SD).log_prob(x[:, None])).sum(-1)
    se = ev.log_weights.astype("float64").std(1) / math.sqrt(20000)
    assert (abs(ev.elbo - expected_elbo.numpy()) < 4 * se).all()


def test_the_trainers_validation_elbo_is_an_eval_mode_score_and_training_goes_on_in_train_mode():
    pair = BatchNormPair(delta=True, dropout=0.5)
    x, val = _data(32, seed=1), _data(16, seed=2)
    result = ppvae.fit(pair, x, epochs=1, batch_size=16, val_data=val, progress=False, device="cpu")
    assert pair.training and all(m.training for m in pair.modules())
    stats = _state(pair)
    pair.eval()
    expected = pair.exact_elbo(val).mean().item()
    pair.train()
    assert abs(result.history[-1]["val_elbo"] - expected) < 1e-4
    assert _same_state(stats, _state(pair))


def test_a_later_batch_that_does_not_broadcast_is_scored_one_particle_at_a_time():
    gen = LinearGaussian(data_dim=D, latent_dim=H, noise=0.5, seed=0)
    x, _ = gen.sample(12, seed=1)
    model, guide = _gaussian_pair(gen)

    def picky_model(x):  # broadcasts for the trial's batch of 5, not for the last batch of 2
        if len(x) < 5 and pyro.poutine.runtime.am_i_wrapped():
            frames = [f.name for f in pyro.poutine.runtime._PYRO_STACK if hasattr(f, "name")]
            if "_ppvae_particles" in frames:
                raise RuntimeError("no particles for short batches")
        model(x)

    ev = ppvae.evaluate(picky_model, x.double(), guide=guide, num_samples=4, batch_size=5)
    # The last batch's own trial finds it (a batch of another size is trialled again before it is scored).
    assert ev.particles.startswith("sequential (from datapoint 10: with 2 particles at once it raised RuntimeError")
    torch.testing.assert_close(torch.as_tensor(ev.elbo), gen.log_px(x).double(), atol=1e-6, rtol=0)


def test_a_batch_of_another_size_is_trialled_again_before_its_particles_are_drawn_together():
    """A pair that broadcasts over particles at an even batch size and mixes them at an odd one (code that reads
    the batch size): the first batch's trial alone would score the last, shorter batch wrongly without an error.
    The guide is the exact posterior, so every correct log-weight is log p(x) exactly: x ~ N(0, 2)."""

    def model(x):
        n = x.shape[0]
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = z.flip(0) if n % 2 and z.dim() > 1 else z  # odd batches: particles swapped
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))

    x = torch.linspace(-2.0, 2.0, 7)
    ev = ppvae.evaluate(model, x, guide=guide, num_samples=50, batch_size=4)
    assert ev.particles.startswith("sequential (from datapoint 4: particle"), ev.particles
    exact = dist.Normal(0.0, 2.0**0.5).log_prob(x).double()
    torch.testing.assert_close(torch.from_numpy(ev.log_px), exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(ev.elbo), exact, atol=1e-4, rtol=0)
