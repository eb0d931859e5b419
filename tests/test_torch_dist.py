"""A plain torch distribution at a Pyro site: a zuko flow prior through fit, evaluate, diagnose and save/load, and
the one sentence ppvae says when it is not wrapped."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import ppvae
from ppvae.blocks import as_pyro
from ppvae.blocks.torch_dist import TorchAsPyro

zuko = pytest.importorskip("zuko")


class FlowPriorVAE(nn.Module):
    """p(z) a masked autoregressive flow (zuko), p(x | z) Normal, q(z | x) mean-field Normal."""

    def __init__(self, wrap=True):
        super().__init__()
        self.wrap = wrap
        self.flow = zuko.flows.MAF(features=2, transforms=2, hidden_features=(16,))
        self.dec, self.enc = nn.Linear(2, 6), nn.Linear(6, 4)

    def model(self, x=None, batch_size=1):
        n = batch_size if x is None else x.shape[0]
        with pyro.plate("data", n):
            prior = self.flow()
            z = pyro.sample("z", as_pyro(prior) if self.wrap else prior)
            return pyro.sample("x", dist.Normal(self.dec(z), 0.5).to_event(1), obs=x)

    def guide(self, x=None, batch_size=1):
        if x is None:
            return
        with pyro.plate("data", x.shape[0]):
            h = self.enc(x)
            pyro.sample("z", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))


X = torch.randn(256, 6, generator=torch.Generator().manual_seed(0))


def test_the_wrapper_scores_and_draws_as_the_flow_does():
    flow = zuko.flows.MAF(features=2, transforms=2, hidden_features=(8,))()
    d = as_pyro(flow)
    z = torch.randn(5, 2)
    assert isinstance(d, TorchAsPyro) and torch.equal(d.log_prob(z), flow.log_prob(z))
    assert d.event_shape == (2,) and d.has_rsample and d.support.event_dim == 1  # zuko's support raises
    assert d.expand((7,)).sample().shape == (7, 2)  # inside a plate
    normal = dist.Normal(0.0, 1.0)
    assert as_pyro(normal) is normal
    with pytest.raises(ppvae.ConfigError, match="takes a torch.distributions.Distribution"):
        as_pyro(3.0)


def test_a_zuko_flow_prior_trains_scores_diagnoses_and_saves(tmp_path):
    torch.manual_seed(0)
    vae = FlowPriorVAE()
    ppvae.fit(vae, X, epochs=3, batch_size=64, progress=False, seed=0)
    ev = ppvae.evaluate(vae, X[:64], num_samples=1000, seed=1, keep_log_weights=True)
    # The ELBO is Pyro's own Trace_ELBO on the same pair (eval mode, 1000 particles): within 5 Monte Carlo standard
    # errors of the difference (the log-weights' spread over 64 × 1000 draws, for each estimate).
    vae.eval()
    with torch.no_grad():
        loss = pyro.infer.Trace_ELBO(num_particles=1000, vectorize_particles=True, max_plate_nesting=1)
        pyro_elbo = -loss.loss(vae.model, vae.guide, X[:64]) / 64
    vae.train()
    se = float((ev.log_weights - ev.log_weights.mean(1, keepdims=True)).std()) / (64 * 1000) ** 0.5
    assert ev.elbo.mean() == pytest.approx(pyro_elbo, abs=5 * 2**0.5 * se)
    d = ppvae.diagnose(vae, X[:64], num_samples=100, gaps=False, sbc_simulations=20, reference_warmup=20,
                       reference_samples=20, seed=0)  # fmt: skip
    assert "sbc" not in d.skipped and "sbc" not in d.failed and d.sbc is not None  # the flow's generation path
    ppvae.save(vae, tmp_path / "flow.pt")
    again = ppvae.load(tmp_path / "flow.pt", model=FlowPriorVAE())
    assert ppvae.evaluate(again, X[:64], num_samples=1000, seed=1).elbo.mean() == pytest.approx(ev.elbo.mean())


def test_an_unwrapped_flow_is_one_sentence_naming_the_site():
    with pytest.raises(ppvae.ConfigError) as err:
        ppvae.fit(FlowPriorVAE(wrap=False), X, epochs=1, batch_size=64, progress=False)
    text = str(err.value)
    assert "'z' samples from NormalizingFlow" in text and "as_pyro" in text and "Trace Shapes" not in text
