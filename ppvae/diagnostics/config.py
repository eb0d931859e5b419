"""The settings of every diagnostic, with their defaults, in one place; and the list of parts ``diagnose`` runs.

Each diagnostic's function (:func:`~ppvae.diagnostics.gaps.inference_gaps`, :func:`~ppvae.diagnostics.sbc.sbc`, ...),
:func:`ppvae.diagnose`, the ``ppvae diagnose`` flags and the compare grid's quick preset take their defaults from these
dataclasses, so a default exists once. Field names say what they count: importance samples, Monte Carlo draws,
NUTS draws, optimizer steps.

A diagnostic is a *part* of :class:`DiagnoseConfig`: one field whose type is the part's config class. The class
names its part (``part``: the attribute of :class:`~ppvae.diagnostics.diagnosis.Diagnosis`, the key in its JSON,
the ``--no-<part>`` flag), the function that runs it (``runner``, imported lazily as ``"module:function"``), and,
per field, the constraint its value must meet, the :func:`ppvae.diagnose` keyword that sets it and the CLI flag
(:func:`setting`). :func:`ppvae.diagnose`, the grid's checks and the CLI read these declarations, so a new
diagnostic is its module, its config class here, its findings, and nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

from ppvae._validate import COUNT, POSITIVE, Constraint, Interval, check
from ppvae.errors import ConfigError

__all__ = [
    "CollapseConfig",
    "GapsConfig",
    "SBCConfig",
    "ReferenceConfig",
    "DiagnoseConfig",
    "Setting",
    "setting",
    "part_configs",
    "part_settings",
    "runner",
]


@dataclass(frozen=True)
class Setting:
    """How one field of a part's config is checked and reached from outside.

    ``option``: the :func:`ppvae.diagnose` keyword (and ``GridSettings.diagnose`` key) that sets it;
    ``flag``: the ``ppvae diagnose`` flag, or ``None`` for a setting the CLI does not expose;
    ``help``: the flag's help text.
    """

    constraint: Constraint
    option: str
    flag: str | None = None
    help: str = ""


def setting(default: Any, constraint: Constraint, option: str, flag: str | None = None, help: str = "") -> Any:
    """A dataclass field with its :class:`Setting` in the field's metadata (key ``"setting"``)."""
    return field(default=default, metadata={"setting": Setting(constraint, option, flag, help)})


#: Whole numbers ≥ 0 (warm-up steps).
_WHOLE0 = Interval(whole=True, low=0)


@dataclass(frozen=True)
class CollapseConfig:
    """Posterior collapse: ``num_points`` datapoints, ``num_mc_draws`` guide draws each for the aggregate posterior."""

    part: ClassVar[str] = "collapse"
    runner: ClassVar[str] = "ppvae.diagnostics.collapse:run_part"
    about: ClassVar[str] = "posterior collapse (active units, KL per dimension, mutual information)"

    num_points: int = setting(1000, COUNT, "collapse_points")
    num_mc_draws: int = setting(64, COUNT, "collapse_mc_draws")


@dataclass(frozen=True)
class GapsConfig:
    """Amortization/approximation gaps: the guide's family re-fitted per datapoint by Adam (Cremer et al. 2018)."""

    part: ClassVar[str] = "gaps"
    runner: ClassVar[str] = "ppvae.diagnostics.gaps:run_part"
    about: ClassVar[str] = "the amortization/approximation gaps"

    num_points: int = setting(100, COUNT, "num_gap_points", "--gap-points", "datapoints (seeded draw) for the gaps")
    steps: int = setting(300, COUNT, "gap_steps", "--gap-steps", "Adam steps of the per-datapoint guides")
    lr: float = setting(1e-2, POSITIVE, "gap_lr")
    num_particles: int = setting(16, COUNT, "gap_particles")  # Monte Carlo draws per step of the per-point ELBO
    num_importance_samples: int = setting(1000, Interval(whole=True, low=2), "gap_importance_samples")


@dataclass(frozen=True)
class SBCConfig:
    """Simulation-based calibration (Talts et al. 2018): ranks of z̃ ~ p(z) among guide draws for x ~ p(x | z̃)."""

    part: ClassVar[str] = "sbc"
    runner: ClassVar[str] = "ppvae.diagnostics.sbc:run_part"
    about: ClassVar[str] = "simulation-based calibration"

    # The χ² uniformity test needs at least 10 simulations.
    num_simulations: int = setting(
        500, Interval(whole=True, low=10), "sbc_simulations", "--sbc-simulations", "simulations for SBC, ≥ 10"
    )
    num_draws: int = setting(99, COUNT, "sbc_draws")  # guide draws per simulation: ranks in 0..num_draws
    batch_size: int = setting(256, COUNT, "sbc_batch_size")


