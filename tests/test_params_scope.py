"""pyro.param sites of a module or a pair of functions: kept after fit, saved and loaded, scoped to their model.

The models are probabilistic PCA with the noise scale σ as a ``pyro.param`` and the exact posterior as the guide,
so every log-weight is log p(x) exactly and evaluate's ELBO must equal the closed form log N(x; b, W Wᵀ + σ² I)
at *the model's own* σ (ppvae.data.LinearGaussian gives W and b). Two models share the site name "noise".
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn

import ppvae
from ppvae._constraints import decode_constraint, encode_constraint
from ppvae.data import LinearGaussian
from ppvae.errors import CheckpointError, ConfigError
from ppvae.infer import keep_params, param_state

GEN = LinearGaussian(data_dim=6, latent_dim=2, noise=0.5, seed=0)
ROOT = Path(__file__).resolve().parents[1]


def closed_form(x: torch.Tensor, noise: float) -> float:
    """Mean exact log p(x) over rows, nats, for noise scale ``noise`` (float64)."""
    w = GEN.W.double()
    cov = w @ w.T + noise**2 * torch.eye(6, dtype=torch.float64)
    return (
        torch.distributions.MultivariateNormal(GEN.b.double(), covariance_matrix=cov).log_prob(x.double()).mean().item()
    )


def data(noise: float, n: int = 400, seed: int = 1) -> torch.Tensor:
    return LinearGaussian(data_dim=6, latent_dim=2, noise=noise, seed=0).sample(n, seed=seed)[0]  # same W, b


def _noise(init: float) -> torch.Tensor:
    return pyro.param("noise", torch.tensor(init), constraint=constraints.positive)


def _model(x, noise, w, b):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ w.T + b, noise).to_event(1), obs=x)


def _exact_guide(x, noise, w, b):
    cov = torch.linalg.inv(torch.eye(2) + w.T @ w / noise**2)
    mean = (x - b) @ w @ cov / noise**2
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.MultivariateNormal(mean, covariance_matrix=cov))


class NoisyPCA(nn.Module):
    """A module whose only trained value is the pyro.param "noise" of its model and guide."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.init = init
        self.register_buffer("w", GEN.W.clone())
        self.register_buffer("b", GEN.b.clone())

    def model(self, x):
        _model(x, _noise(self.init), self.w, self.b)

    def guide(self, x):
        _exact_guide(x, _noise(self.init), self.w, self.b)


def make_pair(init: float = 1.0):
    """The same model as two functions (new closures at each call): a pair of functions with a pyro.param."""

    def model(x):
        _model(x, _noise(init), GEN.W, GEN.b)

    def guide(x):
        _exact_guide(x, _noise(init), GEN.W, GEN.b)

    return model, guide


def make_net_pair(seed: int):
    """A pair of functions with networks registered by pyro.module and a pyro.param noise scale."""
    torch.manual_seed(seed)
    dec, enc = nn.Linear(2, 6), nn.Linear(6, 4)

    def model(x):
        pyro.module("dec", dec)
        noise = _noise(1.0)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(dec(z), noise).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        h = enc(x)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(h[:, :2], nn.functional.softplus(h[:, 2:]) + 1e-3).to_event(1))

    model.dec, model.enc = dec, enc  # for the test to look at
    return model, guide


def fit(model, x, guide=None, **kw):
    return ppvae.fit(model, x, guide=guide, **{"epochs": 25, "batch_size": 100, "lr": 0.05, "progress": False, **kw})


def elbo(model, x, guide=None) -> float:
    return float(ppvae.evaluate(model, x, guide=guide, num_samples=4).elbo.mean())


def noise_of(model, guide=None) -> float:
    state = param_state(model, guide)
    return float(state["params"]["noise"].detach().exp())  # the store holds log σ for a positive constraint


# --- modules --------------------------------------------------------------------------------------------------


