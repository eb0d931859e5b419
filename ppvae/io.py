"""Save and load models and training checkpoints, safely.

A file is a ``torch.save`` archive of plain containers, strings, numbers and tensors: the model's configuration
as JSON text, its ``state_dict``, and (for checkpoints) the optimizer and RNG states. It is read with
``torch.load(weights_only=True)``, which refuses to unpickle arbitrary objects, so a file from someone else
cannot run code (a raw pickle is refused before any unpickler sees it: a torch archive is a zip file).

Writes go to a temporary file in the same directory, are flushed to disk (``fsync``) and renamed over the target,
so a crash or ``SIGKILL`` never leaves a half-written file under the real name, and the real name always exists
once written: the previous file is kept as ``<name>.prev`` (a hard link, made before the rename), the older
checkpoint to fall back to if the newest is ever damaged.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
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
    """``torch.save`` to a temporary file, fsync, keep the current file as ``<name>.prev``, rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            _keep_previous(path)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never a mix or nothing
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _keep_previous(path: Path) -> None:
    """Make ``<name>.prev`` the current file without a moment where ``path`` is missing (a kill then loses nothing)."""
    prev = previous(path)
    tmp = path.with_name(f".{prev.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)  # a second name for the same data: no copy, and path stays in place
    except OSError:  # a filesystem without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def _fsync_dir(directory: Path) -> None:
    """Flush the directory entry of a rename, so the new name survives a power cut (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def previous(path: str | os.PathLike) -> Path:
    """Where the version of ``path`` before its last write is kept: ``<name>.prev`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The raw contents of a ppvae file (config and meta parsed from JSON), without building a model.

    Raises :class:`CheckpointError` for a missing, truncated, corrupted or foreign file, naming it and, where one
    exists, the previous checkpoint to use instead.
    """
    path = Path(path)
    prev = previous(path)
    return _read(path, f"; the previous checkpoint {prev} may still be good" if prev.exists() else "")


def _read(path: Path, hint: str) -> dict[str, Any]:
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
    try:
        _write_atomic(obj, path)
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
    """Create ``directory`` and check now, not after an hour of training, that files can be written there.

    Writes, fsyncs and removes a small probe file: a read-only directory, a path under a regular file, or a full
    disk fail here with a :class:`CheckpointError` naming the directory.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ppvae-write-test.", dir=directory)
        try:
            os.write(fd, b"\0" * 4096)  # data, not just a name: a full disk may still create empty files
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoints to {directory}: {err.strerror or err}; choose another directory (or free space)"
        ) from None
    return directory


def check_space(directory: Path, params: list[tuple[str, Tensor]]) -> None:
    """Refuse to start training when ``directory`` lacks room for the checkpoints it will hold.

    A checkpoint holds about 5 copies of the parameters (weights, Adam's two moments, the best weights, the
    module's state); ``last.pt``, ``best.pt``, their ``.prev`` and a temporary file make 5 checkpoints.
    """
    need = 25 * sum(p.numel() * p.element_size() for _, p in params) + (1 << 20)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # cannot tell: the probe write in prepare_dir passed
    if free < need:
        raise CheckpointError(
            f"not enough space for checkpoints in {directory}: {free / 2**20:.1f} MiB free, about "
            f"{need / 2**20:.1f} MiB needed; free space or choose another checkpoint directory"
        )


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
    path: Path,
    model: Any,
    params: list[tuple[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    result: Any,
    *,
    extra: dict | None = None,
) -> None:
    """Checkpoint everything needed to resume training exactly: weights (and the module's buffers), Adam's state,
    the RNG states of torch (and CUDA), numpy and Python, the history and the best weights so far.

    The data order is not stored: it is drawn from the torch RNG at the start of each epoch, so the restored RNG
    state replays it. ``extra``: JSON-serializable facts stored in the meta (e.g. where training failed).
    """
    obj: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "checkpoint",
        "params": {name: p.detach().clone() for name, p in params},
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "meta": json.dumps(
            {
                "history": result.history,
                "best_epoch": result.best_epoch,
                "best_score": result.best_score,
                "stopped_early": result.stopped_early,
                **(extra or {}),
            }
        ),
    }
    if result.best_params is not None:
        obj["best_params"] = result.best_params
    if isinstance(model, nn.Module):
        obj["state_dict"] = model.state_dict()
        obj["config"] = _config_json(model)
        obj["class"] = type(model).__name__
    try:
        _write_atomic(obj, path)
    except OSError as err:
        kept = f"; {path} still holds the previous epoch's checkpoint" if path.exists() else ""
        raise CheckpointError(
            f"cannot write checkpoint {path}: {err.strerror or err}{kept}; free space (or fix permissions) and resume"
        ) from None


def restore_training(
    path: Path,
    params: list[tuple[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    result: Any,
    module: nn.Module | None = None,
) -> int:
    """Load a checkpoint written by :func:`save_training` in place; returns the number of finished epochs.

    Restores the parameters, ``module``'s buffers (running statistics and the like), Adam's state, every RNG
    state and the history, so the next epoch runs exactly as it would have without the interruption. A damaged
    checkpoint raises :class:`CheckpointError` naming it and the older checkpoint (``.prev``) to use instead.
    """
    try:
        obj = _read(path, "")
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume: {err}{_fallback_hint(path)}") from None
    saved = obj.get("params")
    if obj.get("kind") != "checkpoint" or not isinstance(saved, dict) or "optimizer" not in obj or "rng" not in obj:
        raise CheckpointError(f"cannot resume from {path}: it is a ppvae file but not a training checkpoint")
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
        state = obj.get("state_dict", {})
        for name, b in module.named_buffers() if module is not None else ():
            if name in state and state[name].shape == b.shape:
                b.copy_(state[name])
    try:
        optimizer.load_state_dict(obj["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"the optimizer state in {path} does not fit this model: {err}") from None
    _set_rng_state(obj["rng"])
    result.history[:] = obj["meta"]["history"]
    result.best_epoch = obj["meta"]["best_epoch"]
    result.best_score = obj["meta"]["best_score"]
    result.stopped_early = bool(obj["meta"].get("stopped_early", False))
    result.best_params = obj.get("best_params")
    return len(result.history)


def _fallback_hint(path: Path) -> str:
    """How to go on from the older checkpoint kept beside a damaged one (empty when there is none to trust)."""
    prev = previous(path)
    try:
        epochs = len(read(prev)["meta"].get("history", []))
    except CheckpointError:
        return ""
    return f"; to resume from the older checkpoint ({epochs} epochs), move it over the damaged one: mv {prev} {path}"
