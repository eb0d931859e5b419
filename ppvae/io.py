"""Save and load models, safely (training checkpoints: :mod:`ppvae.infer.checkpoint`).

A file is a ``torch.save`` archive of plain containers, strings, numbers and tensors: the model's configuration
as JSON text, its ``state_dict``, and (for checkpoints) the optimizer and RNG states. It is read with
``torch.load(weights_only=True)``, which refuses to unpickle arbitrary objects, so a file from someone else
cannot run code (a raw pickle is refused before any unpickler sees it: a torch archive is a zip file).

Writes are atomic and keep the file they replace as ``<name>.prev`` (:func:`ppvae._fs.write_atomic`), the older
file to fall back to if the newest is ever damaged.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppvae._fs import previous, write_atomic
from ppvae.errors import CheckpointError, ConfigError

__all__ = ["save", "load", "read", "previous", "read_file", "config_json", "write_file", "FORMAT", "VERSION"]

FORMAT = "ppvae"
VERSION = 1


def write_file(obj: dict, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, keeping the file it replaces as ``<name>.prev``."""
    write_atomic(path, lambda f: torch.save(obj, f), keep_previous=True)


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The raw contents of a ppvae file (config and meta parsed from JSON), without building a model.

    Raises :class:`CheckpointError` for a missing, truncated, corrupted or foreign file, naming it and, where one
    exists, the previous checkpoint to use instead.
    """
    path = Path(path)
    prev = previous(path)
    return read_file(path, f"; the previous checkpoint {prev} may still be good" if prev.exists() else "")


def read_file(path: Path, hint: str) -> dict[str, Any]:
    """The checked contents of ``path``; ``hint`` ends every error message (e.g. where an older copy is)."""
    if not path.exists():
        raise CheckpointError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; anything else (a raw pickle, a truncated or foreign file) is never
        # handed to an unpickler at all.
        raise CheckpointError(
            f"cannot read {path}: truncated, corrupted or not a ppvae file (not a torch archive){hint}"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain data, and unpickling them could "
            f"run code ({str(err).splitlines()[0][:120]}){hint}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read {path}: truncated, corrupted or not a ppvae file ({str(err).splitlines()[0][:120]}){hint}"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a torch file but not a ppvae model or checkpoint (no 'format': 'ppvae'){hint}"
        )
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer ppvae (file version {obj['version']}); upgrade ppvae")
    for key in ("config", "meta"):
        if isinstance(obj.get(key), str):
            obj[key] = json.loads(obj[key])
    return obj


def config_json(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if not callable(config):
        return None
    try:
        return json.dumps(config())
    except TypeError as err:
        raise ConfigError(
            f"the model's configuration is not JSON-serializable ({err}); pass building blocks by name"
        ) from None


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


