"""Site discovery from a trace (ppvae.infer.sites): roles, per-datapoint values and the messages for wrong names."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import config_enumerate

from ppvae.errors import ConfigError, NotApplicable
from ppvae.infer.sites import discover_sites, guide_draws, site_log_prob_rows, site_rows, take_rows


def model(x, labels):
    g = pyro.sample("g", dist.Normal(0.0, 1.0))
    with pyro.plate("batch", x.shape[0], dim=-2):
        y = pyro.sample("y", dist.Categorical(torch.ones(3) / 3))
        z = pyro.sample("latent", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("aux", z.sum(-1) * 0)
        pyro.deterministic("shifted", z + 1, event_dim=1)
        pyro.sample("obs", dist.Normal(z.sum(-1, keepdim=True) + g + y.unsqueeze(-1), 1.0).to_event(1), obs=x)


@config_enumerate
def guide(x, labels):
    pyro.sample("g", dist.Normal(0.0, 1.0))
    with pyro.plate("batch", x.shape[0], dim=-2):
        pyro.sample("y", dist.Categorical(torch.ones(3) / 3))
        pyro.sample("latent", dist.Normal(x.expand(-1, -1, 2), 1.0).to_event(1))


ARGS = (torch.randn(5, 1, 1), torch.arange(5))


def test_roles_from_the_trace_whatever_the_names_and_plate_dim():
    sites = discover_sites(model, guide, ARGS, data_plate="batch")
    assert sites.local == ("latent",) and sites.enumerated == ("y",) and sites.observed == ("obs",)
    assert sites.global_latents == ("g",) and sites.sizes == {"latent": 2}
    assert set(sites.guide_sites) == {"g", "y", "latent"}
    assert "local latents ['latent']" in sites.describe() and "plate 'batch'" in sites.describe()


def test_a_plate_named_as_a_latent_is_called_a_plate():
    sites = discover_sites(model, guide, ARGS, data_plate="batch")
    with pytest.raises(NotApplicable, match="'batch' is the data plate .a plate, not a variable.*latent_sites="):
        sites.latents("batch", "sbc")
    with pytest.raises(NotApplicable, match="'g' is a global latent"):
        sites.latents(["g"], "sbc")
    with pytest.raises(NotApplicable, match="'y' is an enumerated discrete site"):
        sites.latents("y", "sbc")
    with pytest.raises(ConfigError, match="latent_sites must be"):
        sites.latents([], "sbc")
    assert sites.latents(None, "sbc") == ("latent",)


def test_wrong_data_plate_names_the_plates():
    with pytest.raises(
        NotApplicable, match=r"no sample site inside a plate named 'data' \(its plates are \['batch'\]\)"
    ):
        discover_sites(model, guide, ARGS)


def test_rows_and_log_probs_per_datapoint():
    trace = poutine.trace(guide).get_trace(*ARGS)
    site = trace.nodes["latent"]
    rows = site_rows(site, "batch")
    assert rows.shape == (5, 2)
    torch.testing.assert_close(rows, site["value"].reshape(5, 2))
    lp = site_log_prob_rows(site, "batch")
    torch.testing.assert_close(lp, dist.Normal(ARGS[0].reshape(5, 1), 1.0).log_prob(rows).sum(-1))
    assert take_rows(ARGS, [4, 0], 5)[1].tolist() == [4, 0]


def test_guide_draws_vectorized_equal_the_loop_in_distribution():
    draws = guide_draws(guide, ARGS, ("latent",), "batch", 4000)
    assert draws.shape == (4000, 5, 2)
    torch.testing.assert_close(draws.mean(0), ARGS[0].reshape(5, 1).expand(5, 2), atol=0.1, rtol=0)
