"""One model/guide pair from what a user passes: a :class:`ppvae.VAE`, a module with ``model``/``guide`` methods,
or two functions; and the torch device to run on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ppvae.errors import ConfigError

__all__ = ["resolve_pair", "resolve_device"]


def resolve_pair(model: Any, guide: Callable | None = None) -> tuple[Callable, Callable, nn.Module | None]:
    """Return ``(model_fn, guide_fn, owner)`` for a ``VAE``, a module with ``model``/``guide`` methods, or functions."""
    owner = model if isinstance(model, nn.Module) else None
    if guide is None:
        if callable(getattr(model, "model", None)) and callable(getattr(model, "guide", None)):
            return model.model, model.guide, owner
        raise ConfigError(
            f"fit needs a guide: pass an object with model and guide methods (a ppvae.VAE) or guide=..., "
            f"got {type(model).__name__} with no guide"
        )
    model_fn = model.model if callable(getattr(model, "model", None)) else model
    if not callable(model_fn) or not callable(guide):
        raise ConfigError(f"model and guide must be callables, got {type(model).__name__} and {type(guide).__name__}")
    return model_fn, guide, owner


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

