"""Per-datapoint importance log-weights: the one primitive evaluation, IWAE and diagnostics are built on.

    lw[i, s] = log p(x_i, z_is) − log q(z_is | x_i),   z_is ~ q(z | x_i)

computed for S particles at once in a particle plate left of every plate the model uses. Any model/guide pair
works whose local latents live in the data plate (default name ``"data"``): each site's log-density is summed
over every dim except the particle and data-plate dims, giving ``(N, S)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ppvae.errors import ConfigError

__all__ = ["log_weights", "plate_nesting"]

_PARTICLES = "_ppvae_particles"


def plate_nesting(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> int:
    """How many plate dims model and guide use (so particles can go one dim further left)."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [
        f.dim
        for tr in (guide_trace, model_trace)
        for site in tr.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
        for f in site["cond_indep_stack"]
        if f.vectorized
    ]
    return -min(dims) if dims else 0


def log_weights(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int,
    data_plate: str = "data",
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> Tensor:
    """Importance log-weights ``(N, S)`` in nats, differentiable w.r.t. model and guide parameters.

    Args:
        model, guide: a Pyro pair, called as ``model(*args, **kwargs)``.
        num_samples: S particles per datapoint.
        data_plate: name of the plate holding the local latents and observations.
        max_plate_nesting: plate dims used by the pair (found with a dry run when None).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a whole number ≥ 1 (particles per datapoint), got {num_samples!r}")
    if max_plate_nesting is None:
        max_plate_nesting = plate_nesting(model, guide, *args, **kwargs)
    particle_dim = -max_plate_nesting - 1
    with pyro.plate(_PARTICLES, num_samples, dim=particle_dim):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    total: Tensor | int = 0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob()
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            total = total + sign * _per_datapoint(site, name, data_plate, particle_dim, num_samples)
    if not torch.is_tensor(total):
        raise ConfigError("model and guide have no sample sites: nothing to weight")
    return total.transpose(0, 1)


def _per_datapoint(site: dict, name: str, data_plate: str, particle_dim: int, num_samples: int) -> Tensor:
    """Sum a site's log-density over every dim but (particles, data) → ``(S, N)``."""
    frames = {f.name: f for f in site["cond_indep_stack"]}
    if data_plate not in frames:
        kind = "observed" if site["is_observed"] else "latent"
        raise ConfigError(
            f"{kind} site {name!r} is outside the plate {data_plate!r}, so it has no per-datapoint log-weight; "
            f"put every local latent and observation inside `with pyro.plate({data_plate!r}, N):` (or pass "
            "data_plate=<your plate's name>); global latents are not supported by per-datapoint estimators"
        )
    n = -particle_dim
    lp = site["log_prob"]
    lp = lp.reshape((1,) * max(0, n - lp.dim()) + tuple(lp.shape))  # broadcast dims Pyro left out
    data_axis = n + frames[data_plate].dim
    other = [d for d in range(1, n) if d != data_axis]
    if other:  # e.g. a pixel plate nested inside the data plate
        lp = lp.sum(other)
    return lp.expand(num_samples, frames[data_plate].size)
