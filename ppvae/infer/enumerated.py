"""Exact sums over enumerated discrete latents, in importance log-weights and in the ELBO.

A pair marks a discrete latent ``y`` for enumeration (``infer={"enumerate": "parallel"}``, or
``pyro.infer.config_enumerate``). Scoring then sums over its values exactly instead of sampling one, with Pyro's
own enumeration (``poutine.enum``) and its tensor contraction (``pyro.ops.contract``), so plates, masks and
``pyro.markov`` chains are handled as ``TraceEnum_ELBO`` handles them:

- **Enumerated by the model only** (the guide does not draw ``y``): ``log p(x, z) = log Σ_y p(x, y, z)``, so

      lw = log Σ_y p(x, y, z) − log q(z | x)

  and the ELBO is ``TraceEnum_ELBO``'s on the same draws of z.
- **Enumerated by the guide** (``q(y | x)`` is a distribution of the guide, e.g. the classifier of the
  semi-supervised M2 model): each particle draws ``z_y ~ q(z | x, y)`` for every value of y, and

      lw = log Σ_y p(x, y, z_y) / q(z_y | x, y)

  an unbiased estimate of p(x) stratified over y (``q(y | x)`` cancels out of it: the weight of value y is its
  contribution to p(x), not the guide's guess). The ELBO is not the mean of these weights (that would be a
  tighter bound than the pair's) but ``TraceEnum_ELBO``'s, per datapoint, from Pyro's DiCE expectation:

      ELBO = Σ_y q(y | x) E_q(z|x,y)[log p(x, y, z) − log q(y, z | x)]

Both are per (particle, datapoint): shape ``(P, N)``. Scores are of the model's own densities: each site's
log-probability is unscaled and masked (see :mod:`ppvae.infer.logweights`). One difference from TraceEnum_ELBO: an
enumerated site masked with ``Distribution.mask()`` (not ``poutine.mask``) has its values' probabilities summed
unmasked, so a masked element adds nothing; TraceEnum_ELBO adds log K for it (K values), so there the two differ.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

import torch
from pyro.distributions import Independent, MaskedDistribution
from pyro.infer.util import Dice
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree, contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.trace_struct import Trace
from torch import Tensor

__all__ = ["is_enumerated", "enumerable", "enumerated_scores"]


def is_enumerated(site: dict) -> bool:
    """Whether a traced site's value is the enumeration of its support (it ran under ``poutine.enum``)."""
    return site["infer"].get("_enumerate_dim") is not None


def enumerable(*traces: Trace) -> str | None:
    """None when these traces can be scored by exact enumeration, else why not (they are then sampled).

    Sequential enumeration and several samples per site (``infer={"num_samples": k}``) are TraceEnum_ELBO's own
    schemes; scoring draws those sites like any other (an unbiased importance sample).
    """
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["infer"].get("enumerate") == "sequential":
                return f"site {name!r} is marked for sequential enumeration"
            if site["infer"].get("num_samples") is not None:
                return f"site {name!r} asks for several samples (infer num_samples)"
    return None


