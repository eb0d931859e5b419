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

__all__ = ["observed_sites", "observed_discrete", "discrete_support", "masked_sites", "observed_masked"]


def observed_sites(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> dict[str, dict]:
    """The observed sample sites of ``model`` (``obs=`` given) run on ``args`` with the guide's latents replayed,
    by name; ``pyro.factor`` terms (a ``Unit`` distribution) are not observations and are left out.

    Runs guide and model once, blocked from any enclosing handler, without gradients, on copies of the RNGs.
    """
    return _observed(_model_trace(model, guide, args, kwargs))


def _model_trace(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad(), poutine.block(), fork_rngs():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        return poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)


def observed_discrete(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> bool | None:
    """True when every observed site has a discrete support (the log-weights are log-probabilities of the data),
    False when every one is continuous (densities), None when there are none or they are mixed."""
    return _kind(observed_sites(model, guide, *args, **kwargs))


def discrete_support(model_trace: Any) -> bool | None:
    """:func:`observed_discrete` read from a model trace already made (no run of the pair)."""
    return _kind(_observed(model_trace))


def observed_masked(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> tuple[str, ...]:
    """:func:`masked_sites` of ``model`` run on ``args`` with the guide's latents replayed (as :func:`observed_sites`
    runs it)."""
    return masked_sites(_model_trace(model, guide, args, kwargs))


def masked_sites(model_trace: Any) -> tuple[str, ...]:
    """The observed sites some of whose elements are masked out of the log-density (``poutine.mask`` or
    ``Distribution.mask`` with a mask that is not all True), in trace order.

    A pair that masks observations scores a probability of the elements it keeps (the hidden pixels a conditional
    model predicts, the entries of a matrix that are not missing), not of the whole datapoint: its log p̂ neither
    divides by the data's size into bits/dim nor ranks against a model of every element.
    """
    names = []
    for name, site in _observed(model_trace).items():
        masks, fn = [site.get("mask")], site["fn"]
        while isinstance(fn, (dist.MaskedDistribution, dist.Independent)):
            if isinstance(fn, dist.MaskedDistribution):
                masks.append(fn._mask)
            fn = fn.base_dist
        if any(m is not None and not _all_true(m) for m in masks):
            names.append(name)
    return tuple(names)


def _all_true(mask: Any) -> bool:
    return bool(mask.all()) if isinstance(mask, torch.Tensor) else bool(mask)


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
