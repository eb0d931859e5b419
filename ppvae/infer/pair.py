"""One model/guide pair from what a user passes, and what a diagnostic may ask of it.

:func:`as_pair` turns a :class:`ppvae.VAE`, a module with ``model``/``guide`` methods, or two functions into a
:class:`Pair`, the one shape every layer above uses. The protocols say what a diagnostic needs beyond the pair:
:class:`AmortizedEncoder` (q(z|x) and p(z) as distributions: collapse), :class:`GenerativePath` (p(z) and p(x|z):
SBC's simulations); :attr:`Pair.is_builtin_vae` marks an unmodified ``ppvae.VAE``, whose ELBO ppvae computes
directly and whose guide family it can re-fit per datapoint (gaps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ppvae.errors import ConfigError

__all__ = [
    "Pair",
    "as_pair",
    "is_builtin_vae",
    "AmortizedEncoder",
    "GenerativePath",
    "resolve_pair",
    "resolve_device",
]


@runtime_checkable
class AmortizedEncoder(Protocol):
    """q(z|x) and p(z) as ``torch.distributions``: ``encode(x)`` for ``x: (B, *data_shape)``, ``prior()``."""

    def encode(self, x: torch.Tensor) -> Any: ...

    def prior(self) -> Any: ...


@runtime_checkable
class GenerativePath(Protocol):
    """Ancestral sampling: ``prior()`` is p(z), ``decode(z)`` the parameters of p(x|z)."""

    def prior(self) -> Any: ...

    def decode(self, z: torch.Tensor) -> Any: ...


@dataclass(frozen=True)
class Pair:
    """A model/guide pair: the two callables, and the ``nn.Module`` that owns their parameters (None for functions)."""

    model: Callable
    guide: Callable
    owner: nn.Module | None

    @property
    def is_builtin_vae(self) -> bool:
        """An unmodified :class:`ppvae.VAE` with its own guide: ppvae may compute its ELBO directly."""
        return is_builtin_vae(self.owner) and getattr(self.guide, "__self__", None) is self.owner

    @property
    def encoder(self) -> AmortizedEncoder | None:
        """The owner as an amortized encoder with its prior, when it is one and the guide is its own."""
        o = self.owner
        own_guide = getattr(self.guide, "__self__", None) is o
        return o if own_guide and isinstance(o, AmortizedEncoder) else None  # type: ignore[return-value]

    @property
    def generator(self) -> GenerativePath | None:
        """The owner's generation path (prior and decoder), when it has one."""
        o = self.owner
        return o if isinstance(o, GenerativePath) else None  # type: ignore[return-value]


def is_builtin_vae(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`ppvae.VAE` with its own ``model``/``guide`` (not overridden by a subclass).

    The VAE class marks itself (``_ppvae_builtin_vae`` in its own class dict, not inherited as a claim by
    subclasses' dicts), so the pair layer needs no import of the model layer.
    """
    base = next((c for c in type(obj).__mro__ if c.__dict__.get("_ppvae_builtin_vae")), None)
    return base is not None and type(obj).model is base.model and type(obj).guide is base.guide


def as_pair(model: Any, guide: Callable | None = None, *, what: str = "fit") -> Pair:
    """The :class:`Pair` for a ``VAE``, a module with ``model``/``guide`` methods, or a model function with ``guide``.

    ``what`` names the caller in the error for something that is not a pair.
    """
    owner = model if isinstance(model, nn.Module) else None
    if guide is None:
        if callable(getattr(model, "model", None)) and callable(getattr(model, "guide", None)):
            return Pair(model.model, model.guide, owner)
        raise ConfigError(
            f"{what} needs a guide: pass an object with model and guide methods (a ppvae.VAE) or guide=..., "
            f"got {type(model).__name__} with no guide"
        )
    model_fn = model.model if callable(getattr(model, "model", None)) else model
    if not callable(model_fn) or not callable(guide):
        raise ConfigError(f"model and guide must be callables, got {type(model).__name__} and {type(guide).__name__}")
    return Pair(model_fn, guide, owner)


def resolve_pair(model: Any, guide: Callable | None = None) -> tuple[Callable, Callable, nn.Module | None]:
    """``(model_fn, guide_fn, owner)`` of :func:`as_pair` (the tuple the trainer and evaluate unpack)."""
    pair = as_pair(model, guide)
    return pair.model, pair.guide, pair.owner


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``None`` (the same) or a torch device name, checked."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available here; use device='cpu'")
    return dev
