"""``ppvae.check_model``: every problem of a pair said in words, every diagnostic that will not apply named, and the
pair left exactly as it was."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import ppvae


class TutorialPair(nn.Module):
    """Pyro's VAE tutorial style: pyro.module, sites "latent"/"obs", a model that needs x; optionally a BatchNorm
    decoder and a parameter nothing uses."""

    def __init__(self, batchnorm=False, unused=False):
        super().__init__()
        layers = [nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU()] if batchnorm else [nn.Linear(2, 16), nn.ReLU()]
        self.dec = nn.Sequential(*layers, nn.Linear(16, 12))
        self.enc = nn.Linear(12, 4)
        if unused:
            self.spare = nn.Linear(3, 3)

    def model(self, x):
        pyro.module("dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("enc", self.enc)
        with pyro.plate("data", x.shape[0]):
            h = self.enc(x)
            pyro.sample("latent", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))


X = torch.bernoulli(torch.full((16, 12), 0.4), generator=torch.Generator().manual_seed(0))


def _codes(check):
    return {f.code: f for f in check.findings}


def test_a_tutorial_pair_is_explained_and_left_as_it_was():
    pair = TutorialPair(batchnorm=True)
    bn = pair.dec[1]
    bn.running_mean.uniform_(-1, 1)  # trained statistics: normalizing over the wrong axis would change the numbers
    bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in pair.state_dict().items()}
    rng = torch.get_rng_state()
    check = ppvae.check_model(pair, batch=X)
    codes = _codes(check)
    assert check.ok and {"discrete", "scores", "trains", "no-generation-path", "sequential-particles"} <= set(codes)
    assert "BatchNorm" in codes["sequential-particles"].text or "particle" in codes["sequential-particles"].text
    assert set(check.diagnostics) == {"collapse", "gaps", "sbc", "reference"}
    assert check.diagnostics["sbc"] is None  # SBC runs the model itself: it needs no generation path
    # Nothing changed: weights, BatchNorm statistics, the training flag, no .grad written, the caller's RNG.
    assert all(torch.equal(before[k], v) for k, v in pair.state_dict().items()) and pair.training
    assert all(p.grad is None for p in pair.parameters()) and torch.equal(rng, torch.get_rng_state())
    assert "error" not in str(check) and "diagnose part sbc: runs" in str(check)


def test_a_parameter_nothing_uses_is_named():
    check = ppvae.check_model(TutorialPair(unused=True), batch=X)
    text = _codes(check)["no-gradient"].text
    assert "spare.weight" in text and "spare.bias" in text and check.ok


def test_a_pair_that_observes_nothing_is_an_error_with_the_fix():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0))

    check = ppvae.check_model(model, guide, torch.randn(5))
    assert not check.ok and "observes nothing" in _codes(check)["cannot-score"].text
    assert check.diagnostics == {}  # nothing to diagnose before it scores


def test_the_builtin_vae_gets_every_diagnostic():
    vae = ppvae.VAE((12,), 2, encoder={"name": "mlp", "kwargs": {"hidden": [8]}},
                    decoder={"name": "mlp", "kwargs": {"hidden": [8]}})  # fmt: skip
    check = ppvae.check_model(vae, batch=X)
    assert check.ok and all(why is None for why in check.diagnostics.values()) and "generates" in _codes(check)


def test_a_batch_is_required():
    with pytest.raises(ppvae.PPVAEError, match="at least 2 datapoints"):
        ppvae.check_model(TutorialPair(), batch=X[:1])
