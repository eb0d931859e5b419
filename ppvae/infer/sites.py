"""Which sample sites of a model/guide pair are what, read from one run of the pair instead of a naming convention.

One run of ``guide(*args)`` and of ``model(*args)`` replayed on it sorts the model's sample sites into:

- **local latents**: unobserved, continuous, inside the data plate (one value per datapoint): what collapse, gaps,
  SBC and the NUTS reference are about;
- **enumerated latents**: unobserved, discrete, inside the data plate (``infer={"enumerate": ...}`` on either side, or
  a discrete support): marginalized where a diagnostic can (NUTS), never ranked or re-fitted;
- **observed sites**: observed, inside the data plate; ``pyro.factor`` terms and ``pyro.deterministic`` values are
  not observations;
- **global latents**: unobserved sites outside the data plate (shared by every datapoint).

Plates' own subsample sites are never latents (Pyro records a plate as a sample site: a plate is not a variable).
Values per datapoint are read with :func:`site_rows` and log-densities with :func:`site_log_prob_rows`, which find
the data axis from the site's plate frames, so a plate at any ``dim`` works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ppvae.errors import ConfigError, NotApplicable
from ppvae.infer.observed import is_masked

__all__ = [
    "Sites",
    "discover_sites",
    "site_rows",
    "site_log_prob_rows",
    "data_axis",
    "take_rows",
    "per_datapoint_args",
    "guide_draws",
]


@dataclass(frozen=True)
class Sites:
    """The model's sample sites by role (names in the model's order), from :func:`discover_sites`.

    Attributes:
        data_plate: the plate that indexes datapoints.
        local: continuous unobserved sites inside the data plate.
        enumerated: discrete unobserved sites inside the data plate.
        observed: observed sites inside the data plate (factors and deterministic sites excluded).
        global_latents: unobserved sites outside the data plate.
        guide_sites: unobserved sample sites of the guide.
        sizes: coordinates per datapoint of each local latent (``numel`` of one datapoint's value).
        masked: local latents masked out for some datapoint (``poutine.mask`` or ``.mask(...)``: a sequence's
            padding), whose posterior there is flat.
    """

    data_plate: str
    local: tuple[str, ...]
    enumerated: tuple[str, ...]
    observed: tuple[str, ...]
    global_latents: tuple[str, ...]
    guide_sites: tuple[str, ...]
    sizes: dict[str, int]
    masked: tuple[str, ...] = ()

    def describe(self) -> str:
        """The roles in words, for messages: ``local latents ['z'], observed ['x'] in plate 'data'``."""
        parts = [f"local latents {list(self.local)}"]
        if self.enumerated:
            parts.append(f"enumerated {list(self.enumerated)}")
        parts.append(f"observed {list(self.observed)}")
        if self.global_latents:
            parts.append(f"global latents {list(self.global_latents)}")
        return ", ".join(parts) + f" in plate {self.data_plate!r}"

    def latents(self, names: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
        """The local latent sites ``what`` works on: ``names`` checked against the local latents, or all of them.

        Raises :class:`NotApplicable` for a pair without continuous local latents, or a name that is not one (the
        message lists the pair's sites by role and the keyword to pass).
        """
        if names is None:
            if not self.local:
                raise NotApplicable(
                    f"{what} needs a continuous latent sample site inside pyro.plate({self.data_plate!r}) and the "
                    f"model has none ({self.describe()}); put each datapoint's latent in that plate (or pass "
                    "data_plate= the name of the plate that indexes datapoints)"
                )
            return self.local
        chosen = (names,) if isinstance(names, str) else tuple(names)
        if not chosen or not all(isinstance(n, str) for n in chosen):
            raise ConfigError(f"latent_sites must be a site name or a list of names, got {names!r}")
        for name in chosen:
            if name not in self.local:
                where = (
                    "the data plate (a plate, not a variable)"
                    if name == self.data_plate
                    else "an enumerated discrete site"
                    if name in self.enumerated
                    else "a global latent (outside the data plate)"
                    if name in self.global_latents
                    else "an observed site"
                    if name in self.observed
                    else "not a sample site of the model"
                )
                raise NotApplicable(
                    f"{what}: the model has no continuous local latent sample site {name!r} ({name!r} is {where}); "
                    f"it has {self.describe()}: pass latent_sites= some of {list(self.local)}"
                )
        return chosen


def take_rows(args: tuple, index: Tensor | Sequence[int], n: int) -> tuple:
    """The datapoints ``index`` of a batch ``args`` (a tuple of model arguments): every tensor with ``n`` rows is
    indexed on its first axis, anything else (a flag, a tensor of another length) passed as it is."""
    idx = torch.as_tensor(index, dtype=torch.long)
    return tuple(a[idx.to(a.device)] if torch.is_tensor(a) and a.dim() > 0 and len(a) == n else a for a in args)


def _is_discrete(site: dict) -> bool:
    if site["infer"].get("enumerate") in ("parallel", "sequential"):
        return True
    try:
        return bool(site["fn"].support.is_discrete)
    except (NotImplementedError, AttributeError):  # a flow whose support is not declared: continuous
        return False


def _is_observation(site: dict) -> bool:
    infer = site["infer"]
    return not (infer.get("is_auxiliary") or infer.get("_deterministic"))


def _in_plate(site: dict, plate: str) -> bool:
    return any(f.name == plate for f in site["cond_indep_stack"])


def discover_sites(
    model: Callable, guide: Callable, args: tuple, kwargs: dict | None = None, *, data_plate: str = "data"
) -> Sites:
    """Sort the sites of ``model(*args, **kwargs)``, replayed on a run of ``guide(*args, **kwargs)``, by role.

    Runs without gradients and outside any enclosing handler (``poutine.block``). Raises :class:`NotApplicable`
    when the model has no site in ``data_plate``, naming the plates it has.
    """
    kwargs = kwargs or {}
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    enumerated_in_guide = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and _is_discrete(s)}
    local, enumerated, observed, global_latents, sizes, masked = [], [], [], [], {}, []
    plates = set()
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        plates.update(f.name for f in site["cond_indep_stack"])
        inside = _in_plate(site, data_plate)
        if site["is_observed"]:
            if inside and _is_observation(site):
                observed.append(name)
        elif not inside:
            global_latents.append(name)
        elif name in enumerated_in_guide or _is_discrete(site):
            enumerated.append(name)
        else:
            local.append(name)
            sizes[name] = site_rows(site, data_plate).shape[1]
            if is_masked(site):
                masked.append(name)
    if data_plate not in plates:
        raise NotApplicable(
            f"the model has no sample site inside a plate named {data_plate!r} (its plates are {sorted(plates)}), "
            f"so ppvae cannot tell one datapoint from another; pass data_plate= the plate that indexes datapoints"
        )
    guide_sites = tuple(
        n
        for n, s in guide_trace.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    )
    return Sites(
        data_plate,
        tuple(local),
        tuple(enumerated),
        tuple(observed),
        tuple(global_latents),
        guide_sites,
        sizes,
        tuple(masked),
    )


def data_axis(site: dict, plate: str) -> int:
    """The axis of ``site["value"]`` that indexes datapoints (a plate's ``dim`` counts from the batch shape's right)."""
    frame = next(f for f in site["cond_indep_stack"] if f.name == plate)
    return site["value"].dim() - site["fn"].event_dim + frame.dim


def _leading(site: dict, plate: str, particles: str | None) -> list[int]:
    axes = [data_axis(site, plate)]
    if particles is not None:
        axes.insert(0, data_axis(site, particles))
    return axes


def site_rows(site: dict, plate: str, particles: str | None = None) -> Tensor:
    """A site's value per datapoint, flattened: ``(N, D)``, or ``(L, N, D)`` with a particle plate named
    ``particles`` (its axis first). Other batch axes (inner plates) and the event are flattened into D."""
    value = site["value"]
    axes = _leading(site, plate, particles)
    value = value.movedim(axes, list(range(len(axes))))
    return value.reshape(*value.shape[: len(axes)], -1)


def site_log_prob_rows(site: dict, plate: str, particles: str | None = None) -> Tensor:
    """A site's log-density summed over everything but the datapoint (and particle) axes: ``(N,)`` or ``(L, N)``.

    The site's ``log_prob`` is computed (``fn.log_prob(value)``, masks and scales as the trace applies them: see
    ``Trace.compute_log_prob``) when the trace has not done it.
    """
    if "log_prob" not in site:
        lp = site["fn"].log_prob(site["value"])
    else:
        lp = site["log_prob"]
    full = site["value"].shape[: site["value"].dim() - site["fn"].event_dim]
    lp = lp.expand(full) if lp.shape != full else lp
    frames = {f.name: f.dim for f in site["cond_indep_stack"]}
    axes = [len(full) + frames[plate]]
    if particles is not None:
        axes.insert(0, len(full) + frames[particles])
    lp = lp.movedim(axes, list(range(len(axes))))
    return lp.reshape(*lp.shape[: len(axes)], -1).sum(-1)


def per_datapoint_args(data: Any) -> tuple:
    """Model arguments from in-memory data: a tensor or array (``(x,)``) or a tuple of them, as tensors."""
    parts = data if isinstance(data, tuple) else (data,)
    out = []
    for part in parts:
        if torch.is_tensor(part):
            out.append(part)
        else:
            try:
                out.append(torch.as_tensor(part))
            except (TypeError, ValueError, RuntimeError):
                raise NotApplicable(
                    f"this diagnostic reads the data's datapoints by row and cannot index a {type(part).__name__}; "
                    "give the data as a tensor or a tuple of tensors (data, labels, masks...)"
                ) from None
    return tuple(out)


_PARTICLES = "_ppvae_site_particles"


def guide_draws(guide: Callable, args: tuple, names: Sequence[str], plate: str, num: int) -> Tensor:
    """``(L, N, D)`` draws of the sites ``names`` of ``guide(*args)`` (values per datapoint flattened and joined).

    One vectorized run in a particle plate left of the guide's plates; a guide that does not broadcast over it (it
    raises, gives the wrong size, or draws with torch outside Pyro, so the L draws come out identical) is run L
    times instead. Call it without gradients, under the caller's RNG.
    """
    probe = poutine.trace(guide).get_trace(*args)
    dims = [f.dim for s in probe.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"]]
    want = sum(site_rows(probe.nodes[n], plate).numel() for n in names)
    try:
        with pyro.plate(_PARTICLES, num, dim=min([-1, *dims]) - 1):
            nodes = poutine.trace(guide).get_trace(*args).nodes
        value = torch.cat([site_rows(nodes[n], plate, _PARTICLES) for n in names], -1)
        if value.numel() == num * want and (num == 1 or not bool((value[1:] == value[:1]).all())):
            return value
    except Exception:  # noqa: BLE001 - a guide that cannot take an outer plate is run once per draw below
        pass
    draws = []
    for _ in range(num):
        nodes = poutine.trace(guide).get_trace(*args).nodes
        draws.append(torch.cat([site_rows(nodes[n], plate) for n in names], -1))
    return torch.stack(draws)
