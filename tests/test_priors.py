import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from ppvae.blocks.guides import GUIDES
from ppvae.blocks.priors import PRIORS, MixturePrior, NormalPrior, VampPrior
from ppvae.errors import ConfigError

D = 3
DATA_SHAPE = (2, 3)
B, S = 5, 4


class ToyEncoder(nn.Module):
    """q(z | x) = N(W flatten(x) + b, 1): batch ``x.shape[:-2]``, event ``(D,)``."""

    def __init__(self, latent_dim: int = D) -> None:
        super().__init__()
        self.lin = nn.Linear(math.prod(DATA_SHAPE), latent_dim)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        return dist.Normal(self.lin(x.flatten(-2)), 1.0).to_event(1)


def make(name: str, latent_dim: int = D, **kwargs):
    prior = PRIORS.build({"name": name, "kwargs": kwargs}, latent_dim=latent_dim, data_shape=DATA_SHAPE)
    if name == "vamp":
        prior.attach(ToyEncoder(latent_dim))
    return prior


@pytest.mark.parametrize("name", PRIORS.names())
def test_shapes_log_prob_and_samples(name):
    p = make(name)()
    assert p.batch_shape == () and p.event_shape == (D,)
    for shape in [(B, D), (S, B, D)]:
        lp = p.log_prob(torch.randn(shape))
        assert lp.shape == shape[:-1] and torch.isfinite(lp).all()
    assert p.sample().shape == (D,)
    z = p.sample((S, B))
    assert z.shape == (S, B, D) and torch.isfinite(p.log_prob(z)).all()


@pytest.mark.parametrize("name", PRIORS.names())
def test_inside_data_and_particle_plates(name):
    prior = make(name)

    def model():
        with pyro.plate("data", B):
            return pyro.sample("z", prior())

    def vectorized():
        with pyro.plate("particles", S, dim=-2), pyro.plate("data", B):
            return pyro.sample("z", prior())

    for fn, shape in [(model, (B,)), (vectorized, (S, B))]:
        tr = poutine.trace(fn).get_trace()
        tr.compute_log_prob()
        site = tr.nodes["z"]
        assert site["value"].shape == shape + (D,)
        assert site["log_prob"].shape == shape and torch.isfinite(site["log_prob"]).all()
        # Scoring a guide's z of the same shape (the model site is replayed in training).
        z = torch.randn(shape + (D,))
        tr = poutine.trace(poutine.condition(fn, data={"z": z})).get_trace()
        tr.compute_log_prob()
        assert torch.allclose(tr.nodes["z"]["log_prob"], prior().log_prob(z), atol=1e-5)


@pytest.mark.parametrize("name", ["mixture", "vamp", "flow"])
def test_gradients_reach_every_parameter(name):
    prior = make(name)
    params = dict(prior.named_parameters())
    assert params
    (-prior().log_prob(torch.randn(S, B, D)).sum()).backward()
    for pname, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", PRIORS.names())
def test_follows_module_dtype(name):
    # A proxy for devices: constants must be buffers, not fresh tensors.
    prior = make(name).double()
    if name == "vamp":
        prior.attach(ToyEncoder().double())  # the encoder is not the prior's submodule
    z = torch.randn(B, D, dtype=torch.float64)
    assert prior().log_prob(z).dtype == torch.float64
    assert prior().sample((2,)).dtype == torch.float64


def test_closed_forms():
    z = torch.randn(S, B, D) * 2
    normal = -0.5 * z.square() - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(make("normal")().log_prob(z), normal.sum(-1), atol=1e-5)
    laplace = -z.abs() / 2.0 - math.log(4.0)
    assert torch.allclose(make("laplace", scale=2.0)().log_prob(z), laplace.sum(-1), atol=1e-5)
    v = 3.0
    student = (
        math.lgamma((v + 1) / 2)
        - math.lgamma(v / 2)
        - 0.5 * math.log(v * math.pi)
        - (v + 1) / 2 * torch.log1p(z.square() / v)
    )
    assert torch.allclose(make("student-t")().log_prob(z), student.sum(-1), atol=1e-5)


def test_mixture_known_values():
    z = torch.randn(S, B, D)
    one = make("mixture", components=1)
    with torch.no_grad():
        one.means.zero_()
    assert torch.allclose(one().log_prob(z), NormalPrior(D)().log_prob(z), atol=1e-5)

    mix = make("mixture", components=3)
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
        mix.log_scales.normal_(0, 0.3)
    log_pi = torch.log_softmax(mix.logits, 0)
    terms = [log_pi[k] + dist.Normal(mix.means[k], mix.log_scales[k].exp()).log_prob(z).sum(-1) for k in range(3)]
    assert torch.allclose(mix().log_prob(z), torch.logsumexp(torch.stack(terms, -1), -1), atol=1e-5)


