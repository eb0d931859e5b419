"""ppvae.infer.pair: one adapter from what users pass to a model/guide pair, and what each diagnostic may ask."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import ppvae
from ppvae.errors import ConfigError
from ppvae.infer.pair import AmortizedEncoder, GenerativePath, as_pair, is_builtin_vae


def model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)


def guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))


class Subclassed(ppvae.VAE):
    def model(self, x=None, batch_size=None):  # an overridden model: no direct ELBO, no per-datapoint refit
        return super().model(x, batch_size)


class Methods(nn.Module):
    def model(self, x):
        return model(x)

    def guide(self, x):
        return guide(x)


def test_every_form_becomes_one_pair():
    vae = ppvae.VAE((4,), 2)
    p = as_pair(vae)
    assert p.owner is vae and p.model == vae.model and p.guide == vae.guide
    assert p.is_builtin_vae and p.encoder is vae and p.generator is vae
    assert isinstance(vae, AmortizedEncoder) and isinstance(vae, GenerativePath)

    f = as_pair(model, guide)
    assert (f.model, f.guide, f.owner) == (model, guide, None)
    assert not f.is_builtin_vae and f.encoder is None and f.generator is None

    m = Methods()
    pm = as_pair(m)
    assert pm.owner is m and not pm.is_builtin_vae and pm.encoder is None


def test_a_subclass_or_a_foreign_guide_is_not_the_builtin_vae():
    sub = Subclassed((4,), 2)
    assert not is_builtin_vae(sub) and not as_pair(sub).is_builtin_vae
    assert as_pair(sub).encoder is sub  # it still has an encoder and a prior: collapse applies
    vae = ppvae.VAE((4,), 2)
    foreign = as_pair(vae, guide)
    assert not foreign.is_builtin_vae and foreign.encoder is None  # q is not the VAE's own encoder


def test_what_is_not_a_pair_is_told_in_one_line():
    with pytest.raises(ConfigError, match="sbc needs a guide"):
        as_pair(model, what="sbc")
    with pytest.raises(ConfigError, match="must be callables"):
        as_pair(model, guide=3)
    assert as_pair(model, guide).model(torch.zeros(3, 1)) is None
