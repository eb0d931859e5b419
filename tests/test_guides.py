import json

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from ppvae.blocks.guides import GUIDES, FullRankGuide, IAFGuide, LowRankGuide, NormalGuide
from ppvae.errors import ConfigError

F, D = 6, 3
B, S = 5, 4


def make(name: str, **kwargs):
    return GUIDES.build({"name": name, "kwargs": kwargs}, in_features=F, latent_dim=D)


@pytest.mark.parametrize("name", GUIDES.names())
@pytest.mark.parametrize("batch", [(B,), (S, B), ()])
def test_shapes_rsample_and_log_prob(name, batch):
    q = make(name)(torch.randn(batch + (F,)))
    assert q.has_rsample
    assert q.batch_shape == batch and q.event_shape == (D,)
    z = q.rsample()
    assert z.shape == batch + (D,)
    lp = q.log_prob(z)
    assert lp.shape == batch and torch.isfinite(lp).all()
    assert q.rsample((2,)).shape == (2,) + batch + (D,)


@pytest.mark.parametrize("name", GUIDES.names())
def test_inside_data_and_particle_plates(name):
    head = make(name)
    h = torch.randn(B, F)

    def guide():
        with pyro.plate("particles", S, dim=-2), pyro.plate("data", B):
            return pyro.sample("z", head(h))

    tr = poutine.trace(guide).get_trace()
    tr.compute_log_prob()
    assert tr.nodes["z"]["value"].shape == (S, B, D)
    assert tr.nodes["z"]["log_prob"].shape == (S, B) and torch.isfinite(tr.nodes["z"]["log_prob"]).all()


@pytest.mark.parametrize("name", GUIDES.names())
def test_rsample_differentiable_wrt_every_parameter(name):
    head = make(name)
    q = head(torch.randn(S, B, F))
    z = q.rsample()
    (z.square().sum() - q.log_prob(z).sum()).backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_fullrank_covariance_is_positive_definite():
    head = FullRankGuide(F, 5)
    h = torch.randn(S, B, F)
    _, tril = head.scale_tril(h)
    assert torch.equal(tril, tril.tril()) and (tril.diagonal(dim1=-2, dim2=-1) > 0).all()
    assert tril.tril(-1).abs().sum() > 0
    cov = head(h).covariance_matrix.double()
    assert torch.allclose(cov, tril.double() @ tril.double().mT, atol=1e-5)
    assert (torch.linalg.eigvalsh(cov) > 0).all()


def test_lowrank_covariance_is_factor_plus_diagonal():
    head = LowRankGuide(F, D, rank=2)
    h = torch.randn(B, F)
    q = head(h)
    loc, scale = head.loc_scale(h)
    factor = head.factor_head(h).reshape(B, D, 2)
    cov = scale.unsqueeze(-1) * (factor @ factor.mT + torch.eye(D)) * scale.unsqueeze(-2)
    z = torch.randn(S, B, D)
    assert torch.allclose(q.log_prob(z), dist.MultivariateNormal(loc, cov).log_prob(z), atol=1e-5)


@pytest.mark.parametrize("cls, extra", [(LowRankGuide, "factor_head"), (FullRankGuide, "tril_head")])
def test_reduces_to_mean_field_when_off_diagonal_is_zero(cls, extra):
    mean_field = NormalGuide(F, D)
    head = cls(F, D)
    head.load_state_dict(mean_field.state_dict(), strict=False)
    h, z = torch.randn(B, F), torch.randn(S, B, D)
    assert not torch.allclose(head(h).log_prob(z), mean_field(h).log_prob(z), atol=1e-3)
    with torch.no_grad():
        getattr(head, extra).weight.zero_()
        getattr(head, extra).bias.zero_()
    assert torch.allclose(head(h).log_prob(z), mean_field(h).log_prob(z), atol=1e-5)


@pytest.mark.parametrize("stable", [True, False])
def test_iaf_log_prob_is_base_minus_log_det(stable):
    """log q(z) = log N(z0) - log|det dz/dz0|, with the Jacobian computed independently by autograd."""
    head = IAFGuide(F, D, num_flows=2, stable=stable)
    with torch.no_grad():
        for p in head.flows.parameters():
            p.mul_(2.0)  # make the flow far from the identity
    h = torch.randn(B, F)
    q = head(h)
    z0 = q.base_dist.rsample()

    def flow(x):
        for t in q.transforms:
            x = t(x)
        return x

    z = flow(z0)
    for i in range(B):
        jac = torch.autograd.functional.jacobian(lambda x, i=i: flow_one(head, h[i], x), z0[i])
        log_det = torch.linalg.slogdet(jac)[1]
        assert log_det.abs() > 0.05
        expected = q.base_dist.log_prob(z0)[i] - log_det
        assert torch.allclose(q.log_prob(z)[i], expected, atol=1e-4)
    # Scoring a z that q did not just sample inverts the flow sequentially: the same value.
    assert torch.allclose(q.log_prob(z.detach().clone()), q.log_prob(z), atol=1e-4)


def flow_one(head: IAFGuide, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    for t in head(h).transforms:
        x = t(x)
    return x


def test_iaf_scores_samples_with_more_leading_dims_than_the_context():
    head = IAFGuide(F, D)
    h = torch.randn(B, F)
    q = head(h)
    z = torch.randn(S, B, D)
    lp = q.log_prob(z)
    assert lp.shape == (S, B)
    expected = torch.stack([head(h).log_prob(z[s].clone()) for s in range(S)])
    assert torch.allclose(lp, expected, atol=1e-4)


def test_registry_errors_and_specs():
    with pytest.raises(ConfigError, match="choose one of: fullrank, iaf, lowrank, normal"):
        GUIDES.get("maf")
    for name in GUIDES.names():
        spec = make(name).spec
        assert spec["name"] == name and spec["kwargs"]["in_features"] == F
        json.dumps(spec)
    assert make("lowrank", rank=4).spec["kwargs"] == {"in_features": F, "latent_dim": D, "rank": 4}
    spec = make("iaf", hidden_dims=(8, 8)).spec
    assert spec["kwargs"]["hidden_dims"] == [8, 8]
    assert GUIDES.build(spec, in_features=F, latent_dim=D).flows[0].nn.hidden_dims == [8, 8]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("lowrank", {"rank": 0}),
        ("iaf", {"num_flows": 0}),
        ("iaf", {"hidden_dims": [2]}),
        ("normal", {"extra": 1}),
    ],
)
def test_invalid_options(name, kwargs):
    with pytest.raises(ConfigError):
        make(name, **kwargs)


def test_wrong_feature_width_is_a_config_error():
    with pytest.raises(ConfigError, match=r"\(\*batch, 6\)"):
        make("normal")(torch.randn(B, F + 1))


@pytest.mark.filterwarnings("ignore:ConditionalAutoRegressiveNN input_dim = 1")
def test_latent_dim_one():
    for name in GUIDES.names():
        head = GUIDES.build(name, in_features=F, latent_dim=1)
        q = head(torch.randn(B, F))
        assert q.rsample().shape == (B, 1) and torch.isfinite(q.log_prob(q.rsample())).all()
