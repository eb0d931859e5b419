"""Pairs written in the common Pyro styles, each through fit → evaluate → diagnose → compare → save/load.

Every style asserts numbers: evaluate's ELBO equals Pyro's own ``Trace_ELBO`` on the same pair in eval mode (within
Monte Carlo error), the model's state is what it was after scoring, no diagnostic part fails (a part that cannot
apply is skipped with a reason), the pair is a row of a compare table, and the loaded pair scores the same.
"""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroParam
from torch import nn

import ppvae
from ppvae._param_store import model_store
from ppvae.compare.grid import GridSettings, compare
from ppvae.data import DataSplits

D, N = 12, 96
GEN = torch.Generator().manual_seed(0)
X = torch.bernoulli(torch.full((N, D), 0.35), generator=GEN)
MASK = torch.rand(N, D, generator=GEN) > 0.3  # observed entries of a conditional VAE's inputs


class ModuleVAE(nn.Module):
    """``pyro.module`` inside the methods, as Pyro's VAE tutorial writes it; optional dropout and BatchNorm."""

    def __init__(self, layers="plain"):
        super().__init__()
        norm = [nn.BatchNorm1d(16)] if layers == "batchnorm" else []
        drop = [nn.Dropout(0.2)] if layers == "dropout" else []
        self.dec = nn.Sequential(nn.Linear(2, 16), *norm, nn.ReLU(), *drop, nn.Linear(16, D))
        self.enc = nn.Linear(D, 4)

    def model(self, x):
        pyro.module("dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("enc", self.enc)
        with pyro.plate("data", x.shape[0]):
            h = self.enc(x)
            pyro.sample("latent", dist.Normal(h[..., :2], h[..., 2:].exp()).to_event(1))


class PyroModuleVAE(PyroModule):
    """``PyroModule`` with a ``PyroParam`` and a ``PyroSample``-free decoder: Pyro's own module style."""

    def __init__(self):
        super().__init__()
        self.dec = PyroModule[nn.Linear](2, D)
        self.enc = PyroModule[nn.Linear](D, 4)
        self.bias = PyroParam(torch.zeros(D))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z) + self.bias).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            h = self.enc(x)
            pyro.sample("z", dist.Normal(h[..., :2], h[..., 2:].exp()).to_event(1))


class ParamVAE(ModuleVAE):
    """A ``pyro.param`` created inside the module's model: a learned temperature of the logits."""

    def model(self, x):
        pyro.module("dec", self.dec)
        temp = pyro.param("temperature", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.dec(z) / temp).to_event(1), obs=x)


