"""Per-datapoint importance log-weights: the one primitive evaluation, IWAE and diagnostics are built on.

    lw[i, s] = log p(x_i, z_is) − log q(z_is | x_i),   z_is ~ q(z | x_i)

Each site's log-density is summed over every dim except the particle and data-plate dims (default plate name
``"data"``), giving ``(N, S)``. Particles are drawn either all at once, in a particle plate left of every plate the
pair uses (``vectorize=True``: one pass, for pairs that broadcast over a leading dim), or one at a time
(``vectorize=False``: S passes, for any pair: a ``BatchNorm1d`` decoder, a mask of shape ``(batch, D)``, a
``.view(batch, -1)``). :func:`particles_broadcast` tells which one a pair allows.

What each site contributes, so that no pair gets a number that is silently wrong:

- **Observed sites of the model** (``obs=``) and its ``pyro.factor`` terms are log p. A factor is counted per
  datapoint, so it must sit in the data plate (a scalar factor there adds its value to every datapoint's weight);
  a factor or observation outside that plate has no per-datapoint share and is refused. A model that observes
  nothing (a conditional model called with only its inputs) is refused: every weight would be log p(z) − log q(z)
  and log p̂ ≈ 0 would look like a perfect model.
- **Latent sites** drawn by the guide count in both: + log p(z), − log q(z). A latent of the model the guide does
  not draw is drawn from the model's own conditional, so it is its own proposal: its ratio is 1 and it is left out.
  A guide latent the model does not draw (a misspelt site name, most often) or observes is refused: it makes no
  valid weight. Guide latents marked ``infer={"is_auxiliary": True}`` (Pyro's AutoGuides) are counted as Pyro
  counts them.
- **Enumerated discrete sites** (``infer={"enumerate": "parallel"}``): with ``enumerate=True`` they are summed
  exactly (:mod:`ppvae.infer.enumerated`) — a model-side one out of log p, a guide-side one out of the weight, its
  ELBO averaged under q's probabilities as TraceEnum_ELBO does. A site the guide draws is replayed in the model
  even where the model marks it too (a ``pyro.markov`` chain marked on both sides). Without ``enumerate=True``, or
  when a pair cannot be enumerated (:func:`scoring_trial` says why), they are sampled like any other site: an
  unbiased importance sample.
- **Observed sites and factors of the guide** are not densities of what the proposal draws (an auxiliary
  classifier loss in a labelled branch, most often): they are left out, with a warning. A guide whose density
  needs a correction term (a Jacobian) should draw from a ``TransformedDistribution`` instead.
- **Scales** (``poutine.scale``, a subsampling plate's N/b, ppvae's β on latent sites) weigh the terms of a
  training loss, not the model's density: scoring (``scaled=False``) divides them out by using each site's
  unscaled log-density (masks from ``poutine.mask`` are kept); a scale other than subsampling's gets a warning.
  The IWAE objective passes ``scaled=True`` so β and a user's weighting still apply in training.
- **Global latents** (sites outside the data plate) have no per-datapoint share and are refused with the
  convention; ``pyro.deterministic`` sites contribute nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import Unit
from pyro.distributions.util import scale_and_mask
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ppvae.errors import ConfigError, PPVAEError
from ppvae.infer.enumerated import enumerable, enumerated_scores, is_enumerated
from ppvae.infer.observed import discrete_support, mask_fingerprint, masked_sites

__all__ = ["log_weights", "plate_nesting", "particles_broadcast", "scoring_trial", "ScoringTrial"]

_PARTICLES = "_ppvae_particles"

# How close the log-weights of particles drawn together must be to the same draws scored alone (float32 networks
# batched differently differ by ~1e-5 relative; a pair that mixes particles or datapoints differs by nats).
_RTOL, _ATOL = 1e-4, 1e-3


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
    vectorize: bool = True,
    scaled: bool = False,
    enumerate: bool = False,
    with_elbo: bool = False,
    masked: list[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Importance log-weights ``(N, S)`` in nats, differentiable w.r.t. model and guide parameters.

    Args:
        model, guide: a Pyro pair, called as ``model(*args, **kwargs)``.
        num_samples: S particles per datapoint.
        data_plate: name of the plate holding the local latents and observations.
        max_plate_nesting: plate dims used by the pair (found with a dry run when None).
        vectorize: draw the S particles in one pass (a particle plate; the pair must broadcast over it, see
            :func:`particles_broadcast`), or one at a time in S passes (any pair).
        scaled: weigh each site by its scale as Pyro's ELBOs do (training objectives); False (scoring) uses the
            model's own densities (see the module's notes).
        enumerate: sum exactly over the values of discrete sites marked ``infer={"enumerate": "parallel"}``
            (:mod:`ppvae.infer.enumerated`; scoring only: not with ``scaled``) instead of sampling them. Not
            differentiable.
        with_elbo: return ``(lw, elbo)``, both ``(N, S)``: ``elbo[i, s]`` is particle s's term of the pair's ELBO,
            which is ``lw`` except where a guide site is enumerated (the ELBO then averages under q's
            probabilities of its values, as ``TraceEnum_ELBO`` does, while ``lw`` sums over them).
        masked: a list that gets the names of observed sites with masked elements in this batch's runs
            (:func:`ppvae.infer.observed.masked_sites`) not already in it; a mask may depend on the batch.

    Raises:
        ConfigError: a pair whose weights would mean nothing: no observed site, a site outside the data plate, a
            guide latent the model does not draw (the module's notes list every case and its fix).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a whole number ≥ 1 (particles per datapoint), got {num_samples!r}")
    if enumerate and scaled:
        raise ConfigError("enumerate=True scores the model's own densities; it cannot be combined with scaled=True")
    if max_plate_nesting is None:
        max_plate_nesting = plate_nesting(model, guide, *args, **kwargs)
    def run(particles: int | None) -> tuple[Trace, Trace]:
        traces = _run(model, guide, args, kwargs, particles, max_plate_nesting, enumerate=enumerate)
        if masked is not None:
            masked.extend(n for n in masked_sites(traces[0]) if n not in masked)
        return traces

    if vectorize:
        lw, elbo = _weights(*run(num_samples), data_plate, max_plate_nesting, num_samples, scaled)
    else:
        parts = [_weights(*run(None), data_plate, max_plate_nesting, None, scaled) for _ in range(num_samples)]
        lw, elbo = (torch.cat([p[k] for p in parts]) for k in (0, 1))
    if with_elbo:
        return lw.transpose(0, 1), elbo.transpose(0, 1)
    return lw.transpose(0, 1)


def particles_broadcast(
    model: Callable,
    guide: Callable,
    *args: Any,
    data_plate: str = "data",
    max_plate_nesting: int | None = None,
    num_particles: int = 2,
    enumerate: bool = False,
    **kwargs: Any,
) -> str | None:
    """Whether vectorized particles give this pair's log-weights: None if they do, else the reason they do not.

    Draws ``num_particles`` particles at once, then scores each particle's draws again alone (the same values,
    replayed into a run without the particle plate) and compares. A pair that raises with the extra dim, or that
    broadcasts without raising but wrongly (a reshape that mixes particles into datapoints, a sum over dim 0) is
    caught by the comparison: it would otherwise be a silently wrong number. Draws from the global RNGs.
    ``enumerate``: try the enumerated scoring of :func:`log_weights` (enumerated values are summed again in each
    particle's run alone, not replayed).
    """
    if max_plate_nesting is None:
        max_plate_nesting = plate_nesting(model, guide, *args, **kwargs)
    k = num_particles
    try:
        model_trace, guide_trace = _run(model, guide, args, kwargs, k, max_plate_nesting, enumerate=enumerate)
        together = _weights(model_trace, guide_trace, data_plate, max_plate_nesting, k, False)[0]
    except Exception as err:  # noqa: BLE001 - any failure with the extra dim means: score particles one by one
        return f"with {k} particles at once it raised {type(err).__name__}: {_first_line(err)}"
    for j in range(k):
        fixed = _one_particle(model_trace, guide_trace, j, k, -max_plate_nesting - 1)
        if isinstance(fixed, str):
            return fixed
        alone = _weights(
            *_run(model, guide, args, kwargs, None, max_plate_nesting, fixed, enumerate=enumerate),
            data_plate,
            max_plate_nesting,
            None,
            False,
        )[0]
        if alone.shape != together[j : j + 1].shape:
            return f"particle {j} scored alone has shape {tuple(alone.shape)}, not {tuple(together[j : j + 1].shape)}"
        if not torch.allclose(alone.double(), together[j : j + 1].double(), rtol=_RTOL, atol=_ATOL, equal_nan=True):
            gap = (alone.double() - together[j : j + 1].double()).abs().nan_to_num(0.0).max().item()
            return f"particle {j} scored alone differs from the same draws scored together by up to {gap:.3g} nats"
    return None


@dataclass(frozen=True)
class ScoringTrial:
    """What one run of a pair on a batch says about scoring it.

    Attributes:
        enumerated: the sites summed over exactly (marked ``infer={"enumerate": "parallel"}``), in trace order.
        sampled_because: why marked sites are drawn instead (an unbiased importance sample), or None.
        discrete: whether the observed sites have discrete supports (:func:`ppvae.infer.observed.discrete_support`).
        mask_key: a hash of the observed sites' masks on this batch (:func:`ppvae.infer.observed.mask_fingerprint`),
            or None where none is masked.
    """

    enumerated: tuple[str, ...]
    sampled_because: str | None
    discrete: bool | None
    mask_key: str | None = None


def scoring_trial(
    model: Callable, guide: Callable, *args: Any, data_plate: str = "data", max_plate_nesting: int, **kwargs: Any
) -> ScoringTrial:
    """Run the pair once under enumeration and score it, to decide how to score it (draws from the global RNGs).

    Raises:
        ConfigError: the pair's log-weights would mean nothing (see :func:`log_weights`).
    """
    reason = None
    try:
        model_trace, guide_trace = _run(model, guide, args, kwargs, None, max_plate_nesting, enumerate=True)
    except PPVAEError:
        raise
    except Exception as err:  # noqa: BLE001 - a pair that cannot run enumerated is sampled, and told why
        reason = f"running it enumerated raised {type(err).__name__}: {_first_line(err)}"
        model_trace, guide_trace = _run(model, guide, args, kwargs, None, max_plate_nesting)
    discrete, key = discrete_support(model_trace), mask_fingerprint(model_trace)
    marked = (
        n
        for tr in (guide_trace, model_trace)
        for n, s in _sample_sites(tr).items()
        if is_enumerated(s) or s["infer"].get("enumerate") in ("parallel", "sequential")
    )
    names = tuple(dict.fromkeys(marked))
    if not names:
        return ScoringTrial((), None, discrete, key)
    reason = reason or enumerable(model_trace, guide_trace)
    if reason is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the scoring run itself gives the pair's warnings
                _weights(model_trace, guide_trace, data_plate, max_plate_nesting, None, False)
        except PPVAEError:
            raise
        except Exception as err:  # noqa: BLE001 - a pair that cannot be enumerated is sampled, and told why
            reason = f"summing over them raised {type(err).__name__}: {_first_line(err)}"
    return ScoringTrial(names if reason is None else (), reason, discrete, key)


def _run(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    particles: int | None,
    nesting: int,
    fixed: Trace | None = None,
    enumerate: bool = False,
) -> tuple[Trace, Trace]:
    """Guide then model (replayed on the guide's draws), under a particle plate of ``particles`` or without one.

    ``fixed``: latent values to replay in both (one particle of an earlier vectorized run). ``enumerate``: run
    both under ``poutine.enum`` (dims left of the particle plate; the model's continue after the guide's, as in
    ``TraceEnum_ELBO``).
    """
    plate = pyro.plate(_PARTICLES, particles, dim=-nesting - 1) if particles is not None else nullcontext()
    guide_fn = guide if fixed is None else poutine.replay(guide, trace=fixed)
    model_fn = model
    drawn: set[str] = set()
    if enumerate:
        guide_fn = poutine.enum(guide_fn, first_available_dim=-nesting - 1 - (particles is not None))
        # A site the guide draws (or enumerates) is replayed in the model, whatever the model marks on it: the
        # model's own enumeration of it would take an enumeration dim of its own before the replay sets its value
        # (a pyro.markov chain marked on both sides), and every later dim would be off by one.
        own = poutine.infer_config(model, lambda msg: {"enumerate": None} if msg["name"] in drawn else {})
        model_fn = EnumMessenger()(own)  # no first dim: it allocates after the guide's enumerated dims
    with plate:
        guide_trace = poutine.trace(guide_fn).get_trace(*args, **kwargs)
        drawn.update(n for n, site in guide_trace.nodes.items() if site["type"] == "sample" and not site["is_observed"])
        source = guide_trace if fixed is None else _with_enumerated(fixed, guide_trace)
        replayed = poutine.replay(model_fn, trace=source)
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def _with_enumerated(fixed: Trace, guide_trace: Trace) -> Trace:
    """``fixed`` plus the values the guide enumerated in this run (the model must see them, not draw its own)."""
    out = fixed.copy()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and is_enumerated(site) and name not in out.nodes:
            out.add_node(name, **site)
    return out


def _one_particle(model_trace: Trace, guide_trace: Trace, j: int, k: int, particle_dim: int) -> Trace | str:
    """A trace of every latent value of particle ``j`` (guide draws and the model's own), or why there is none."""
    out = Trace()
    for trace in (guide_trace, model_trace):
        for name, site in _sample_sites(trace).items():
            if site["is_observed"] or _is_deterministic(site) or name in out.nodes or is_enumerated(site):
                continue  # an enumerated site is enumerated again in the particle's own run
            value, batch = site["value"], len(site["fn"].batch_shape)
            axis = batch + particle_dim
            if axis < 0 or value.dim() <= axis or value.shape[axis] != k:
                return f"site {name!r} has no particle dim (value of shape {tuple(value.shape)})"
            out.add_node(name, type="sample", is_observed=False, value=value.select(axis, j), infer=site["infer"])
    return out


def _weights(
    model_trace: Trace, guide_trace: Trace, data_plate: str, nesting: int, particles: int | None, scaled: bool
) -> tuple[Tensor, Tensor]:
    """``(lw, elbo)``, each ``(P, N)``: log p − log q per particle and datapoint, and the ELBO's terms (the same
    tensor unless a site is enumerated; P = ``particles``, or 1 without a particle plate)."""
    model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
    for trace in (model_trace, guide_trace):
        trace.compute_log_prob(lambda _name, site: not _is_deterministic(site))
    model_terms: list[tuple[str, dict]] = []
    observes = False
    rescaled: list[str] = []
    for name, site in model_sites.items():
        if _is_deterministic(site):
            continue
        own = not site["is_observed"] and (name not in guide_sites or guide_sites[name]["is_observed"])
        if own and not is_enumerated(site):
            continue  # drawn from the model's own conditional: its own proposal, a ratio of 1
        observes = observes or site["is_observed"]
        model_terms.append((name, site))
    if not observes:
        latents = sorted(n for n, s in model_sites.items() if not s["is_observed"])
        raise ConfigError(
            f"the model observes nothing: none of its sites ({', '.join(latents) or 'none'}) has obs= data or is a "
            "pyro.factor, so every log-weight would be log p(z) − log q(z|x) and log p̂ ≈ 0 would look like a "
            "perfect model; pass the data to the model (e.g. model(x, y) with pyro.sample('y', ..., obs=y)) and "
            "score it on the same inputs"
        )
    left_out: list[str] = []
    guide_terms: list[tuple[str, dict]] = []
    for name, site in guide_sites.items():
        if _is_deterministic(site):
            continue
        if site["is_observed"]:
            left_out.append(name)
            continue
        _check_guide_latent(name, site, model_sites)
        guide_terms.append((name, site))
    for name, site in [*model_terms, *guide_terms]:
        _check_in_plate(site, name, data_plate)
        if not scaled and _user_scale(site):
            rescaled.append(f"{name!r} (scale {_describe(site['scale'])})")
    if left_out:
        warnings.warn(
            f"the guide's site(s) {', '.join(map(repr, left_out))} observe a value or add a pyro.factor: they are "
            "no density of what the guide draws (an auxiliary loss, most often), so the log-weights leave them out",
            stacklevel=4,
        )
    if rescaled:
        warnings.warn(
            f"site(s) {', '.join(rescaled)} are scaled (poutine.scale or similar): log-weights are of the model's "
            "own densities, so each site's unscaled log-probability is used",
            stacklevel=4,
        )
    if any(is_enumerated(site) for _, site in [*model_terms, *guide_terms]):
        size = {f.name: f.size for _, site in model_terms for f in site["cond_indep_stack"]}[data_plate]
        return enumerated_scores(
            model_trace,
            guide_trace,
            model_terms,
            guide_terms,
            data_plate,
            _PARTICLES if particles is not None else None,
            (particles or 1, size),
        )
    total: Tensor | int = 0
    for name, site in model_terms:
        total = total + _per_datapoint(site, name, data_plate, nesting, particles, scaled)
    for name, site in guide_terms:
        total = total - _per_datapoint(site, name, data_plate, nesting, particles, scaled)
    assert torch.is_tensor(total)  # the model observes something, so some site was counted
    return total, total


def _check_guide_latent(name: str, site: dict, model_sites: dict[str, dict]) -> None:
    """Refuse a guide latent that has no part in a valid importance weight."""
    if name in model_sites and not model_sites[name]["is_observed"]:
        return
    if name not in model_sites and site["infer"].get("is_auxiliary"):
        return  # an AutoGuide's joint latent: its density and the Delta sites' log-densities are q's together
    if name in model_sites:
        raise ConfigError(
            f"the guide draws {name!r}, which the model observes (obs=), so q's draw is never used and its density "
            f"makes no valid weight; sample {name!r} in the guide only where the model does not observe it"
        )
    raise ConfigError(
        f"the guide draws {name!r}, which the model does not have (a misspelt site name?), so the log-weights "
        "would not be importance weights; name it as the model does, or mark a genuine auxiliary variable "
        "infer={'is_auxiliary': True}"
    )


def _check_in_plate(site: dict, name: str, data_plate: str) -> None:
    if data_plate not in {f.name for f in site["cond_indep_stack"]}:
        raise ConfigError(_outside_plate(site, name, data_plate))


def _per_datapoint(site: dict, name: str, data_plate: str, nesting: int, particles: int | None, scaled: bool) -> Tensor:
    """Sum a site's log-density over every dim but (particles, data) → ``(P, N)``."""
    frames = {f.name: f for f in site["cond_indep_stack"]}
    lp = site["log_prob"] if scaled else scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])
    n = nesting + (particles is not None)
    lp = lp.reshape((1,) * max(0, n - lp.dim()) + tuple(lp.shape))  # broadcast dims Pyro left out
    if particles is not None and lp.dim() > n:
        raise ConfigError(
            f"site {name!r} has a batch dim left of every plate (log-density of shape {tuple(lp.shape)}), where the "
            "particles go; declare it with pyro.plate or move it into the event shape with .to_event()"
        )
    data_axis = lp.dim() + frames[data_plate].dim
    keep = {data_axis, 0} if particles is not None else {data_axis}
    other = [d for d in range(lp.dim()) if d not in keep]
    if other:  # e.g. a pixel plate nested inside the data plate
        lp = lp.sum(other)
    if particles is None:
        lp = lp.unsqueeze(0)
    return lp.expand(particles or 1, frames[data_plate].size)


def _outside_plate(site: dict, name: str, data_plate: str) -> str:
    where = f"outside the plate {data_plate!r}"
    inside = f"`with pyro.plate({data_plate!r}, N):`"
    if isinstance(site["fn"], Unit):
        return (
            f"pyro.factor site {name!r} is {where}, so its value cannot be shared out between datapoints; call "
            f"pyro.factor inside {inside} with one value per datapoint (or pass data_plate=<your plate's name>)"
        )
    if site["is_observed"]:
        return (
            f"observed site {name!r} is {where}, so it has no per-datapoint log-weight; put every observation "
            f"inside {inside} (or pass data_plate=<your plate's name>)"
        )
    return (
        f"latent site {name!r} is {where}, so it has no per-datapoint log-weight; put every local latent inside "
        f"{inside} (or pass data_plate=<your plate's name>). A global latent (one value shared by all datapoints) "
        "cannot be split between them: per-datapoint estimators do not support it"
    )


def _user_scale(site: dict) -> bool:
    """Whether a site's scale is more than its subsampling plates' N/b (a ``poutine.scale``, β, a weight)."""
    sub = math.prod(f.full_size / f.size for f in site["cond_indep_stack"] if f.full_size and f.size)
    scale = site["scale"]
    if torch.is_tensor(scale):
        return not bool(torch.all((scale - sub).abs() <= 1e-6 * sub))
    return not math.isclose(float(scale), sub, rel_tol=1e-6)


def _describe(scale: Any) -> str:
    if torch.is_tensor(scale) and scale.numel() > 1:
        return f"a tensor of shape {tuple(scale.shape)}"
    return f"{float(scale):.4g}"


def _sample_sites(trace: Trace) -> dict[str, dict]:
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}


def _is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic"))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else "")[:200]
