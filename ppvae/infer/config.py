"""The settings of :func:`ppvae.fit`, with their defaults, in one place.

:func:`ppvae.fit`'s signature, the ``ppvae train`` flags, a compare grid's cells (:class:`ppvae.compare.GridSettings`)
and the ``ppvae compare``/``ppvae demo`` presets take their defaults from :class:`FitConfig`, so a default exists
once. A setting is what decides how a pair is trained (budget, optimizer, objective, β, faults, seed, device); what
is trained on (``data`` and its streams, ``val_data``), which of the pair's weights stay fixed (``freeze``: names of
one pair's modules, not a setting a grid's cells could share), where checkpoints go (``checkpoint_dir``,
``resume``) and what is printed (``progress``) stay arguments of ``fit`` alone.

The checks of each numeric setting (:data:`CONSTRAINTS`) are :mod:`ppvae._validate`'s, the same that ``fit`` applies,
so a :class:`FitConfig`, ``fit`` and a CLI flag refuse the same values with the same sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ppvae._validate import COUNT, NONNEGATIVE, POSITIVE, SEED, Constraint, Options, check
from ppvae.errors import ConfigError

__all__ = ["FitConfig", "CONSTRAINTS", "ON_NONFINITE", "merge_config"]

#: What a NaN/Inf loss or gradient does: stop training, or leave the batch out.
ON_NONFINITE = ("raise", "skip")

#: What each setting may be (``None`` among them: the setting is optional). ``objective`` and ``device`` are checked
#: where they are built (:func:`~ppvae.infer.objectives.make_objective`, :func:`~ppvae.infer.pair.resolve_device`).
CONSTRAINTS: dict[str, tuple[Constraint | None, ...]] = {
    "epochs": (COUNT,),
    "batch_size": (COUNT,),
    "lr": (POSITIVE,),
    "num_particles": (COUNT,),
    "vectorize_particles": (None, Options((True, False))),
    "beta": (NONNEGATIVE,),
    "kl_warmup": (NONNEGATIVE,),
    "patience": (None, COUNT),
    "clip_norm": (None, POSITIVE),
    "on_nonfinite": (Options(ON_NONFINITE),),
    "seed": (None, SEED),
}


@dataclass(frozen=True)
class FitConfig:
    """How :func:`ppvae.fit` trains a pair; every field is the ``fit`` argument of the same name (documented there).

    Numeric fields are checked when the config is made (:data:`CONSTRAINTS`), with fit's messages:
    ``FitConfig(lr=0)`` raises ``ConfigError: lr must be a number > 0, got 0``.
    """

    epochs: int = 10  # passes over the data
    batch_size: int = 128  # examples per step
    lr: float = 1e-3  # Adam learning rate
    objective: Any = "elbo"  # a name of ppvae.infer.objectives.OBJECTIVES, or a pyro.infer.ELBO instance
    num_particles: int = 1  # samples of z per datapoint per step (IWAE's K)
    vectorize_particles: bool | None = None  # None: vectorized for a ppvae.VAE with several particles
    beta: float = 1.0  # weight of the latent terms: β·KL
    kl_warmup: float = 0.0  # epochs over which β rises linearly from 0
    patience: int | None = None  # epochs without a better validation ELBO before stopping (needs val_data)
    clip_norm: float | None = None  # global gradient-norm clip
    on_nonfinite: str = "raise"  # a NaN/Inf loss or gradient: "raise" or "skip" the batch
    seed: int | None = 0  # seeds torch, numpy and Python's RNG (None: left as they are)
    device: Any = "auto"  # "auto" (CUDA when present), "cpu", "cuda[:N]" or a torch.device

    def __post_init__(self) -> None:
        for name, allowed in CONSTRAINTS.items():
            object.__setattr__(self, name, check(name, getattr(self, name), *allowed))

    @classmethod
    def cli(cls) -> FitConfig:
        """The command line's preset: ``fit``'s defaults but 20 epochs, where ``fit`` does 10.

        ``ppvae train``, ``ppvae compare`` and a compare grid's cells (:class:`ppvae.compare.GridSettings`) start
        from it. The two budgets are kept as each has always been; this is where the difference is written down.
        """
        return cls(epochs=20)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings, in order: the names of ``fit``'s arguments a config sets."""
        return tuple(f.name for f in fields(cls))

    def fit_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`ppvae.fit` this configuration sets (values as they are, not copied)."""
        return {name: getattr(self, name) for name in self.names()}

    def merge(self, given: dict[str, Any]) -> dict[str, Any]:
        """``fit``'s settings from this config and the arguments ``given`` to ``fit`` with it (``name → value``).

        An argument left at ``fit``'s default takes the config's value; one set to the config's value agrees with
        it; one set to anything else contradicts the config and raises :class:`ConfigError` naming both values.
        (A default cannot be told apart from the same value given: ``fit(config=c, epochs=10)`` trains c.epochs.)
        """
        default = type(self)()
        merged = self.fit_kwargs()
        for name, value in given.items():
            mine = merged[name]
            if _same(value, getattr(default, name)) or _same(value, mine):
                continue
            raise ConfigError(
                f"fit got {name}={value!r} and a config with {name}={mine!r}; set {name} in one place: the argument, "
                f"or the config (dataclasses.replace(config, {name}={value!r}))"
            )
        return merged


def merge_config(config: Any, given: dict[str, Any]) -> dict[str, Any]:
    """:meth:`FitConfig.merge` of ``fit(..., config=config)``, once ``config`` is known to be a FitConfig."""
    if not isinstance(config, FitConfig):
        raise ConfigError(f"config must be a ppvae.FitConfig, got {type(config).__name__}; build one: FitConfig(...)")
    return config.merge(given)


def _same(a: Any, b: Any) -> bool:
    """Equal settings: the same object, or equal values where ``==`` says so (``True`` is not ``1``)."""
    if a is b:
        return True
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object whose == is not one bool (a tensor): only itself is the same
        return False
