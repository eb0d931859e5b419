"""fit: exact answers on the linear-Gaussian model, hand-written pairs, guards, β, resume, bad input."""

import io as io_module
import math
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

import ppvae
import ppvae.infer.train
from ppvae.data import LinearGaussian
from ppvae.data.batches import make_batches
from ppvae.errors import CheckpointError, ConfigError, DataError, TrainingError
from ppvae.infer.callbacks import Callback
from ppvae.infer.objectives import ScaleLatents, VAELoss
from ppvae.infer.train import BetaSchedule, Trainer
from ppvae.infer.trainer_state import TrainState

LINEAR = {"name": "mlp", "kwargs": {"hidden": []}}


def linear_vae(guide="fullrank", scale="learned"):
    return ppvae.VAE(
        (8,),
        2,
        prior="normal",
        likelihood={"name": "normal", "kwargs": {"scale": scale}},
        guide=guide,
        encoder=LINEAR,
        decoder=LINEAR,
    )


def exact_log_px_of(vae: ppvae.VAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) of a VAE with a linear decoder and Normal likelihood: N(b, W Wᵀ + diag(σ²))."""
    layer = vae.decoder.net[0]
    sigma = vae.likelihood.scale().expand(8)
    cov = layer.weight @ layer.weight.T + torch.diag(sigma**2)
    return dist.MultivariateNormal(layer.bias, covariance_matrix=cov).log_prob(x)


@torch.no_grad()
def mc_elbo(model, guide, x, particles=200):
    loss = pyro.infer.Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    return -loss.loss(model, guide, x) / len(x)


def test_vae_reaches_exact_log_likelihood_on_linear_gaussian():
    gen = LinearGaussian(data_dim=8, latent_dim=2, noise=0.5, seed=1)
    x, _ = gen.sample(2000, seed=2)
    vae = linear_vae(scale=0.5)  # the known noise level; models/factor_analysis.py learns it (test_models.py)
    ppvae.fit(vae, x, epochs=60, batch_size=100, lr=5e-2, progress=False, seed=0)
    ppvae.fit(vae, x, epochs=20, batch_size=100, lr=5e-3, progress=False, seed=1)  # anneal: a second, slower fit
    truth = gen.log_px(x).mean().item()
    learned = exact_log_px_of(vae, x).mean().item()
    elbo = mc_elbo(vae.model, vae.guide, x)
    # The maximum-likelihood fit is at least as good as the true parameters in-sample (up to optimizer noise) ...
    assert learned > truth - 0.05
    assert learned < truth + 0.1  # ... and not absurdly better (2000 points, 32 parameters)
    # ... and the full-rank linear guide contains the exact posterior, so the ELBO closes onto log p(x).
    assert abs(elbo - learned) < 0.03, (elbo, learned, truth)


def test_hand_written_function_pair_trains_and_leaves_params_in_store():
    gen = LinearGaussian(data_dim=8, latent_dim=2, noise=0.5, seed=3)
    x, _ = gen.sample(1000, seed=4)
    dec, enc = nn.Linear(2, 8), nn.Linear(8, 4)

    def model(x):
        pyro.module("dec", dec)
        sigma = pyro.param("sigma", torch.ones(8), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(dec(z), sigma).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        h = enc(x)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(h[:, :2], nn.functional.softplus(h[:, 2:]) + 1e-3).to_event(1))

    before = dec.weight.detach().clone()
    result = ppvae.fit(model, x, guide=guide, epochs=60, batch_size=100, lr=2e-2, progress=False)
    assert result.module is None
    assert not torch.equal(before, dec.weight)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] - 1.0
    sigma = pyro.param("sigma").detach()
    assert torch.allclose(sigma, torch.full((8,), 0.5), atol=0.08), sigma
    assert "sigma" in result.param_state["params"]


def test_function_pair_with_unregistered_network_is_refused():
    dec = nn.Linear(2, 4)
    loc = torch.zeros(2, requires_grad=False)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(dec(z), 1.0).to_event(1), obs=x)

    def guide(x):
        m = pyro.param("m", loc)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(m, 1.0).to_event(1))

    with pytest.raises(TrainingError, match="dec.*never be optimized.*pyro.module"):
        ppvae.fit(model, torch.randn(10, 4), guide=guide, epochs=1, batch_size=5, progress=False)


def test_module_parameter_without_gradient_is_refused():
    vae = linear_vae(guide="normal")
    vae.unused = nn.Linear(3, 3)
    with pytest.raises(TrainingError, match="unused.weight"):
        ppvae.fit(vae, torch.randn(20, 8), epochs=1, batch_size=10, progress=False)


def test_two_models_in_one_process_stay_independent():
    x = torch.randn(200, 8)
    a, b = linear_vae(), linear_vae()
    assert a.pyro_name != b.pyro_name
    ppvae.fit(a, x, epochs=2, batch_size=50, progress=False)
    a_state = {k: v.clone() for k, v in a.state_dict().items()}
    b_state = {k: v.clone() for k, v in b.state_dict().items()}
    ppvae.fit(b, x, epochs=2, batch_size=50, progress=False)
    assert all(torch.equal(a_state[k], v) for k, v in a.state_dict().items())
    assert any(not torch.equal(b_state[k], v) for k, v in b.state_dict().items())
    # Pyro's usual loop trains b's own tensors too: pyro.module under a per-instance name finds nothing stale.
    svi = pyro.infer.SVI(b.model, b.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    before = {k: v.clone() for k, v in b.state_dict().items()}
    svi.step(x)
    assert any(not torch.equal(before[k], v) for k, v in b.state_dict().items())
    assert all(torch.equal(a_state[k], v) for k, v in a.state_dict().items())


def test_beta_scales_latent_sites_in_model_and_guide():
    vae = linear_vae(guide="normal")
    x = torch.randn(5, 8)
    beta = 0.3
    pyro.set_rng_seed(7)
    with ScaleLatents(beta):
        guide_tr = poutine.trace(vae.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    z = guide_tr.nodes["z"]["value"]
    q = vae.encode(x).log_prob(z).sum()
    prior = vae.prior().log_prob(z).sum()
    lik = vae.decode(z).log_prob(x).sum()
    elbo = model_tr.log_prob_sum() - guide_tr.log_prob_sum()
    assert torch.allclose(elbo, lik + 0.3 * (prior - q), atol=1e-4)


def test_kl_warmup_schedule_and_history():
    x = torch.randn(100, 8)
    result = ppvae.fit(linear_vae(), x, epochs=3, batch_size=50, kl_warmup=2, val_data=x[:20], progress=False)
    assert [round(h["beta"], 3) for h in result.history] == [0.5, 1.0, 1.0]
    assert all(h["val_elbo"] is not None and h["seconds"] > 0 for h in result.history)


@pytest.mark.parametrize("objective,particles", [("elbo", 1), ("meanfield", 2), ("iwae", 4), ("elbo", 3)])
def test_objectives_train(objective, particles):
    gen = LinearGaussian(data_dim=8, latent_dim=2, noise=0.5, seed=5)
    x, _ = gen.sample(500, seed=6)
    result = ppvae.fit(
        linear_vae(guide="normal"),
        x,
        epochs=8,
        batch_size=50,
        lr=1e-2,
        objective=objective,
        num_particles=particles,
        progress=False,
    )
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_enumerated_discrete_latent_trains():
    """A two-component Gaussian mixture with the assignment enumerated (TraceEnum_ELBO)."""
    x = torch.cat([torch.randn(100, 1) - 3, torch.randn(100, 1) + 3])

    def model(x):
        locs = pyro.param("locs", torch.tensor([[-0.5], [0.5]]))
        with pyro.plate("data", len(x)):
            k = pyro.sample("k", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[k], 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    ppvae.fit(model, x, guide=guide, objective="enum", epochs=30, batch_size=50, lr=0.1, progress=False)
    locs = pyro.param("locs").detach().flatten().sort().values
    assert torch.allclose(locs, torch.tensor([-3.0, 3.0]), atol=0.3)


def test_early_stopping_keeps_best_epoch():
    x = torch.randn(200, 8)
    result = ppvae.fit(
        linear_vae(), x, epochs=200, batch_size=50, lr=5e-2, val_data=torch.randn(50, 8) * 3, patience=2, progress=False
    )
    assert result.stopped_early
    assert len(result.history) < 200
    best = max(h["val_elbo"] for h in result.history)
    assert result.history[result.best_epoch - 1]["val_elbo"] == best


def test_resume_reproduces_uninterrupted_run(tmp_path):
    x = torch.randn(300, 8)

    def fresh():  # same initial weights for each run
        pyro.set_rng_seed(11)
        return linear_vae()

    full = fresh()
    ppvae.fit(full, x, epochs=4, batch_size=64, seed=3, progress=False, checkpoint_dir=tmp_path / "a")
    part = fresh()
    ppvae.fit(part, x, epochs=2, batch_size=64, seed=3, progress=False, checkpoint_dir=tmp_path / "b")
    resumed = linear_vae()  # different initial weights: all must come from the checkpoint
    result = ppvae.fit(
        resumed, x, epochs=4, batch_size=64, seed=99, progress=False, checkpoint_dir=tmp_path / "b", resume=True
    )
    assert len(result.history) == 4
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_clip_norm_and_tuple_data():
    x = torch.randn(64, 8)
    y = torch.arange(64)

    class WithLabels(nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = linear_vae(guide="normal")

        def model(self, x, y):
            return self.vae.model(x)

        def guide(self, x, y):
            return self.vae.guide(x)

    result = ppvae.fit(WithLabels(), (x, y), epochs=2, batch_size=16, clip_norm=1.0, progress=False)
    assert len(result.history) == 2


@pytest.mark.parametrize(
    "data,kwargs,error,match",
    [
        (torch.full((10, 8), math.nan), {}, DataError, "NaN"),
        (torch.full((10, 8), math.inf), {}, DataError, "Inf"),
        (torch.randn(10, 7), {}, DataError, r"shape \(7,\).*expects \(8,\)"),
        (torch.empty(0, 8), {}, DataError, "empty"),
        (torch.randn(10, 8), {"batch_size": 11}, DataError, "batch_size 11 is larger than the 10"),
        (torch.randn(10, 8), {"epochs": 0}, ConfigError, "epochs"),
        (torch.randn(10, 8), {"lr": -1.0}, ConfigError, "lr"),
        (torch.randn(10, 8), {"objective": "nope"}, ConfigError, "elbo, meanfield, iwae, enum"),
        (torch.randn(10, 8), {"objective": "iwae"}, ConfigError, "num_particles"),
        (torch.randn(10, 8), {"patience": 2}, ConfigError, "val_data"),
        ("not data", {}, DataError, "tensor, an array"),
    ],
)
def test_bad_input_is_refused_clearly(data, kwargs, error, match):
    kwargs = {"batch_size": 5, "epochs": 1, **kwargs}
    with pytest.raises(error, match=match):
        ppvae.fit(linear_vae(), data, progress=False, **kwargs)


def test_data_outside_likelihood_support():
    vae = ppvae.VAE((8,), 2, likelihood="bernoulli")
    with pytest.raises(DataError, match="0.5"):
        ppvae.fit(vae, torch.full((10, 8), 0.5), epochs=1, batch_size=5, progress=False)
    vae = ppvae.VAE((8,), 2, likelihood="poisson")
    with pytest.raises(DataError, match="-1"):
        ppvae.fit(vae, -torch.ones(10, 8), epochs=1, batch_size=5, progress=False)


# --- the trainer under fit: state, callbacks, β per step, progress ----------------------------------------------


def _trainer(vae, x, loss=None, batch_size=25, **kwargs):
    """A Trainer on ``vae``'s own parameters, as fit builds one (without fit's checks and callbacks)."""
    params = list(vae.named_parameters())
    state = TrainState(params, torch.optim.Adam([p for _, p in params], lr=1e-2))
    batches = make_batches(x, batch_size, torch.device("cpu"), shuffle=True, what="data")
    return Trainer(
        state,
        batches,
        loss or VAELoss(vae),
        pair=(vae.model, vae.guide),
        device=torch.device("cpu"),
        **{"epochs": 2, **kwargs},
    )


def test_train_state_dict_round_trip():
    vae = linear_vae()
    val = make_batches(torch.randn(20, 8), 20, torch.device("cpu"), shuffle=False, what="val")
    trainer = _trainer(vae, torch.randn(100, 8), val=val)
    state = trainer.fit()
    saved = state.state_dict()
    assert saved["history"] == state.history and saved["best_epoch"] == state.best_epoch is not None
    trainer.epochs = 4
    trainer.fit()  # moves everything on: parameters, Adam's moments, history
    assert state.epoch == 4
    assert any(not torch.equal(p, saved["params"][name]) for name, p in vae.named_parameters())
    state.load_state_dict(saved)
    assert state.epoch == 2 and state.history == saved["history"] and state.best_epoch == saved["best_epoch"]
    assert state.best_score == saved["best_score"] and state.stopped_early is False
    for name, p in vae.named_parameters():
        assert torch.equal(p, saved["params"][name]), name
        assert torch.equal(state.best_params[name], saved["best_params"][name]), name
    restored = state.optimizer.state_dict()
    assert restored["state"].keys() == saved["optimizer"]["state"].keys()
    for k, s in restored["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s[key], saved["optimizer"]["state"][k][key]), (k, key)
    # The dict is a copy: training on does not change it; parameters of another model are refused.
    trainer.fit()
    assert len(saved["history"]) == 2
    other = TrainState(list(nn.Linear(2, 2).named_parameters()), state.optimizer)
    with pytest.raises(CheckpointError, match="different parameters"):
        other.load_state_dict(saved)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_fit_start(self, trainer):
        self.calls.append("fit_start")

    def on_epoch_start(self, trainer):
        self.calls.append(f"epoch_start {trainer.epoch_stats.index + 1}")

    def on_step_end(self, trainer, step):
        self.calls.append(f"step {step}")

    def on_nonfinite(self, trainer, fault):
        self.calls.append(f"nonfinite {fault.epoch}.{fault.batch}")

    def on_epoch_end(self, trainer, record):
        assert trainer.state.history[-1] is record
        self.calls.append(f"epoch_end {record['epoch']} skipped={record['skipped_batches']}")

    def on_fit_end(self, trainer, error):
        self.calls.append(f"fit_end {type(error).__name__ if error else None}")


def test_custom_callback_gets_its_hooks_in_order():
    vae = linear_vae(guide="normal")
    calls = []

    def loss(batch, beta):  # NaN on the second step of the first epoch: left out, the hook told
        calls.append(beta)
        value = VAELoss(vae)(batch, beta)
        return value * math.nan if len(calls) == 2 else value

    recorder = Recorder()
    _trainer(vae, torch.randn(50, 8), loss=loss, callbacks=[recorder]).fit()
    assert recorder.calls == [
        "fit_start",
        "epoch_start 1",
        "step 0",
        "nonfinite 1.2",
        "epoch_end 1 skipped=1",
        "epoch_start 2",
        "step 0",
        "step 1",
        "epoch_end 2 skipped=0",
        "fit_end None",
    ]

    # A callback that raises stops training; on_fit_end hears why.
    class Stop(Callback):
        def on_step_end(self, trainer, step):
            raise TrainingError("stop")

    recorder = Recorder()
    with pytest.raises(TrainingError, match="stop"):
        _trainer(vae, torch.randn(50, 8), callbacks=[recorder, Stop()]).fit()
    assert recorder.calls == ["fit_start", "epoch_start 1", "step 0", "fit_end TrainingError"]


def test_early_stopping_restores_the_best_epoch(tmp_path):
    x, val = torch.randn(200, 8), torch.randn(50, 8) * 3
    vae = linear_vae()
    result = ppvae.fit(
        vae, x, epochs=200, batch_size=50, lr=5e-2, val_data=val, patience=2, progress=False, checkpoint_dir=tmp_path
    )
    assert result.stopped_early and result.best_epoch == len(result.history) - 2
    last, best = (ppvae.io.read(tmp_path / name)["params"] for name in ("last.pt", "best.pt"))
    for name, p in vae.named_parameters():  # the parameters are the best epoch's, not the last one's
        assert torch.equal(p, result.best_params[name]) and torch.equal(p, best[name]), name
    assert any(not torch.equal(p, last[name]) for name, p in vae.named_parameters())


def test_beta_per_step_follows_the_kl_warmup_schedule(monkeypatch):
    seen = []

    class Recording(VAELoss):
        def __call__(self, batch, beta=1.0):
            if torch.is_grad_enabled():  # a training step, not validation
                seen.append(beta)
            return super().__call__(batch, beta)

    monkeypatch.setattr(ppvae.infer.train, "VAELoss", Recording)
    result = ppvae.fit(linear_vae(), torch.randn(100, 8), epochs=3, batch_size=25, beta=0.8, kl_warmup=1.5,
                       val_data=torch.randn(10, 8), progress=False)  # fmt: skip
    warmup_steps = 1.5 * 4  # the schedule fit had before: β·min(1, (step + 1) / warm-up steps), step over the run
    assert seen == [0.8 * min(1.0, (step + 1) / warmup_steps) for step in range(12)]
    assert [h["beta"] for h in result.history] == [seen[3], seen[7], seen[11]]
    assert BetaSchedule(0.5)(0) == 0.5 and BetaSchedule(1.0, 4.0)(1) == 0.5


class _Stream(io_module.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty", [False, True])
def test_progress_is_a_line_per_epoch_off_a_terminal_and_a_bar_on_one(tty, monkeypatch):
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    ppvae.fit(linear_vae(), torch.randn(400, 8), epochs=3, batch_size=10, seed=0)
    text = stream.getvalue()
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.startswith("epoch ") and " loss " in line]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    if tty:
        assert "\r" in text and "epoch 1/3:" in text  # tqdm's frames, then the epoch's line
    else:
        assert "\r" not in text and text.count("\n") == 3  # the lines only
    stream.seek(0)
    stream.truncate()
    ppvae.fit(linear_vae(), torch.randn(40, 8), epochs=2, batch_size=10, progress=False)
    assert stream.getvalue() == ""


def test_progress_in_a_notebook_without_ipywidgets_uses_the_text_bar(monkeypatch, recwarn):
    import importlib.util

    import tqdm.std

    from ppvae.infer import callbacks

    monkeypatch.setattr(callbacks, "_in_notebook", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "ipywidgets" else real_find_spec(name)
    )
    assert callbacks._bar_class() is tqdm.std.tqdm
    assert not recwarn.list  # no "IProgress not found"


def test_a_vae_with_another_guide_trains_with_that_guide():
    """fit(vae, guide=g): the direct ELBO stands in only for the VAE's own guide; g must be the guide trained with."""
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    vae = ppvae.VAE((3,), 2, likelihood="normal", encoder={"name": "mlp", "kwargs": {"hidden": [8]}},
                    decoder={"name": "mlp", "kwargs": {"hidden": [8]}})  # fmt: skip
    calls = []

    def guide(x, batch_size=None):
        calls.append(len(x))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    for net in (vae.encoder, vae.guide_head):  # the VAE's own guide is not used: frozen, as fit advises
        net.requires_grad_(False)
    ppvae.fit(vae, x, guide=guide, epochs=2, batch_size=32, progress=False, seed=0)
    assert sum(calls) >= 2 * 64  # every training batch went through g


