"""The ppvae file: a ``torch.save`` archive of plain containers, strings, numbers and tensors, read safely.

It holds a model's configuration as JSON text, its ``state_dict`` and (for checkpoints) the optimizer and RNG states.
It is read with ``torch.load(weights_only=True)``, which refuses to unpickle arbitrary objects, so a file from someone
else cannot run code (a raw pickle is refused before any unpickler sees it: a torch archive is a zip file). Writes are
atomic and keep the file they replace as ``<name>.prev`` (:func:`ppvae._fs.write_atomic`).

Ground floor: models (:mod:`ppvae.io`) and training checkpoints (:mod:`ppvae.infer.checkpoint`) are both written in it.
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

__all__ = ["FORMAT", "VERSION", "write_file", "read", "read_file", "config_json"]


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

