"""Training objectives as differentiable losses, and β-scaling of latent sites.

Every objective is a callable ``loss(model, guide, *args) -> Tensor`` (a negative ELBO or IWAE bound, summed over
the batch, in nats) so ``fit`` can clip, check and step gradients itself. A :class:`BatchLoss` binds one to the pair
being trained: ``loss(batch, beta)``, with β an argument of each call (a KL warm-up passes each step's value), so
nothing mutable is shared between the schedule and the handlers that scale the latent sites.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO, config_enumerate
from pyro.poutine.messenger import Messenger
from torch import Tensor

from ppvae._rng import fork_rngs
from ppvae.errors import ConfigError
from ppvae.infer.logweights import log_weights

__all__ = [
    "OBJECTIVES",
    "make_objective",
    "scale_latents",
    "ScaleLatents",
    "vae_elbo_loss",
    "BatchLoss",
    "PairLoss",
    "VAELoss",
    "EnumLoss",
    "enumerated_sites",
]

OBJECTIVES = ("elbo", "meanfield", "iwae", "enum")

Loss = Callable[..., Any]


def make_objective(
    objective: str | ELBO,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    max_plate_nesting: int | None = None,
) -> Loss:
    """Build ``loss(model, guide, *args)`` for ``objective`` (see :data:`OBJECTIVES`) or an ``ELBO`` instance.

    ``"iwae"`` is the importance-weighted bound of Burda et al. (2015),
    ``−Σ_i [logsumexp_k lw_ik − log K]`` with ``lw_ik = log p(x_i, z_ik) − log q(z_ik | x_i)``, computed with
    vectorized particles from per-datapoint log-weights (so it stays per-datapoint, unlike a RenyiELBO whose sites
    leave the data plate).
    """
    if isinstance(objective, ELBO):
        return objective.differentiable_loss
    if not isinstance(objective, str) or objective.lower() not in OBJECTIVES:
        raise ConfigError(
            f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)} or an ELBO instance"
        )
    name = objective.lower()
    mpn = {} if max_plate_nesting is None else {"max_plate_nesting": max_plate_nesting}
    if name == "iwae":
        if num_particles < 2:
            raise ConfigError(
                f"objective 'iwae' needs num_particles ≥ 2 (K samples per datapoint), got {num_particles}"
            )
        return functools.partial(_iwae_loss, num_particles=num_particles)
    if name == "elbo":
        return Trace_ELBO(
            num_particles=num_particles, vectorize_particles=vectorize_particles, **mpn
        ).differentiable_loss
    if name == "meanfield":
        return TraceMeanField_ELBO(
            num_particles=num_particles, vectorize_particles=vectorize_particles, **mpn
        ).differentiable_loss
    # Enumeration needs a bound on plate nesting to allocate enumeration dims left of the plates.
    return EnumLoss(
        TraceEnum_ELBO(
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=max_plate_nesting if max_plate_nesting is not None else 1,
        )
    )


class EnumLoss:
    """``objective="enum"``: TraceEnum_ELBO with every discrete site enumerated in parallel unless it says otherwise.

    Model and guide run under ``pyro.infer.config_enumerate(default="parallel")``: each unobserved site whose
    distribution has enumerate support is summed out exactly (Pyro's enumeration), where TraceEnum_ELBO alone
    would sample an unmarked site and fall back to score-function gradients. A site's own
    ``infer={"enumerate": ...}`` is kept (``"sequential"``, or ``None`` to keep it sampled). On its first call it
    warns when no site is enumerated: then the objective is Trace_ELBO's, and saying so beats a silent no-op.
    """

    def __init__(self, elbo: TraceEnum_ELBO) -> None:
        self.elbo = elbo
        self.checked = False
        self.nothing = False  # whether the first call found no site to enumerate

    def __call__(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> Tensor:
        model, guide = config_enumerate(model, default="parallel"), config_enumerate(guide, default="parallel")
        if not self.checked:
            self.checked = True
            self.nothing = not enumerated_sites(model, guide, *args, **kwargs)
            if self.nothing:
                warnings.warn(
                    "objective 'enum' enumerates nothing: no unobserved sample site of this model or guide has a "
                    "discrete distribution with enumerate support (or each sets infer={'enumerate': None}), so it "
                    "trains as objective 'elbo' would; use 'elbo', or give the discrete latents a finite support "
                    "(Categorical, Bernoulli, OneHotCategorical)",
                    UserWarning,
                    stacklevel=2,
                )
        if self.nothing:  # said once above, in ppvae's words: Pyro's own warning each step would repeat it
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TraceEnum_ELBO found no sample sites")
                return self.elbo.differentiable_loss(model, guide, *args, **kwargs)
        return self.elbo.differentiable_loss(model, guide, *args, **kwargs)


def enumerated_sites(model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> list[str]:
    """Names of the sites of ``guide`` (then of ``model`` replayed on it) marked for enumeration, from one blocked
    run without enumerating (draws, not sums), on copies of the RNGs: the check draws nothing from the training's
    random stream, so a resumed run stays exact. ``["?"]`` when the pair cannot run outside the ELBO (the loss
    itself then says what is wrong)."""
    try:
        with fork_rngs(), poutine.block():
            g = poutine.trace(guide).get_trace(*args, **kwargs)
            m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the ELBO itself runs next and raises what is wrong
        return ["?"]  # unknown: say nothing
    return [
        name
        for trace in (g, m)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and site["infer"].get("enumerate")
    ]


def vae_elbo_loss(vae: Any, x: Tensor, beta: float = 1.0, num_particles: int = 1) -> Tensor:
    """Negative β-ELBO of a :class:`ppvae.VAE`, summed over the batch (nats): Trace_ELBO's estimator, directly.

    For a VAE's pair (one reparameterized latent site ``z`` and the observed ``x``, both in the data plate)
    ``Trace_ELBO.differentiable_loss`` is ``−Σ_i mean_s [log p(x_i | z_is) + β (log p(z_is) − log q(z_is | x_i))]``
    with ``z_is = rsample`` from q. Computing it without tracing draws the same z from the same RNG stream and
    gives the same value and gradients (tests/test_objectives.py checks every building block), while skipping
    the per-step Python cost of recording and replaying traces: ``fit`` uses it for a ``ppvae.VAE`` with
    ``objective="elbo"``; every other pair goes through Pyro's ELBOs.
    """
    q = vae.encode(x)
    z = q.rsample((num_particles,)) if num_particles > 1 else q.rsample()
    latent = vae.prior().log_prob(z) - q.log_prob(z)
    elbo = vae.decode(z).log_prob(x) + (latent if beta == 1.0 else beta * latent)
    return -elbo.sum() / num_particles


class BatchLoss(Protocol):
    """One training step's loss on one batch: ``loss(batch, beta) -> Tensor``, summed over the batch (nats).

    ``batch`` is the tuple the model is called with (``model(*batch)``); ``beta`` weighs the latent terms
    (β·KL, see :class:`ScaleLatents`). The piece of the training loop a new kind of loss replaces.
    """

    def __call__(self, batch: tuple[Any, ...], beta: float = 1.0) -> Tensor: ...


@dataclass(frozen=True)
class PairLoss:
    """A loss of :func:`make_objective` on a model/guide pair, with the latent sites of both scaled by β per call."""

    model: Callable
    guide: Callable
    objective: Loss

    def __call__(self, batch: tuple[Any, ...], beta: float = 1.0) -> Tensor:
        # Handlers built per call with this call's β (two small objects; none at β = 1).
        return self.objective(scale_latents(self.model, beta), scale_latents(self.guide, beta), *batch)


@dataclass(frozen=True)
class VAELoss:
    """The negative β-ELBO of an unmodified :class:`ppvae.VAE` by :func:`vae_elbo_loss`: no Pyro traces."""

    vae: Any
    num_particles: int = 1

    def __call__(self, batch: tuple[Any, ...], beta: float = 1.0) -> Tensor:
        return vae_elbo_loss(self.vae, *batch, beta=beta, num_particles=self.num_particles)


def _iwae_loss(model: Callable, guide: Callable, *args: Any, num_particles: int, **kwargs: Any):
    # scaled: β on the latent sites (ScaleLatents) and a user's poutine.scale weigh the training loss as they do in
    # Pyro's ELBOs; scoring (evaluate) uses the unscaled densities instead.
    lw = log_weights(model, guide, *args, num_samples=num_particles, scaled=True, **kwargs)  # (N, K)
    return -(lw.logsumexp(-1) - math.log(num_particles)).sum()


class ScaleLatents(Messenger):
    """Multiply the log-density of every *unobserved* sample site by ``factor``.

    Applied to both model and guide, the latent terms of the ELBO become β·(log p(z) − log q(z|x)) = −β·KL per
    datapoint while the likelihood term keeps weight 1 (Higgins et al. 2017). Scaling only the model side would
    give β·log p(z) − log q(z|x), which is not a β-VAE. ``factor`` is a number fixed for the handler's life: a
    schedule (KL warm-up) builds one per step with that step's β, so no state is shared between steps.
    """

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and self.factor != 1.0:
            msg["scale"] = msg["scale"] * self.factor


def scale_latents(fn: Callable, factor: float) -> Callable:
    """``fn`` run under :class:`ScaleLatents` (a plain wrapper: Pyro handlers as decorators lose signatures).

    ``factor`` 1 returns ``fn`` itself: the unscaled ELBO pays for no handler.
    """
    factor = float(factor)
    if factor == 1.0:
        return fn

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with ScaleLatents(factor):
            return fn(*args, **kwargs)

    return wrapped
