"""What a pair observes: whether its observed sites are probabilities of the data (discrete support) or densities.

A log-probability of discrete data (a Bernoulli on binary pixels, a Categorical on grey levels) is a probability of
the data and can be read as bits/dim and ranked against any other model's probability of the same data; a
log-density cannot (its value depends on the units of x). ``ppvae.VAE`` knows its likelihood; any other pair is asked
by running it once and reading the ``support`` of every observed site's distribution.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine

from ppvae._rng import fork_rngs

__all__ = [
    "observed_sites",
    "observed_discrete",
    "discrete_support",
    "masked_sites",
    "observed_kind",
    "mask_fingerprint",
    "site_masks",
    "is_masked",
    "name_sites",
]


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


def observed_kind(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> tuple[bool | None, tuple[str, ...]]:
    """:func:`observed_discrete` and :func:`masked_sites` of ``model`` run on ``args`` with the guide's latents
    replayed, from one run of the pair (as :func:`observed_sites` runs it)."""
    trace = _model_trace(model, guide, args, kwargs)
    return discrete_support(trace), masked_sites(trace)


def masked_sites(model_trace: Any) -> tuple[str, ...]:
    """The observed sites some of whose elements are masked out of the log-density (``poutine.mask`` or
    ``Distribution.mask`` with a mask that is not all True), in trace order.

    A pair that masks observations scores a probability of the elements it keeps (the hidden pixels a conditional
    model predicts, the entries of a matrix that are not missing), not of the whole datapoint: its log p̂ neither
    divides by the data's size into bits/dim nor ranks against a model of every element.
    """
    return tuple(name for name, site in _observed(model_trace).items() if is_masked(site))


def name_sites(names: Sequence[str], most: int = 3) -> str:
    """``"x_1, x_2, x_3 and 97 more"``: site names for a sentence (a ``pyro.markov`` model has one per step)."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def site_masks(site: dict) -> list[Any]:
    """A sample site's masks: the ``poutine.mask`` on it and those of the ``MaskedDistribution`` wrappers of its
    distribution (bools or bool tensors; None where there is none)."""
    masks, fn = [site.get("mask")], site["fn"]
    while isinstance(fn, (dist.MaskedDistribution, dist.Independent)):
        if isinstance(fn, dist.MaskedDistribution):
            masks.append(fn._mask)
        fn = fn.base_dist
    return [m for m in masks if m is not None]


def is_masked(site: dict) -> bool:
    """Whether some element of the site's log-density is masked out."""
    return any(not (bool(m.all()) if isinstance(m, torch.Tensor) else bool(m)) for m in site_masks(site))


def mask_fingerprint(model_trace: Any) -> str | None:
    """A hash of the masked observed sites' names, masks and value shapes in ``model_trace`` (None when none is
    masked): two pairs scored on the same batch with the same fingerprint keep the same elements of it."""
    sites = {name: site for name, site in _observed(model_trace).items() if is_masked(site)}
    if not sites:
        return None
    digest = hashlib.sha256()
    for name, site in sites.items():
        digest.update(f"{name}:{tuple(site['value'].shape)}".encode())
        for m in site_masks(site):
            t = torch.as_tensor(m, dtype=torch.bool).detach().cpu()
            digest.update(f"{tuple(t.shape)}".encode() + t.numpy().tobytes())
    return digest.hexdigest()[:12]


def _observed(model_trace: Any) -> dict[str, dict]:
    # pyro.factor is a Unit and pyro.deterministic a masked Delta: neither is an observation of the data
    return {
        name: site
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and site["is_observed"]
        and not isinstance(_base(site["fn"]), dist.Unit)
        and not site["infer"].get("_deterministic")
    }


def _kind(sites: dict[str, dict]) -> bool | None:
    kinds = {bool(site["fn"].support.is_discrete) for site in sites.values()}
    return kinds.pop() if len(kinds) == 1 else None


def _base(fn: Any) -> Any:
    """The distribution under masks and Independent wrappers (``pyro.factor`` is a masked or scaled ``Unit``)."""
    while isinstance(fn, (dist.MaskedDistribution, dist.Independent)):
        fn = fn.base_dist
    return fn