def test_module_keeps_its_trained_pyro_param_and_scores_with_it():
    x = data(0.3)
    model = NoisyPCA(init=1.0)
    fit(model, x)
    noise = noise_of(model)
    assert abs(noise - 0.3) < 0.02, noise  # trained (the init was 1.0); 2400 numbers give σ to about 1%
    assert "ppvae_pyro_params.noise" in model.state_dict()
    assert abs(elbo(model, x) - closed_form(x, noise)) < 1e-3
    # Plain Pyro after fit sees the trained value in the global store, as after its own SVI loop.
    assert pyro.param("noise").item() == pytest.approx(noise)


def test_two_same_named_modules_each_score_with_their_own_value():
    xa, xb = data(0.3), data(1.5, seed=2)
    a, b = NoisyPCA(), NoisyPCA()
    fit(a, xa)
    fit(b, xb)  # the global store's "noise" is now b's
    na, nb = noise_of(a), noise_of(b)
    assert abs(na - 0.3) < 0.02 and abs(nb - 1.5) < 0.1, (na, nb)
    for model, noise in ((a, na), (b, nb), (a, na)):
        assert abs(elbo(model, xa) - closed_form(xa, noise)) < 1e-3
    d = ppvae.diagnose(a, xa, num_samples=100, collapse=False, gaps=False, sbc=False, reference=False)
    assert abs(float(d.evaluation.elbo.mean()) - closed_form(xa, na)) < 1e-3
    # Its methods given as a pair of functions run in its values too.
    assert abs(elbo(a.model, xa, a.guide) - closed_form(xa, na)) < 1e-3
    # A module ppvae never trained scores with its own initial value, not with a trained model's.
    fresh = NoisyPCA(init=2.0)
    assert abs(elbo(fresh, xa) - closed_form(xa, 2.0)) < 1e-3
    assert param_state(fresh) is None


def test_second_fit_of_a_module_continues_from_its_kept_value():
    x = data(0.3)
    model = NoisyPCA()
    fit(model, x, epochs=2)
    after_two = noise_of(model)
    fit(model, x, epochs=1, lr=1e-9)
    assert noise_of(model) == pytest.approx(after_two, rel=1e-6)


