"""The VAE as a Pyro model/guide pair: the template to copy for your own models.

Generative model, for each datapoint ``i`` in the plate ``"data"``::

    z_i ~ p(z)                        # prior:      ppvae.blocks.priors
    x_i ~ p(x | decoder(z_i))         # likelihood: ppvae.blocks.likelihoods

Amortized guide::

    z_i ~ q(z | encoder(x_i))         # guide head: ppvae.blocks.guides

Conventions every ppvae diagnostic relies on: local latents live in the plate named ``"data"`` (dim -1),
the latent site is ``"z"`` and the observed site is ``"x"``. Kingma & Welling 2014; Rezende et al. 2014.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pyro
import torch
from pyro.distributions import Distribution
from torch import Tensor, nn

from ppvae._local_params import module_params_are_local
from ppvae.blocks.assemble import blocks_config, build_blocks, check_data_shape, check_generate_size, check_latent_dim

__all__ = ["VAE"]

_ids = itertools.count()


class VAE(nn.Module):
    """A variational autoencoder composed from interchangeable building blocks.

    Args:
        data_shape: shape of one datapoint, e.g. ``(1, 28, 28)`` or ``(784,)``.
        latent_dim: dimension ``D`` of ``z``.
        prior: ``"normal"``, ``"laplace"``, ``"student-t"``, ``"mixture"``, ``"vamp"``, ``"flow"`` or a module
            whose ``forward()`` returns p(z) with event shape ``(D,)``.
        likelihood: a name from :data:`ppvae.blocks.likelihoods.LIKELIHOODS` or a module mapping decoder output
            ``(*batch, num_params, *data_shape)`` to p(x | z).
        guide: ``"normal"`` (mean-field), ``"lowrank"``, ``"fullrank"``, ``"iaf"`` or a module mapping encoder
            features to q(z | x).
        encoder, decoder: ``"mlp"``, ``"conv"``, a spec ``{"name": "mlp", "kwargs": {"hidden": [256]}}``, or a module.

    Shapes: ``model(x)`` and ``guide(x)`` take ``x: (batch, *data_shape)``.
    """

    # Read by ppvae.infer.pair.is_builtin_vae: this class's own model/guide may be scored by the direct ELBO.
    _ppvae_builtin_vae = True

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dim: int,
        prior: str | dict | nn.Module = "normal",
        likelihood: str | dict | nn.Module = "bernoulli",
        guide: str | dict | nn.Module = "normal",
        encoder: str | dict | nn.Module = "mlp",
        decoder: str | dict | nn.Module = "mlp",
    ) -> None:
        super().__init__()
        self.data_shape = check_data_shape(data_shape)
        self.latent_dim = check_latent_dim(latent_dim)
        blocks = build_blocks(
            self.data_shape, self.latent_dim, prior=prior, likelihood=likelihood, guide=guide, encoder=encoder,
            decoder=decoder,
        )  # fmt: skip
        self.likelihood = blocks["likelihood"]  # p(x | decoder output)
        self.encoder = blocks["encoder"]  # x → features
        self.decoder = blocks["decoder"]  # z → (num_params, *data_shape)
        self.guide_head = blocks["guide_head"]  # features → q(z | x)
        self.prior = blocks["prior"]  # p(z)
        if hasattr(self.prior, "attach"):  # VampPrior: a mixture of q(z | pseudo-inputs)
            self.prior.attach(self.encode)
        # A name unique to this instance: under Pyro's own SVI loop, pyro.module registers this model's
        # weights without picking up another model's stale tensors from the global parameter store.
        self.pyro_name = f"vae{next(_ids)}"

    def _register(self) -> None:
        # Under Pyro's own SVI loop the weights must be in the parameter store; ppvae.fit optimizes
        # self.parameters() directly and skips this per-step cost.
        if not module_params_are_local():
            pyro.module(self.pyro_name, self)

    def encode(self, x: Tensor) -> Distribution:
        """q(z | x): batch shape ``x.shape[:-len(data_shape)]``, event shape ``(latent_dim,)``."""
        return self.guide_head(self.encoder(x))

    def decode(self, z: Tensor) -> Distribution:
        """p(x | z): batch shape ``z.shape[:-1]``, event shape ``data_shape``."""
        return self.likelihood(self.decoder(z))

    def model(self, x: Tensor | None = None, batch_size: int = 1) -> Tensor:
        """p(x, z). With ``x=None`` it generates ``batch_size`` new datapoints (for ``pyro.infer.Predictive``)."""
        self._register()
        n = batch_size if x is None else x.shape[0]
        with pyro.plate("data", n):
            z = pyro.sample("z", self.prior())
            return pyro.sample("x", self.decode(z), obs=x)

    def guide(self, x: Tensor | None = None, batch_size: int = 1) -> Tensor | None:
        """q(z | x). Without data there is nothing to amortize: the model then samples z from the prior."""
        self._register()
        if x is None:
            return None
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.encode(x))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x | z] at one draw z ~ q(z | x): the shape of ``x``."""
        return self.likelihood.mean(self.decoder(self.encode(x).sample()))

    @torch.no_grad()
    def generate(self, n: int) -> Tensor:
        """E[x | z] for ``n`` draws z ~ p(z): ``(n, *data_shape)``."""
        n = check_generate_size(n, self.data_shape, self.latent_dim, self.likelihood.num_params)
        z = self.prior().sample((n,))
        return self.likelihood.mean(self.decoder(z))

    def config(self) -> dict:
        """JSON-serializable configuration rebuilding this VAE (see :func:`ppvae.save`)."""
        return blocks_config(self)