class FactorVAE(ModuleVAE):
    """A model-side ``pyro.factor`` per datapoint (a soft constraint on z): counted in log p."""

    def model(self, x):
        pyro.module("dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.factor("penalty", -0.1 * (z**2).sum(-1))
            pyro.sample("obs", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)


class MaskedCVAE(ModuleVAE):
    """A conditional VAE on a batch ``(x, mask)``: only the observed entries are scored; the guide reads x·mask."""

    def model(self, x, mask):
        pyro.module("dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.dec(z)).mask(mask).to_event(1), obs=x)

    def guide(self, x, mask):
        pyro.module("enc", self.enc)
        with pyro.plate("data", x.shape[0]):
            h = self.enc(x * mask)
            pyro.sample("latent", dist.Normal(h[..., :2], h[..., 2:].exp()).to_event(1))


T = 3  # time steps of the sequence model; each datapoint is (T, D // T) with a mask over steps
SEQ = X.reshape(N, T, D // T)
STEPS = torch.arange(T).expand(N, T) < torch.randint(1, T + 1, (N, 1), generator=GEN)


class MarkovSequence(nn.Module):
    """A deep Markov model in miniature: ``pyro.markov`` over steps inside the data plate, masked lengths."""

    def __init__(self):
        super().__init__()
        self.trans, self.emit, self.enc = nn.Linear(2, 2), nn.Linear(2, D // T), nn.Linear(D // T + 2, 4)

    def model(self, x, steps):
        pyro.module("seq", self)
        with pyro.plate("data", x.shape[0]):
            z = x.new_zeros(x.shape[0], 2)
            for t in pyro.markov(range(T)):
                z = pyro.sample(f"z_{t}", dist.Normal(self.trans(z), 1.0).to_event(1).mask(steps[:, t]))
                logits = self.emit(z)
                pyro.sample(f"x_{t}", dist.Bernoulli(logits=logits).to_event(1).mask(steps[:, t]), obs=x[:, t])

    def guide(self, x, steps):
        pyro.module("seq", self)
        with pyro.plate("data", x.shape[0]):
            z = x.new_zeros(x.shape[0], 2)
            for t in pyro.markov(range(T)):
                h = self.enc(torch.cat([x[:, t], z.expand(*x[:, t].shape[:-1], 2)], -1))
                z = pyro.sample(f"z_{t}", dist.Normal(h[..., :2], h[..., 2:].exp()).to_event(1).mask(steps[:, t]))


def _function_pair():
    """``pyro.module`` + two functions, the Pyro tutorials' other style."""
    dec, enc = nn.Linear(2, D), nn.Linear(D, 4)

    def model(x):
        pyro.module("f_dec", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("f_enc", enc)
        with pyro.plate("data", x.shape[0]):
            h = enc(x)
            pyro.sample("z", dist.Normal(h[..., :2], h[..., 2:].exp()).to_event(1))

    return model, guide


STYLES = {
    "pyro.module in a module": (lambda: ModuleVAE(), X),
    "PyroModule with PyroParam": (lambda: PyroModuleVAE(), X),
    "functions with pyro.module": (_function_pair, X),
    "pyro.param in a module": (lambda: ParamVAE(), X),
    "dropout decoder": (lambda: ModuleVAE("dropout"), X),
    "BatchNorm decoder": (lambda: ModuleVAE("batchnorm"), X),
    "pyro.factor": (lambda: FactorVAE(), X),
    "masked conditional VAE": (lambda: MaskedCVAE(), (X, MASK)),
    "pyro.markov sequence": (lambda: MarkovSequence(), (SEQ, STEPS)),
}

SMALL = {"num_samples": 200, "gaps": False, "sbc_simulations": 10, "reference_warmup": 10, "reference_samples": 10}


def _tensors(module):
    return {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def _pair(made):
    return (made, None) if isinstance(made, nn.Module) else made


def _pyro_elbo(model, guide, args, num_particles):
    """Pyro's own Trace_ELBO per datapoint, one particle at a time (it needs no broadcasting), without grad."""
    total = 0.0
    with torch.no_grad():
        for _ in range(num_particles):
            total -= pyro.infer.Trace_ELBO().differentiable_loss(model, guide, *args).item()
    return total / num_particles / len(args[0])


@pytest.mark.parametrize("style", list(STYLES))
def test_a_pyro_style_pair_goes_through_every_step(style, tmp_path):
    make, data = STYLES[style]
    torch.manual_seed(0)
    owner, guide = _pair(make())
    pair_model = owner
    ppvae.fit(pair_model, data, guide=guide, epochs=2, batch_size=32, lr=1e-2, progress=False, seed=0)
    module = owner if isinstance(owner, nn.Module) else None
    state = _tensors(module) if module is not None else None

    ev = ppvae.evaluate(pair_model, data, guide=guide, num_samples=200, seed=1, keep_log_weights=True)
    assert np.isfinite(ev.elbo).all() and ev.discrete is True  # Bernoulli observations: a probability of x
    model_fn, guide_fn = (owner.model, owner.guide) if guide is None else (owner, guide)
    args = data if isinstance(data, tuple) else (data,)
    if module is not None:
        module.eval()
    with model_store(model_fn, guide_fn, module):  # the pair's own pyro.param values
        pyro_elbo = _pyro_elbo(model_fn, guide_fn, args, 100)
    if module is not None:
        module.train()
    se = float((ev.log_weights - ev.log_weights.mean(1, keepdims=True)).std()) * (1 / (N * 200) + 1 / (N * 100)) ** 0.5
    assert ev.elbo.mean() == pytest.approx(pyro_elbo, abs=5 * se + 1e-6)
    if module is not None:  # scoring changed nothing: weights, BatchNorm statistics, the training flag
        assert all(torch.equal(state[k], v) for k, v in _tensors(module).items()) and module.training

    d = ppvae.diagnose(pair_model, data, guide=guide, seed=0, **SMALL)
    assert d.failed == {} and all(isinstance(why, str) and why for why in d.skipped.values())
    if style == "pyro.markov sequence":  # padded steps: NUTS would wander in their flat posterior, so it says so
        assert "masked out for some datapoints" in d.skipped["reference"]
    else:
        assert "reference" in d.parts

    splits = DataSplits("styles", train=data, val=None, test=data, data_shape=tuple(args[0].shape[1:]), levels=2,
                        binarize="static")  # fmt: skip
    settings = GridSettings(num_samples=50, max_test_points=32, diagnose={"gaps": False, "reference": False,
                                                                          "sbc": False})  # fmt: skip
    fitted = owner if guide is None else (owner, guide)
    comp = compare(splits, priors=[], models={style: fitted}, settings=settings, progress=None)
    row = comp.table().iloc[0]
    assert row["status"] == "ok"
    if style in ("masked conditional VAE", "pyro.markov sequence"):  # a probability of the elements its masks keep
        assert ev.masked and ev.bits_per_dim is None and "probability of the elements its masks keep" in row["group"]
    else:
        assert not ev.masked and "probability of binary pixels" in row["group"]

    path = ppvae.save(fitted, tmp_path / "pair.pt")
    fresh_owner, fresh_guide = _pair(make())
    loaded = ppvae.load(path, model=fresh_owner if fresh_guide is None else (fresh_owner, fresh_guide))
    loaded_model, loaded_guide = (loaded, None) if fresh_guide is None else loaded
    again = ppvae.evaluate(loaded_model, data, guide=loaded_guide, num_samples=200, seed=1)
    np.testing.assert_allclose(again.elbo, ev.elbo, rtol=1e-5, atol=1e-5)


def test_poutine_scale_does_not_rescale_the_scores():
    """A model under poutine.scale trains with the scaled ELBO; its scores are the unscaled model's."""
    torch.manual_seed(0)
    vae = ModuleVAE()
    scaled = poutine.scale(vae.model, scale=0.01)
    plain = ppvae.evaluate(vae.model, X, guide=vae.guide, num_samples=100, seed=3)
    with pytest.warns(UserWarning, match="scale"):
        ev = ppvae.evaluate(scaled, X, guide=vae.guide, num_samples=100, seed=3)
    np.testing.assert_allclose(ev.elbo, plain.elbo, rtol=1e-6)