def enumerated_scores(
    model_trace: Trace,
    guide_trace: Trace,
    model_terms: list[tuple[str, dict]],
    guide_terms: list[tuple[str, dict]],
    data_plate: str,
    particle_plate: str | None,
    sizes: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """``(lw, elbo)``, each ``(P, N)``: log-weights summed exactly over enumerated sites, and the ELBO's terms.

    Args:
        model_trace, guide_trace: traces of one run under ``poutine.enum`` (log-probabilities computed).
        model_terms: the model sites that count in log p (observations, factors, latents the guide draws, latents
            the model enumerates), as ``(name, site)``.
        guide_terms: the guide's latent sites that count in log q.
        data_plate: the plate whose dim indexes datapoints.
        particle_plate: the particle plate's name, or None when the run has none (P = 1).
        sizes: ``(P, N)``, particles (1 without a particle plate) and datapoints (the data plate's size).
    """
    guide_trace.compute_score_parts()  # DiCE reads q's enumerated probabilities from the score parts
    guide_trace.pack_tensors()
    model_trace.pack_tensors(guide_trace.plate_to_symbol)
    plates = guide_trace.plate_to_symbol | model_trace.plate_to_symbol
    symbol_to_dim = guide_trace.symbol_to_dim | model_trace.symbol_to_dim
    kept = [plates[data_plate]] + ([plates[particle_plate]] if particle_plate is not None else [])
    target = frozenset(kept)
    # (ordinal, log-density) per term: a latent is in both lists, with p's density and q's.
    model_side = [(_ordinal(site, plates), _masked_unscaled(site), site) for _, site in model_terms]
    guide_side = [(_ordinal(site, plates), _masked_unscaled(site), site) for _, site in guide_terms]
    # One dtype for the contractions' einsums and DiCE's products (float64 data under a float32 prior, say): the
    # widest of the terms and of q's enumerated probabilities.
    scores = [
        site["packed"]["score_parts"]
        for site in guide_trace.nodes.values()
        if site["type"] == "sample" and torch.is_tensor(site["packed"]["score_parts"].score_function)
    ]
    dtype = functools.reduce(
        torch.promote_types,
        [t.dtype for _, t, _ in [*model_side, *guide_side]] + [p.score_function.dtype for p in scores],
    )
    model_side = [(w, _cast(t, dtype), site) for w, t, site in model_side]
    guide_side = [(w, _cast(t, dtype), site) for w, t, site in guide_side]
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and torch.is_tensor(site["packed"]["score_parts"].score_function):
            parts = site["packed"]["score_parts"]
            site["packed"]["score_parts"] = parts._replace(score_function=_cast(parts.score_function, dtype))
    plate_symbols = set(plates.values())

    # Log-weights: every term in one tree, every enumerated dim summed out (log-sum-exp), plates other than the
    # particles' and the data's multiplied out (summed in log space).
    tree: OrderedDict[frozenset, list[Tensor]] = OrderedDict()
    for where, term, site in model_side:
        tree.setdefault(where, []).append(_summed(site, term, dtype, symbol_to_dim))
    for where, term, site in guide_side:
        if not is_enumerated(site):  # an enumerated q(y|x) is no proposal here: every value of y is taken
            tree.setdefault(where, []).append(packed.neg(term))
    sum_dims = {d for terms in tree.values() for t in terms for d in t._pyro_dims} - plate_symbols
    # The kept plates' sizes given to the ring: a plate of size 1 (one datapoint, one particle) is no dim of any
    # packed term, and broadcasting the result to it would otherwise find no size.
    ring = LogRing(dim_to_size={kept[0]: sizes[1], **({kept[1]: sizes[0]} if len(kept) > 1 else {})})
    lw = contract_to_tensor(tree, sum_dims, target_ordinal=target, ring=ring)
    lw = _as_particles_by_data(packed.unpack(lw, symbol_to_dim), sizes, kept, symbol_to_dim)

    # ELBO: model terms that depend on dims the model alone enumerates are contracted over those dims first (log
    # Σ_y p), then every cost is averaged under q's enumerated probabilities (DiCE); a per-(particle, datapoint)
    # weight s turns the one number DiCE returns into its parts: d(Σ s·cost)/ds.
    guide_dims = {d for _, term, _ in guide_side for d in term._pyro_dims}
    model_only = {d for _, term, _ in model_side for d in term._pyro_dims} - plate_symbols - guide_dims
    costs: OrderedDict[frozenset, list[Tensor]] = OrderedDict()
    factors: OrderedDict[frozenset, list[Tensor]] = OrderedDict()
    for where, term, site in model_side:
        if model_only.intersection(term._pyro_dims):
            factors.setdefault(where, []).append(_summed(site, term, dtype, symbol_to_dim))
        else:
            costs.setdefault(where, []).append(term)
    if factors:
        for t, terms in contract_tensor_tree(factors, model_only).items():
            costs.setdefault(t, []).extend(terms)
    for where, term, _ in guide_side:
        costs.setdefault(where, []).append(packed.neg(term))
    with torch.enable_grad():
        weight = torch.ones(sizes, dtype=lw.dtype, device=lw.device, requires_grad=True)
        spread = weight.reshape(_shape_at(sizes, kept, symbol_to_dim))
        spread = packed.pack(spread, {symbol_to_dim[s]: s for s in kept})
        weighted = OrderedDict((t, [_mul(c, spread) for c in terms]) for t, terms in costs.items())
        ordering = {n: _ordinal(site, plates) for n, site in guide_trace.nodes.items() if site["type"] == "sample"}
        total = Dice(guide_trace, ordering).compute_expectation(weighted)
        (elbo,) = torch.autograd.grad(total, weight)
    return lw.detach(), elbo.detach()


def _ordinal(site: dict, plates: dict[str, str]) -> frozenset[str]:
    """The symbols of the plates a site sits in (its place in the contraction's tree)."""
    return frozenset(plates[f.name] for f in site["cond_indep_stack"] if f.vectorized)


def _summed(site: dict, term: Tensor, dtype: torch.dtype, symbol_to_dim: dict[str, int]) -> Tensor:
    """The term of a site in a sum over enumerated values: an enumerated site's own log-probability unmasked, as
    in TraceEnum_ELBO, so that its values' probabilities still sum to 1 where a mask leaves its element out (masked
    to 0 for each value, they summed to the support's size: log 2 per masked element of a Bernoulli).

    A mask set with ``Distribution.mask()`` lives inside the distribution's ``log_prob``, so the site's unmasked
    log-probability is recomputed from the distribution under the mask (where TraceEnum_ELBO adds the log 2).
    """
    if not is_enumerated(site):
        return term
    fn = _unmasked(site["fn"])
    if fn is site["fn"]:
        return _cast(site["packed"]["unscaled_log_prob"], dtype)
    dim_to_symbol = {dim: symbol for symbol, dim in symbol_to_dim.items()}
    return _cast(packed.pack(fn.log_prob(site["value"]), dim_to_symbol), dtype)


def _unmasked(fn: Any) -> Any:
    """``fn`` without the masks of ``Distribution.mask()`` (also under ``.to_event()``); ``fn`` itself if none."""
    if isinstance(fn, MaskedDistribution):
        return _unmasked(fn.base_dist)
    if isinstance(fn, Independent):
        inner = _unmasked(fn.base_dist)
        return fn if inner is fn.base_dist else Independent(inner, fn.reinterpreted_batch_ndims)
    return fn


def _cast(term: Tensor, dtype: torch.dtype) -> Tensor:
    if term.dtype == dtype:
        return term
    out = term.to(dtype)
    out._pyro_dims = term._pyro_dims
    return out


def _mul(lhs: Tensor, rhs: Tensor) -> Tensor:
    """Packed broadcast product (``pyro.ops.packed.mul`` passes an einsum argument torch no longer takes)."""
    dims = "".join(sorted(set(lhs._pyro_dims + rhs._pyro_dims)))
    out = torch.einsum(f"{lhs._pyro_dims},{rhs._pyro_dims}->{dims}", lhs, rhs.to(lhs.dtype))
    out._pyro_dims = dims
    return out


def _masked_unscaled(site: dict) -> Tensor:
    """A site's own log-density (no poutine.scale, no subsampling factor), masked, packed."""
    return packed.scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])


def _shape_at(sizes: tuple[int, int], kept: list[str], symbol_to_dim: dict[str, int]) -> tuple[int, ...]:
    """An unpacked shape with N at the data plate's dim and P at the particle plate's (if any)."""
    dims = [symbol_to_dim[s] for s in kept]
    out = [1] * -min(dims)
    out[dims[0]] = sizes[1]
    if len(dims) > 1:
        out[dims[1]] = sizes[0]
    return tuple(out)


def _as_particles_by_data(value: Tensor, sizes: tuple[int, int], kept: list[str], to_dim: dict[str, int]) -> Tensor:
    """An unpacked tensor over the data (and particle) dims as ``(P, N)``: every other dim has size 1 (contracted),
    and a dim the value does not vary over (size 1) is broadcast."""
    dims = [to_dim[s] for s in kept]
    value = value.reshape((1,) * max(0, -min(dims) - value.dim()) + tuple(value.shape))
    if len(dims) == 1:
        value = value.movedim(dims[0], 0).unsqueeze(0)
    else:
        value = value.movedim((dims[1], dims[0]), (0, 1))
    return value.reshape(value.shape[0], value.shape[1]).expand(sizes)
