"""What a pair observes: whether its observed sites are probabilities of the data (discrete support) or densities.

A log-probability of discrete data (a Bernoulli on binary pixels, a Categorical on grey levels) is a probability of
the data and can be read as bits/dim and ranked against any other model's probability of the same data; a
log-density cannot (its value depends on the units of x). ``ppvae.VAE`` knows its likelihood; any other pair is asked
by running it once and reading the ``support`` of every observed site's distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine

from ppvae._rng import fork_rngs

__all__ = ["observed_sites", "observed_discrete", "discrete_support"]


def observed_sites(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> dict[str, dict]:
    """The observed sample sites of ``model`` (``obs=`` given) run on ``args`` with the guide's latents replayed,
    by name; ``pyro.factor`` terms (a ``Unit`` distribution) are not observations and are left out.

    Runs guide and model once, blocked from any enclosing handler, without gradients, on copies of the RNGs.
    """
    with torch.no_grad(), poutine.block(), fork_rngs():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return _observed(model_trace)


def observed_discrete(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> bool | None:
    """True when every observed site has a discrete support (the log-weights are log-probabilities of the data),
    False when every one is continuous (densities), None when there are none or they are mixed."""
    return _kind(observed_sites(model, guide, *args, **kwargs))


def discrete_support(model_trace: Any) -> bool | None:
    """:func:`observed_discrete` read from a model trace already made (no run of the pair)."""
    return _kind(_observed(model_trace))


def _observed(model_trace: Any) -> dict[str, dict]:
    return {
        name: site
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and site["is_observed"] and not isinstance(_base(site["fn"]), dist.Unit)
    }


def _kind(sites: dict[str, dict]) -> bool | None:
    kinds = {bool(site["fn"].support.is_discrete) for site in sites.values()}
    return kinds.pop() if len(kinds) == 1 else None


def _base(fn: Any) -> Any:
    """The distribution under masks and Independent wrappers (``pyro.factor`` is a masked or scaled ``Unit``)."""
    while isinstance(fn, (dist.MaskedDistribution, dist.Independent)):
        fn = fn.base_dist
    return fn