def test_seeded_fit_leaves_the_callers_random_state():
    """fit(seed=...) draws as if it had reseeded the global RNGs, on copies: the caller's state is as it was, and
    the trained weights are those of a fit that reseeded them."""
    import random

    import numpy as np

    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))

    def vae():
        torch.manual_seed(7)
        return ppvae.VAE((3,), 2, likelihood="normal", encoder={"name": "mlp", "kwargs": {"hidden": [8]}},
                         decoder={"name": "mlp", "kwargs": {"hidden": [8]}})  # fmt: skip

    a = vae()
    torch.manual_seed(100), np.random.seed(100), random.seed(100)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    ppvae.fit(a, x, epochs=2, batch_size=32, progress=False, seed=3)
    assert torch.equal(before[0], torch.get_rng_state()) and (before[1] == np.random.get_state()[1]).all()
    assert before[2] == random.getstate()
    b = vae()
    pyro.set_rng_seed(3)  # what fit did before: reseed the global RNGs
    ppvae.fit(b, x, epochs=2, batch_size=32, progress=False, seed=None)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_fit_trains_a_complex_parameter_with_the_default_adam():
    # PyTorch's fused Adam takes only real floating-point tensors and says so at its first step: fit must choose the
    # default implementation for a complex parameter up front, as it trained before.
    from ppvae.infer.train import adam

    real, cplx = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    assert adam([real], lr=0.1).defaults["fused"] is True
    opt = adam([real, cplx], lr=0.1)
    assert not opt.defaults["fused"]
    for p in (real, cplx):
        p.grad = torch.ones_like(p)
    opt.step()
    assert (cplx.detach().real < 0).all() and (real.detach() < 0).all()
