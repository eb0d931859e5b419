"""Save and load models and training checkpoints, safely.

A file is a ``torch.save`` archive of plain containers, strings, numbers and tensors: the model's configuration
as JSON text, its ``state_dict``, and (for checkpoints) the optimizer and RNG states. It is read with
``torch.load(weights_only=True)``, which refuses to unpickle arbitrary objects, so a file from someone else
cannot run code. Writes go to a temporary file in the same directory, are flushed to disk, and renamed over the
target, so a crash never leaves a half-written file under the real name; the previous file is kept as
``<name>.prev``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError

__all__ = ["save", "load", "read", "FORMAT", "VERSION"]

FORMAT = "ppvae"
VERSION = 1


def _write_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, path.with_name(path.name + ".prev"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The raw contents of a ppvae file (config and meta parsed from JSON), without building a model.

    Raises :class:`CheckpointError` for a missing, truncated, corrupted or foreign file, naming it and, where one
    exists, the previous checkpoint to use instead.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file: {path}")
    prev = path.with_name(path.name + ".prev")
    hint = f"; the previous checkpoint {prev} may still be good" if prev.exists() else ""
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


def _config_json(model: nn.Module) -> str | None:
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
        "kind": "vae" if _config_json(model) else "module",
        "class": type(model).__name__,
        "config": _config_json(model),
        "state_dict": model.state_dict(),
        "meta": json.dumps(meta or {}),
    }
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    path = Path(path)
    _write_atomic(obj, path)
    return path


def load(path: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load a saved model: a ppvae.VAE is rebuilt from its config; other modules need ``model=`` to load into."""
    obj = read(path)
    if model is None:
        if obj.get("kind") != "vae":
            raise CheckpointError(
                f"{path} holds the weights of a custom {obj.get('class')}; build one and pass it: "
                f"ppvae.load({str(path)!r}, model=...)"
            )
        from .vae import VAE  # deferred: io is imported by the training loop, VAE by users

        model = VAE(**obj["config"])
    try:
        model.load_state_dict(obj["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"the weights in {path} do not fit this model: {str(err).splitlines()[0][:200]}"
        ) from None
    return model.to(device)


# --- training checkpoints ---------------------------------------------------------------------------------


def prepare_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` and check now, not after an hour of training, that files can be written there."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".ppvae-write-test"):
            pass
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoints to {directory}: {err.strerror or err}; choose another directory"
        ) from None
    return directory


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training(
    path: Path, model: Any, params: list[tuple[str, Tensor]], optimizer: torch.optim.Optimizer, result: Any
) -> None:
    """Checkpoint everything needed to resume training exactly: weights, optimizer, RNG, history."""
    obj: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "checkpoint",
        "params": {name: p.detach().clone() for name, p in params},
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "meta": json.dumps(
            {"history": result.history, "best_epoch": result.best_epoch, "best_score": result.best_score}
        ),
    }
    if result.best_params is not None:
        obj["best_params"] = result.best_params
    if isinstance(model, nn.Module):
        obj["state_dict"] = model.state_dict()
        obj["config"] = _config_json(model)
        obj["class"] = type(model).__name__
    _write_atomic(obj, path)


def restore_training(
    path: Path, params: list[tuple[str, Tensor]], optimizer: torch.optim.Optimizer, result: Any
) -> int:
    """Load a checkpoint written by :func:`save_training` in place; returns the number of finished epochs."""
    obj = read(path)
    saved = obj.get("params", {})
    names = [n for n, _ in params]
    if sorted(saved) != sorted(names):
        raise CheckpointError(
            f"{path} was written for different parameters ({len(saved)} saved, {len(names)} here); resume with the "
            "same model, or start over in a new checkpoint_dir"
        )
    with torch.no_grad():
        for name, p in params:
            if saved[name].shape != p.shape:
                raise CheckpointError(
                    f"parameter {name} in {path} has shape {tuple(saved[name].shape)}, the model's has {tuple(p.shape)}"
                )
            p.copy_(saved[name])
    optimizer.load_state_dict(obj["optimizer"])
    _set_rng_state(obj["rng"])
    result.history[:] = obj["meta"]["history"]
    result.best_epoch = obj["meta"]["best_epoch"]
    result.best_score = obj["meta"]["best_score"]
    result.best_params = obj.get("best_params")
    return len(result.history)
