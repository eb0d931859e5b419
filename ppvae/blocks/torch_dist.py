"""Distributions from plain ``torch.distributions`` (zuko's flows, nflows, a hand-written one) at Pyro sample sites.

``pyro.sample(name, d)`` calls ``d()`` to draw and ``d.expand(...)`` inside a plate, which Pyro's own distributions
provide (``TorchDistributionMixin``) and a plain ``torch.distributions.Distribution`` does not: Pyro fails with
``'NormalizingFlow' object is not callable`` the first time it samples the site. :func:`as_pyro` wraps one so
Pyro can use it; :class:`RefuseTorchDistributions` turns the failure into one sentence that names the site and the
fix (ppvae runs the pair under it where Pyro would sample).
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.poutine.messenger import Messenger

from ppvae.errors import ConfigError

__all__ = ["as_pyro", "TorchAsPyro", "RefuseTorchDistributions"]

_SCALAR = torch.Size()


class TorchAsPyro(dist.TorchDistribution):
    """A Pyro distribution drawing from and scoring by a plain torch ``base`` distribution.

    Batch and event shapes are the base's; inside a plate Pyro expands it (an ``ExpandedDistribution`` draws the
    extra batch dims from the base). ``support`` is the base's, or the real vectors of its event shape when the
    base does not say (zuko's flows raise ``NotImplementedError``).
    """

    arg_constraints: dict = {}

    def __init__(self, base: torch.distributions.Distribution) -> None:
        self.base = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]
        return bool(self.base.has_rsample)

    @property
    def support(self) -> Any:  # type: ignore[override]
        try:
            return self.base.support
        except NotImplementedError:
            return constraints.independent(constraints.real, len(self.event_shape))

    def sample(self, sample_shape: torch.Size = _SCALAR) -> torch.Tensor:
        return self.base.sample(sample_shape)

    def rsample(self, sample_shape: torch.Size = _SCALAR) -> torch.Tensor:
        return self.base.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(value)


def as_pyro(d: torch.distributions.Distribution) -> dist.TorchDistribution:
    """``d`` itself when Pyro can sample it already, else ``d`` wrapped in :class:`TorchAsPyro`:
    ``pyro.sample("z", ppvae.blocks.as_pyro(flow()))``."""
    if isinstance(d, TorchDistributionMixin):
        return d
    if not isinstance(d, torch.distributions.Distribution):
        raise ConfigError(f"as_pyro takes a torch.distributions.Distribution, got {type(d).__name__}")
    return TorchAsPyro(d)


class RefuseTorchDistributions(Messenger):
    """Refuse, by name, a sample site whose distribution is a plain torch one Pyro cannot call (see :func:`as_pyro`)."""

    def _pyro_sample(self, msg: dict) -> None:
        fn = msg["fn"]
        if isinstance(fn, torch.distributions.Distribution) and not isinstance(fn, TorchDistributionMixin):
            raise ConfigError(
                f"the site {msg['name']!r} samples from {type(fn).__name__}, a torch.distributions object that Pyro "
                f"cannot sample (it is not a Pyro distribution); wrap it: pyro.sample({msg['name']!r}, "
                "ppvae.blocks.as_pyro(...))"
            )
