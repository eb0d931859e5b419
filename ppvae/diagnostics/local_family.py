"""A guide's own distribution family at its local latent sites, re-parameterized with free per-datapoint values.

For the gaps of any pair (Cremer et al. 2018) q* is the guide's family optimized for each datapoint alone. ppvae can
do that when every local site of the guide draws from a family it knows how to re-parameterize: Normal,
MultivariateNormal, LowRankMultivariateNormal, and their ``Independent`` (``.to_event``) forms. The guide's output
for each datapoint is read from one trace and becomes free tensors, each in an unconstrained form (log scales, a
Cholesky factor with a log diagonal), so Adam can step them; :meth:`LocalFamily.guide` is a Pyro guide that samples
every site from the family with those values, in the same plates as the original.

Each site gets its own free values: with several local sites q* is the product of the sites' families (mean-field
across sites). For a guide whose later site reads an earlier site's draw (a structured guide) that product is a
narrower family than the guide's, and the approximation gap is the product family's.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from ppvae.errors import NotApplicable

__all__ = ["LocalFamily", "local_family"]


@dataclass
class _Site:
    name: str
    kind: str  # "normal", "mvn", "lowrank"
    event_ndims: int  # Independent's reinterpreted dims
    frames: list  # the site's plate frames (name, size, dim)
    params: dict[str, Tensor]  # free, unconstrained

    def distribution(self) -> dist.Distribution:
        p = self.params
        if self.kind == "normal":
            d: dist.Distribution = dist.Normal(p["loc"], p["log_scale"].exp())
        elif self.kind == "mvn":
            tril = p["tril"].tril(-1) + p["log_diag"].exp().diag_embed()
            d = dist.MultivariateNormal(p["loc"], scale_tril=tril)
        else:
            d = dist.LowRankMultivariateNormal(p["loc"], p["cov_factor"], p["log_cov_diag"].exp())
        return d.to_event(self.event_ndims) if self.event_ndims else d


def _free(fn: Any, name: str) -> tuple[str, int, dict[str, Tensor]]:
    """The family of ``fn`` and its parameters as free leaf tensors (detached copies of the guide's output)."""
    base, ndims = fn, 0
    while isinstance(base, dist.Independent):
        ndims += base.reinterpreted_batch_ndims
        base = base.base_dist
    if isinstance(base, dist.Normal):
        full = base.batch_shape
        params = {"loc": base.loc.detach().expand(full).clone(), "log_scale": base.scale.detach().expand(full).log()}
        return "normal", ndims, params
    if type(base) is dist.MultivariateNormal or type(base) is torch.distributions.MultivariateNormal:
        full = base.batch_shape
        tril = base.scale_tril.detach().expand(full + base.event_shape + base.event_shape)
        params = {
            "loc": base.loc.detach().expand(full + base.event_shape).clone(),
            "tril": tril.tril(-1).clone(),
            "log_diag": tril.diagonal(dim1=-2, dim2=-1).log(),
        }
        return "mvn", ndims, params
    if isinstance(base, (dist.LowRankMultivariateNormal, torch.distributions.LowRankMultivariateNormal)):
        full = base.batch_shape
        rank = base.cov_factor.shape[-1]
        params = {
            "loc": base.loc.detach().expand(full + base.event_shape).clone(),
            "cov_factor": base.cov_factor.detach().expand(full + base.event_shape + (rank,)).clone(),
            "log_cov_diag": base.cov_diag.detach().expand(full + base.event_shape).log(),
        }
        return "lowrank", ndims, params
    raise NotApplicable(
        f"gaps re-fit the guide's own family per datapoint, and ppvae can re-parameterize Normal, "
        f"MultivariateNormal and LowRankMultivariateNormal (or their .to_event forms); the guide's site {name!r} "
        f"draws from {type(base).__name__}"
    )


class LocalFamily:
    """Free per-datapoint parameters of the guide's family at ``names``, read from ``guide_trace``."""

    def __init__(self, guide_trace: Any, names: Sequence[str]):
        self.sites = []
        for name in names:
            node = guide_trace.nodes[name]
            kind, ndims, params = _free(node["fn"], name)
            for t in params.values():
                t.requires_grad_(True)
            frames = [(f.name, f.size, f.dim) for f in node["cond_indep_stack"] if f.vectorized]
            self.sites.append(_Site(name, kind, ndims, frames, params))

    def parameters(self) -> list[Tensor]:
        return [t for s in self.sites for t in s.params.values()]

    def guide(self, *args: Any, **kwargs: Any) -> None:
        """A Pyro guide drawing every site from its family with the free values, in the original plates."""
        plates: dict[tuple, Any] = {}  # one plate object per frame, entered by every site in it: Pyro records a
        for site in self.sites:  # plate when it is made, and two of one name in a trace are an error
            with ExitStack() as stack:
                for name, size, dim in site.frames:
                    if (name, size, dim) not in plates:
                        plates[name, size, dim] = pyro.plate(name, size, dim=dim)
                    stack.enter_context(plates[name, size, dim])
                pyro.sample(site.name, site.distribution())


def local_family(guide_trace: Any, names: Sequence[str], guide_sites: Sequence[str]) -> LocalFamily:
    """:class:`LocalFamily` for the sites ``names``; :class:`NotApplicable` when the guide samples other sites too
    (q* replaces the whole guide) or when a site's family cannot be re-parameterized."""
    others = [s for s in guide_sites if s not in names]
    if others:
        raise NotApplicable(
            f"gaps replace the whole guide by per-datapoint members of its family, but the guide also samples "
            f"{others} besides the local latents {list(names)}; gaps need a guide of continuous local latents only"
        )
    return LocalFamily(guide_trace, names)
