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
import math
from collections.abc import Sequence

import pyro
import torch
from pyro.distributions import Distribution
from torch import Tensor, nn

from ppvae._local_params import module_params_are_local
from ppvae._validate import is_int
from ppvae.blocks.guides import GUIDES
from ppvae.blocks.likelihoods import LIKELIHOODS
from ppvae.blocks.nets import build_decoder, build_encoder
from ppvae.blocks.priors import PRIORS
from ppvae.errors import ConfigError

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
        if not (is_int(latent_dim) and latent_dim > 0):
            raise ConfigError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.data_shape = _check_data_shape(data_shape)
        self.latent_dim = latent_dim = int(latent_dim)
        try:
            self.likelihood = LIKELIHOODS.build(likelihood, data_shape=self.data_shape)
            self.encoder = build_encoder(encoder, self.data_shape)
            self.decoder = build_decoder(decoder, latent_dim, (self.likelihood.num_params, *self.data_shape))
            self.guide_head = GUIDES.build(guide, in_features=self.encoder.out_features, latent_dim=latent_dim)
            self.prior = PRIORS.build(prior, latent_dim=latent_dim, data_shape=self.data_shape)
        except RuntimeError as err:
            # torch refusing the sizes: out of memory (CPU or CUDA), or a negative or zero layer width in a spec.
            first = str(err).splitlines()[0][:160]
            need = "not enough memory for" if "alloc" in first or "out of memory" in first else "cannot build"
            raise ConfigError(
                f"{need} the networks of a VAE with data_shape {self.data_shape}, latent_dim {latent_dim}, encoder "
                f"{_describe(encoder)} and decoder {_describe(decoder)} (torch: {first}); use positive, smaller sizes"
            ) from None
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
        if not (is_int(n) and n > 0):
            raise ConfigError(f"the number of datapoints to generate must be a positive integer, got {n!r}")
        out = int(n) * max(self.latent_dim, self.likelihood.num_params * math.prod(self.data_shape))
        if out > 2**31:  # float32 elements of the largest tensor: beyond 8 GiB, refuse instead of exhausting memory
            raise ConfigError(
                f"generating {n} datapoints of shape {self.data_shape} needs tensors of {out:,} numbers; "
                "generate fewer at a time (e.g. in batches of 10,000)"
            )
        z = self.prior().sample((int(n),))
        return self.likelihood.mean(self.decoder(z))

    def config(self) -> dict:
        """JSON-serializable configuration rebuilding this VAE (see :func:`ppvae.save`)."""
        parts = {
            "prior": self.prior,
            "likelihood": self.likelihood,
            "guide": self.guide_head,
            "encoder": self.encoder,
            "decoder": self.decoder,
        }
        cfg: dict = {"data_shape": list(self.data_shape), "latent_dim": self.latent_dim}
        for key, module in parts.items():
            spec = getattr(module, "spec", None)
            if spec is None:
                raise ConfigError(
                    f"the {key} is a custom {type(module).__name__} with no registered spec, so this VAE cannot be "
                    "rebuilt from a config; save the weights with ppvae.save(model, path) and load them with "
                    "ppvae.load(path, model=<a freshly built model>)"
                )
            cfg[key] = _strip_context(spec)
        return cfg


def _describe(spec: object) -> str:
    return repr(spec) if isinstance(spec, (str, dict)) else type(spec).__name__


def _check_data_shape(data_shape: object) -> tuple[int, ...]:
    """``data_shape`` as a tuple of positive ints (whole floats such as 28.0 are accepted); ConfigError otherwise."""
    try:
        dims = tuple(data_shape)  # type: ignore[arg-type]
    except TypeError:
        dims = None
    ok = (
        dims is not None
        and len(dims) > 0
        and not isinstance(data_shape, (str, bytes))
        and all((is_int(d) or (isinstance(d, float) and d.is_integer())) and d >= 1 for d in dims)
    )
    if not ok:
        raise ConfigError(
            f"data_shape must be the shape of one datapoint, a sequence of positive integers such as (1, 28, 28) or "
            f"(784,); got {data_shape!r}"
        )
    return tuple(int(d) for d in dims)  # type: ignore[union-attr]


def _strip_context(spec: dict) -> dict:
    """Drop arguments the VAE supplies itself (shapes), keeping the user's options."""
    kwargs = {
        k: v for k, v in spec["kwargs"].items() if k not in ("data_shape", "latent_dim", "in_features", "out_shape")
    }
    return {"name": spec["name"], "kwargs": kwargs}
