"""Save and load models, safely: the ppvae file format is :mod:`ppvae._archive` (a torch archive of plain data, read
with ``weights_only=True``, written atomically with the previous file kept as ``<name>.prev``); training checkpoints
are :mod:`ppvae.infer.checkpoint`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppvae._archive import FORMAT, VERSION, config_json, read, write_file
from ppvae._fs import previous
from ppvae.errors import CheckpointError, ConfigError

__all__ = ["save", "load", "read", "previous", "FORMAT", "VERSION"]


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    meta: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write ``model`` (a ppvae.VAE, or any ``nn.Module``) to ``path`` atomically.

    A VAE is saved with its JSON configuration and can be rebuilt by :func:`load` alone; any other module is saved
    as weights, loaded back into a module you build (``load(path, model=MyModel())``). ``meta`` is a JSON-
    serializable dict stored alongside (data preprocessing, history).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"save needs an nn.Module (a ppvae.VAE or your own), got {type(model).__name__}")
    obj: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "vae" if config_json(model) else "module",
        "class": type(model).__name__,
        "config": config_json(model),
        "state_dict": model.state_dict(),
        "meta": json.dumps(meta or {}),
    }
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    path = Path(path)
    try:
        write_file(obj, path)
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}; free space or write elsewhere") from None
    return path


def load(path: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load a saved model: a ppvae.VAE is rebuilt from its config; other modules need ``model=`` to load into.

    ``path`` may also be a training checkpoint of ``fit`` (``last.pt``, ``best.pt``, ``nonfinite.pt``). Files are
    read by :func:`read`, which never unpickles arbitrary objects.
    """
    obj = read(path)
    kind = obj.get("kind")
    if kind == "checkpoint" and "state_dict" not in obj:
        raise CheckpointError(
            f"{path} is a checkpoint of a pair of functions (Pyro parameters, no module); resume it with "
            "ppvae.fit(model, data, guide=..., checkpoint_dir=..., resume=True)"
        )
    if model is None:
        if not obj.get("config") or kind not in ("vae", "checkpoint"):
            raise CheckpointError(
                f"{path} holds the weights of a custom {obj.get('class')}; build one and pass it: "
                f"ppvae.load({str(path)!r}, model=...)"
            )
        from ppvae.vae import VAE  # deferred: io is imported by the training loop, VAE by users

        model = VAE(**obj["config"])
    try:
        model.load_state_dict(obj["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"the weights in {path} do not fit this model: {str(err).splitlines()[0][:200]}"
        ) from None
    return model.to(device)


# --- training checkpoints ---------------------------------------------------------------------------------