def _run_fresh(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh Python process (a clean parameter store) and read the JSON it prints."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


FRESH_MODULE = """
import json, sys, torch
torch.set_num_threads(1)
import ppvae
from tests.test_params_scope import NoisyPCA, data
model = ppvae.load(sys.argv[1], model=NoisyPCA(init=5.0))
print(json.dumps({"elbo": float(ppvae.evaluate(model, data(0.3), num_samples=4).elbo.mean()),
                  "noise": float(model.ppvae_pyro_params.state()["params"]["noise"].exp())}))
"""


def test_module_save_load_in_a_fresh_process_gives_the_same_number(tmp_path):
    x = data(0.3)
    model = NoisyPCA()
    fit(model, x)
    ppvae.save(model, tmp_path / "m.pt")
    here = elbo(model, x)
    there = _run_fresh(FRESH_MODULE, str(tmp_path / "m.pt"))
    assert there["elbo"] == here
    assert there["noise"] == pytest.approx(noise_of(model), rel=1e-7)
    # The same in this process, into a fresh module whose init differs.
    loaded = ppvae.load(tmp_path / "m.pt", model=NoisyPCA(init=5.0))
    assert elbo(loaded, x) == here


def test_module_checkpoint_resume_is_bitwise_with_a_pyro_param(tmp_path):
    x = data(0.3)

    def run(directory, epochs, resume=False):
        model = NoisyPCA()
        fit(model, x, epochs=epochs, checkpoint_dir=directory, resume=resume, seed=3)
        return model

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    assert torch.equal(full.state_dict()["ppvae_pyro_params.noise"], resumed.state_dict()["ppvae_pyro_params.noise"])
    assert ppvae.load(tmp_path / "b" / "last.pt", model=NoisyPCA()).state_dict().keys() == full.state_dict().keys()


class Loc(PyroModule):
    def __init__(self, loc: float) -> None:
        super().__init__()
        self.loc = PyroParam(torch.full((6,), loc))

    def forward(self):
        return self.loc  # called as a child, with Pyro's context active: PyroModule reads "head.loc" in the store


class PyroLoc(PyroModule):
    """A PyroModule whose child's PyroParam Pyro registers in the parameter store as "head.loc"."""

    def __init__(self, loc: float) -> None:
        super().__init__()
        self.head = Loc(loc)

    def model(self, x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(self.head(), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pass


def test_a_pyro_module_is_never_given_another_modules_weights():
    """In the global store, the second PyroModule was scored with the first's "head.loc" and kept it for good."""
    x = torch.zeros(5, 6)
    a, b = PyroLoc(0.0), PyroLoc(1.0)
    exact = [torch.distributions.Normal(loc, 1.0).log_prob(x).sum(-1).mean().item() for loc in (0.0, 1.0)]
    assert elbo(a, x) == pytest.approx(exact[0], abs=1e-4)
    assert elbo(b, x) == pytest.approx(exact[1], abs=1e-4)
    assert torch.equal(b.head.loc, torch.ones(6))


def test_values_trained_by_pyro_svi_are_kept_with_keep_params():
    x = data(0.3)
    model = NoisyPCA()
    with pyro.get_param_store().scope() as state:
        svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
        for _ in range(150):
            svi.step(x)
    assert "noise" not in pyro.get_param_store()  # the scope took its values with it
    keep_params(model, state)
    noise = noise_of(model)
    assert abs(noise - 1.0) > 0.1  # trained away from the init
    assert abs(elbo(model, x) - closed_form(x, noise)) < 1e-3


# --- pairs of functions -----------------------------------------------------------------------------------------


def test_two_same_named_function_pairs_each_score_with_their_own_value():
    xa, xb = data(0.3), data(1.5, seed=2)
    (ma, ga), (mb, gb) = make_pair(), make_pair()
    ra = fit(ma, xa, guide=ga)
    fit(mb, xb, guide=gb)
    na, nb = noise_of(ma, ga), noise_of(mb, gb)
    assert abs(na - 0.3) < 0.02 and abs(nb - 1.5) < 0.1, (na, nb)
    assert ra.param_state is param_state(ma, ga)
    assert pyro.param("noise").item() == pytest.approx(nb)  # the global store: the pair trained last, as in Pyro
    for model, guide, noise in ((ma, ga, na), (mb, gb, nb), (ma, ga, na)):
        assert abs(elbo(model, xa, guide) - closed_form(xa, noise)) < 1e-3
    # A pair ppvae never trained runs with the global store's pyro.param values, as under Pyro, but never with a
    # value that belongs to a pair ppvae keeps: here its own init.
    mc, gc = make_pair(init=2.0)
    assert abs(elbo(mc, xa, gc) - closed_form(xa, 2.0)) < 1e-3
    pyro.clear_param_store()
    pyro.param("noise", torch.tensor(0.7), constraint=constraints.positive)  # set by the user, as after SVI
    assert abs(elbo(mc, xa, gc) - closed_form(xa, 0.7)) < 1e-3
    assert abs(elbo(ma, xa, ga) - closed_form(xa, na)) < 1e-3  # the trained pair keeps its own


def test_a_pairs_store_goes_with_its_functions():
    import gc
    import weakref

    from ppvae import _param_store

    model, guide = make_pair()
    fit(model, data(0.3), guide=guide, epochs=1)
    noise = weakref.ref(param_state(model, guide)["params"]["noise"])
    kept = len(_param_store._PAIRS)
    del model, guide
    pyro.clear_param_store()  # fit left the trained value there too
    gc.collect()
    assert len(_param_store._PAIRS) == kept - 1 and noise() is None


FRESH_PAIR = """
import json, sys, torch
torch.set_num_threads(1)
import ppvae
from tests.test_params_scope import data, make_net_pair
model, guide = make_net_pair(seed=99)  # other initial weights than the saved ones
ppvae.load(sys.argv[1], model=(model, guide))
value = float(ppvae.evaluate(model, data(0.3), guide=guide, num_samples=4).elbo.mean())
print(json.dumps({"elbo": value, "dec": model.dec.weight.tolist()}))
"""


def test_function_pair_save_load_in_a_fresh_process_gives_the_same_number(tmp_path):
    x = data(0.3)
    model, guide = make_net_pair(seed=0)
    fit(model, x, guide=guide, epochs=5)
    path = ppvae.save((model, guide), tmp_path / "pair.pt", meta={"note": "pair"})
    obj = ppvae.io.read(path)
    assert obj["kind"] == "pair" and {"noise", "dec$$$weight", "enc$$$bias"} <= set(obj["params"])
    here = elbo(model, x, guide)
    there = _run_fresh(FRESH_PAIR, str(path))
    assert there["elbo"] == here
    # The networks registered with pyro.module got the saved weights on the pair's first run.
    assert torch.equal(torch.tensor(there["dec"]), model.dec.weight.detach())
    with pytest.raises(CheckpointError, match="pass the pair"):
        ppvae.load(path)
    with pytest.raises(ConfigError, match="keeps no parameters"):
        ppvae.save(make_pair(), tmp_path / "untrained.pt")


def test_function_pair_checkpoint_resume_is_bitwise_with_a_pyro_param(tmp_path):
    x = data(0.3)

    def run(directory, epochs, resume=False):
        model, guide = make_net_pair(seed=0)
        result = fit(model, x, guide=guide, epochs=epochs, checkpoint_dir=directory, resume=resume, seed=3)
        return result.param_state["params"]

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    assert full.keys() == resumed.keys() and "noise" in full
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name


# --- constraints in files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "constraint",
    [
        constraints.real,
        constraints.positive,
        constraints.unit_interval,
        constraints.simplex,
        constraints.lower_cholesky,
        constraints.interval(-1.0, 3.0),
        constraints.greater_than(torch.tensor([0.5, 1.0])),
        constraints.independent(constraints.positive, 1),
    ],
)
def test_constraints_are_written_by_name_and_read_back(constraint):
    back = decode_constraint(encode_constraint(constraint))
    assert type(back) is type(constraint)
    value = torch.tensor([0.3, -1.2])
    if constraint in (constraints.simplex, constraints.lower_cholesky):
        value = torch.randn(3) if constraint is constraints.simplex else torch.randn(2, 2)
    expected = torch.distributions.transform_to(constraint)(value)
    assert torch.equal(torch.distributions.transform_to(back)(value), expected)


class Odd(constraints.Constraint):
    def check(self, value):
        return value > 0


def test_a_constraint_a_file_cannot_name_is_refused_at_save(tmp_path):
    model = NoisyPCA()
    keep_params(model, {"params": {"odd": torch.zeros(2)}, "constraints": {"odd": Odd()}})
    model.state_dict()  # a state_dict never fails ...
    with pytest.raises(ConfigError, match="pyro.param 'odd' has the constraint .*cannot write"):
        ppvae.save(model, tmp_path / "m.pt")  # ... but a file would not hold it: refused before writing
    assert not (tmp_path / "m.pt").exists()


def test_info_reads_a_module_with_kept_values_and_a_pair_file(tmp_path, capsys):
    from ppvae.cli.app import main

    model = NoisyPCA()
    fit(model, data(0.3), epochs=1)
    ppvae.save(model, tmp_path / "m.pt")
    pair = make_pair()
    fit(pair[0], data(0.3), guide=pair[1], epochs=1)
    ppvae.save(pair, tmp_path / "p.pt")
    assert main(["info", str(tmp_path / "m.pt")]) == 0
    assert main(["info", str(tmp_path / "p.pt")]) == 0
    out = capsys.readouterr().out
    assert "module (NoisyPCA)" in out and "pair (make_pair.<locals>.model/make_pair.<locals>.guide)" in out
    assert "1 numbers in 1 Pyro parameters" in out
