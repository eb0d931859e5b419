"""The settings of every diagnostic, with their defaults, in one place.

Each diagnostic's function (:func:`~ppvae.diagnostics.gaps.inference_gaps`, :func:`~ppvae.diagnostics.sbc.sbc`, ...),
:func:`ppvae.diagnose`, the ``ppvae diagnose`` flags and the compare grid's quick preset take their defaults from these
dataclasses, so a default exists once. Field names say what they count: importance samples, Monte Carlo draws,
NUTS draws, optimizer steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["CollapseConfig", "GapsConfig", "SBCConfig", "ReferenceConfig", "DiagnoseConfig"]


@dataclass(frozen=True)
class CollapseConfig:
    """Posterior collapse: ``num_points`` datapoints, ``num_mc_draws`` guide draws each for the aggregate posterior."""

    num_points: int = 1000
    num_mc_draws: int = 64


@dataclass(frozen=True)
class GapsConfig:
    """Amortization/approximation gaps: the guide's family re-fitted per datapoint by Adam (Cremer et al. 2018)."""

    num_points: int = 100  # datapoints (a seeded draw)
    steps: int = 300  # Adam steps of the per-datapoint guides
    lr: float = 1e-2
    num_particles: int = 16  # Monte Carlo draws per step of the per-datapoint ELBO
    num_importance_samples: int = 1000  # for the ELBOs and IWAE of q and q*


@dataclass(frozen=True)
class SBCConfig:
    """Simulation-based calibration (Talts et al. 2018): ranks of z̃ ~ p(z) among guide draws for x ~ p(x | z̃)."""

    num_simulations: int = 500  # ≥ 10
    num_draws: int = 99  # guide draws per simulation: ranks in 0..num_draws
    batch_size: int = 256


@dataclass(frozen=True)
class ReferenceConfig:
    """NUTS reference posteriors p(z | x) with the decoder fixed, for a few datapoints."""

    num_points: int = 3  # datapoints (evenly spaced)
    num_chains: int = 2
    num_warmup: int = 500  # NUTS warm-up steps per chain
    num_nuts_draws: int = 1000  # NUTS draws kept per chain
    num_guide_draws: int = 1000  # draws of q(z | x) compared with them


@dataclass(frozen=True)
class DiagnoseConfig:
    """What :func:`ppvae.diagnose` runs and how: ``None`` for a part switches it off."""

    num_importance_samples: int = 1000  # S, per datapoint, for log p̂, k̂ and ESS
    collapse: CollapseConfig | None = field(default_factory=CollapseConfig)
    gaps: GapsConfig | None = field(default_factory=GapsConfig)
    sbc: SBCConfig | None = field(default_factory=SBCConfig)
    reference: ReferenceConfig | None = field(default_factory=ReferenceConfig)

    @classmethod
    def quick(cls) -> DiagnoseConfig:
        """The compare grid's preset: every part, on fewer points and steps (a cell's diagnosis in seconds)."""
        return cls(
            gaps=replace(GapsConfig(), num_points=30, steps=150),
            sbc=replace(SBCConfig(), num_simulations=100),
            reference=replace(ReferenceConfig(), num_points=1, num_warmup=150, num_nuts_draws=150),
        )

    def diagnose_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`ppvae.diagnose` that this configuration sets."""
        g, s, r = self.gaps or GapsConfig(), self.sbc or SBCConfig(), self.reference or ReferenceConfig()
        return {
            "num_samples": self.num_importance_samples,
            "collapse": self.collapse is not None,
            "gaps": self.gaps is not None,
            "sbc": self.sbc is not None,
            "reference": self.reference is not None,
            "num_gap_points": g.num_points,
            "gap_steps": g.steps,
            "sbc_simulations": s.num_simulations,
            "num_reference_points": r.num_points,
            "reference_warmup": r.num_warmup,
            "reference_samples": r.num_nuts_draws,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