def test_vamp_equals_manual_logsumexp():
    prior = make("vamp", components=7)
    z = torch.randn(S, B, D)
    enc = prior._encode
    terms = [enc(prior.u[k]).log_prob(z) for k in range(7)]
    expected = torch.logsumexp(torch.stack(terms, -1), -1) - math.log(7)
    assert torch.allclose(prior().log_prob(z), expected, atol=1e-5)


@pytest.mark.parametrize("guide", GUIDES.names())
def test_vamp_with_every_guide_family(guide):
    K, F = 4, 8
    head = GUIDES.build(guide, in_features=F, latent_dim=D)
    net = nn.Linear(math.prod(DATA_SHAPE), F)
    prior = VampPrior(D, DATA_SHAPE, components=K)
    prior.attach(lambda x: head(net(x.flatten(-2))))
    p = prior()
    z = torch.randn(S, B, D)
    terms = [head(net(prior.u[k].flatten())).log_prob(z) for k in range(K)]
    expected = torch.logsumexp(torch.stack(terms, -1), -1) - math.log(K)
    assert torch.allclose(p.log_prob(z), expected, atol=1e-4)
    assert p.sample((S, B)).shape == (S, B, D)
    p.log_prob(z).sum().backward()
    assert prior.u.grad.abs().sum() > 0


def test_vamp_keeps_the_encoder_out_of_its_parameters():
    prior = VampPrior(D, DATA_SHAPE, components=5)
    prior.attach(ToyEncoder())
    assert [n for n, _ in prior.named_parameters()] == ["u"]
    assert list(prior.state_dict()) == ["u"]
    assert not list(prior.children())


def test_vamp_errors():
    prior = VampPrior(D, DATA_SHAPE, components=5)
    with pytest.raises(ConfigError, match="VampPrior needs the encoder"):
        prior()
    prior.attach(lambda x: dist.Normal(torch.zeros(D), 1.0).to_event(1))
    with pytest.raises(ConfigError, match=r"batch_shape \(5,\)"):
        prior()
    with pytest.raises(ConfigError):
        prior.attach("encoder")


def test_flow_prior_is_normalized():
    """A 2-D grid integral of exp(log p) is 1 only if the log-determinants are right (0.8x them gives 0.93)."""
    torch.manual_seed(1)
    prior = make("flow", latent_dim=2, num_flows=2)
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(2.0)  # a clearly non-Gaussian density
    t = torch.linspace(-10, 10, 801)
    cell = (t[1] - t[0]) ** 2
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = prior().log_prob(grid).exp()
        normal = NormalPrior(2)().log_prob(grid).exp()
    assert 0.5 * (density - normal).abs().sum() * cell > 0.3  # total variation from N(0, I)
    assert abs((density.sum() * cell).item() - 1.0) < 0.01


def test_flow_samples_follow_its_density():
    """Samples (sequential inversion) have the density's mean log p: E_p[log p] = -H(p)."""
    torch.manual_seed(2)
    prior = make("flow", latent_dim=2)
    with torch.no_grad():
        p = prior()
        z = p.sample((20000,))
        t = torch.linspace(-10, 10, 801)
        grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
        log_p = p.log_prob(grid)
        neg_entropy = (log_p.exp() * log_p).sum() * (t[1] - t[0]) ** 2
        assert abs(p.log_prob(z).mean() - neg_entropy) < 0.05


def test_registry_errors_and_specs():
    with pytest.raises(ConfigError, match="choose one of: flow, laplace, mixture, normal, student-t, vamp"):
        PRIORS.get("gaussian")
    assert isinstance(PRIORS.build("student_t", latent_dim=D), PRIORS.get("student-t"))
    for name in PRIORS.names():
        spec = make(name).spec
        assert spec["name"] == name and spec["kwargs"]["latent_dim"] == D
        json.dumps(spec)
    assert make("vamp", components=9).spec["kwargs"] == {"latent_dim": D, "data_shape": [2, 3], "components": 9}
    assert isinstance(make("mixture"), MixturePrior)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("laplace", {"scale": 0.0}),
        ("student-t", {"df": -1.0}),
        ("mixture", {"components": 0}),
        ("vamp", {"components": 2.5}),
        ("flow", {"num_flows": 0}),
        ("flow", {"hidden_dims": [2]}),
    ],
)
def test_invalid_options(name, kwargs):
    with pytest.raises(ConfigError):
        make(name, **kwargs)
    with pytest.raises(ConfigError, match="latent_dim"):
        make(name, latent_dim=0)
