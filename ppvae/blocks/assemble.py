"""Plumbing of :class:`ppvae.VAE`: the blocks built from specs, checked sizes, and the config that rebuilds them.

Kept out of :mod:`ppvae.vae` so that file stays the one-screen template of a model/guide pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from ppvae._validate import is_int
from ppvae.blocks.guides import GUIDES
from ppvae.blocks.likelihoods import LIKELIHOODS
from ppvae.blocks.nets import build_decoder, build_encoder
from ppvae.blocks.priors import PRIORS
from ppvae.errors import ConfigError

__all__ = ["build_blocks", "blocks_config", "check_data_shape", "check_latent_dim", "check_generate_size"]

#: The VAE's attribute for each block and the config key it is saved under.
BLOCK_KEYS = {"prior": "prior", "likelihood": "likelihood", "guide_head": "guide", "encoder": "encoder",
              "decoder": "decoder"}  # fmt: skip


def check_latent_dim(latent_dim: Any) -> int:
    """``latent_dim`` as a positive int; :class:`ConfigError` otherwise."""
    if not (is_int(latent_dim) and latent_dim > 0):
        raise ConfigError(f"latent_dim must be a positive integer, got {latent_dim!r}")
    return int(latent_dim)


def check_data_shape(data_shape: object) -> tuple[int, ...]:
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


def build_blocks(
    data_shape: tuple[int, ...],
    latent_dim: int,
    *,
    prior: Any,
    likelihood: Any,
    guide: Any,
    encoder: Any,
    decoder: Any,
) -> dict[str, nn.Module]:
    """The five blocks of a VAE from names, specs or modules, keyed by the VAE's attribute names.

    The decoder's output shape is ``(likelihood.num_params, *data_shape)`` and the guide head reads the encoder's
    ``out_features``. Torch refusing the sizes (out of memory, a zero or negative width) is a :class:`ConfigError`.
    """
    try:
        lik = LIKELIHOODS.build(likelihood, data_shape=data_shape)
        enc = build_encoder(encoder, data_shape)
        return {
            "likelihood": lik,
            "encoder": enc,
            "decoder": build_decoder(decoder, latent_dim, (lik.num_params, *data_shape)),
            "guide_head": GUIDES.build(guide, in_features=enc.out_features, latent_dim=latent_dim),
            "prior": PRIORS.build(prior, latent_dim=latent_dim, data_shape=data_shape),
        }
    except RuntimeError as err:
        first = str(err).splitlines()[0][:160]
        need = "not enough memory for" if "alloc" in first or "out of memory" in first else "cannot build"
        raise ConfigError(
            f"{need} the networks of a VAE with data_shape {data_shape}, latent_dim {latent_dim}, encoder "
            f"{_describe(encoder)} and decoder {_describe(decoder)} (torch: {first}); use positive, smaller sizes"
        ) from None


def blocks_config(vae: nn.Module) -> dict:
    """JSON-serializable configuration rebuilding ``vae`` from its blocks' registered specs (see :func:`ppvae.save`);
    :class:`ConfigError` naming the first custom block without one."""
    cfg: dict = {"data_shape": list(vae.data_shape), "latent_dim": vae.latent_dim}
    for attr, key in BLOCK_KEYS.items():
        module = getattr(vae, attr)
        spec = getattr(module, "spec", None)
        if spec is None:
            raise ConfigError(
                f"the {key} is a custom {type(module).__name__} with no registered spec, so this VAE cannot be "
                "rebuilt from a config; save the weights with ppvae.save(model, path) and load them with "
                "ppvae.load(path, model=<a freshly built model>)"
            )
        cfg[key] = _strip_context(spec)
    return cfg


def check_generate_size(n: Any, data_shape: Sequence[int], latent_dim: int, num_params: int) -> int:
    """``n`` datapoints to generate, as an int, when the largest tensor stays under 2^31 float32 elements (8 GiB)."""
    if not (is_int(n) and n > 0):
        raise ConfigError(f"the number of datapoints to generate must be a positive integer, got {n!r}")
    out = int(n) * max(latent_dim, num_params * math.prod(data_shape))
    if out > 2**31:
        raise ConfigError(
            f"generating {n} datapoints of shape {tuple(data_shape)} needs tensors of {out:,} numbers; "
            "generate fewer at a time (e.g. in batches of 10,000)"
        )
    return int(n)


def _describe(spec: object) -> str:
    return repr(spec) if isinstance(spec, (str, dict)) else type(spec).__name__


def _strip_context(spec: dict) -> dict:
    """Drop arguments the VAE supplies itself (shapes), keeping the user's options."""
    kwargs = {
        k: v for k, v in spec["kwargs"].items() if k not in ("data_shape", "latent_dim", "in_features", "out_shape")
    }
    return {"name": spec["name"], "kwargs": kwargs}