@dataclass(frozen=True)
class ReferenceConfig:
    """NUTS reference posteriors p(z | x) with the decoder fixed, for a few datapoints."""

    part: ClassVar[str] = "reference"
    runner: ClassVar[str] = "ppvae.diagnostics.reference:run_part"
    about: ClassVar[str] = "NUTS reference posteriors (the costliest part)"

    num_points: int = setting(
        3, COUNT, "num_reference_points", "--reference-points", "datapoints (evenly spaced) for NUTS"
    )
    num_chains: int = setting(2, COUNT, "reference_chains")
    num_warmup: int = setting(
        450, _WHOLE0, "reference_warmup", "--reference-warmup", "NUTS warm-up steps per chain, 2 chains"
    )
    # R-hat needs at least 2 draws per chain.
    num_nuts_draws: int = setting(
        1000, Interval(whole=True, low=2), "reference_samples", "--reference-samples", "NUTS draws kept per chain"
    )
    num_guide_draws: int = setting(1000, Interval(whole=True, low=2), "reference_guide_draws")
    # Datapoints whose posteriors one NUTS run samples together (one batched decoder pass per leapfrog step).
    points_per_run: int = setting(
        50, COUNT, "reference_points_per_run", "--reference-points-per-run", "datapoints sampled in one NUTS run"
    )


@dataclass(frozen=True)
class DiagnoseConfig:
    """What :func:`ppvae.diagnose` runs and how: ``None`` for a part switches it off.

    Every field but ``num_importance_samples`` is a part; the order of the fields is the order the parts run in.
    """

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

    @classmethod
    def from_options(cls, num_samples: int | None = None, **options: Any) -> DiagnoseConfig:
        """A configuration from :func:`ppvae.diagnose`'s keywords: a part's name with ``True``/``False`` switches it
        on or off, a setting's ``option`` (``num_gap_points``, ``sbc_simulations``, ...) sets that field. Every name
        and value is checked (:class:`~ppvae.errors.ConfigError`); a setting of a part switched off is ignored."""
        return cls.from_mapping(options, num_samples=num_samples)

    @classmethod
    def from_mapping(
        cls, options: Mapping[str, Any], *, num_samples: int | None = None, label: Callable[[str], str] = str
    ) -> DiagnoseConfig:
        """:meth:`from_options` on a mapping; ``label(option)`` names an option in messages (the compare grid says
        ``GridSettings.diagnose['gap_steps']``)."""
        parts = {c.part: c for c in part_configs()}
        by_option = {s.option: (c.part, f) for c, f, s in part_settings()}
        unknown = sorted(set(options) - set(parts) - set(by_option))
        if unknown:
            allowed = ", ".join(sorted(parts) + sorted(by_option))
            names = ", ".join(label(u) for u in unknown)
            raise ConfigError(f"unknown diagnose option {names}; its options are {allowed}")
        chosen: dict[str, Any] = {}
        for name, config_class in parts.items():
            on = options.get(name, True)
            if not isinstance(on, bool):
                raise ConfigError(f"{label(name)} must be True or False (run that part or not), got {on!r}")
            chosen[name] = config_class() if on else None
        for option, value in options.items():
            if option in parts:
                continue
            part, f = by_option[option]
            checked = check(label(option), value, f.metadata["setting"].constraint)
            if chosen[part] is not None:
                chosen[part] = replace(chosen[part], **{f.name: checked})
        if num_samples is not None:
            chosen["num_importance_samples"] = num_samples
        return cls(**chosen)

    def parts(self) -> Iterator[tuple[str, Any]]:
        """``(part name, its config)`` for every part switched on, in run order."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "num_importance_samples" and value is not None:
                yield f.name, value

    def diagnose_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`ppvae.diagnose` that give this configuration."""
        out: dict[str, Any] = {"num_samples": self.num_importance_samples}
        for config_class in part_configs():
            out[config_class.part] = getattr(self, config_class.part) is not None
        for config_class, f, s in part_settings():
            part = getattr(self, config_class.part) or config_class()
            out[s.option] = getattr(part, f.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def part_configs() -> list[type]:
    """The config class of every part of :class:`DiagnoseConfig`, in run order."""
    out = []
    for f in dataclasses.fields(DiagnoseConfig):
        if f.name == "num_importance_samples":
            continue
        config_class = f.default_factory()  # type: ignore[misc]
        if type(config_class).part != f.name:  # pragma: no cover - a declaration mistake, caught by the tests
            raise TypeError(f"DiagnoseConfig.{f.name} holds {type(config_class).__name__}, whose part is another")
        out.append(type(config_class))
    return out


def part_settings() -> Iterator[tuple[type, dataclasses.Field, Setting]]:
    """``(config class, field, Setting)`` for every declared setting of every part."""
    for config_class in part_configs():
        for f in dataclasses.fields(config_class):
            if "setting" in f.metadata:
                yield config_class, f, f.metadata["setting"]


def runner(config_class: type) -> Callable[..., Any]:
    """The function that runs a part, ``run_part(inputs, config) -> result``, imported on first use (NUTS and the
    gap optimizers load only when their part runs)."""
    module, _, name = config_class.runner.partition(":")
    return getattr(importlib.import_module(module), name)
