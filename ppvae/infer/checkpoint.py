"""Training checkpoints: everything needed to resume ``fit`` exactly after a crash or ``SIGKILL``.

A checkpoint is a ppvae file (:mod:`ppvae.io`: a torch archive of plain data read with ``weights_only=True``) holding
the parameters (``pyro.param`` values included: a module's as its ``ppvae_pyro_params``, a pair of functions' by
their store names), the module's buffers, Adam's state, the RNG states of torch (and CUDA), NumPy and Python, and the
history. It is written atomically and the previous one is kept as ``<name>.prev``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ppvae._archive import FORMAT, VERSION, config_json, read, read_file, write_file
from ppvae._fs import copy_atomic, previous
from ppvae.errors import CheckpointError

__all__ = ["check_space", "save_training", "copy_training", "restore_training"]


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
        obj["config"] = config_json(model)
        obj["class"] = type(model).__name__
    try:
        write_file(obj, path)
    except OSError as err:
        kept = f"; {path} still holds the previous epoch's checkpoint" if path.exists() else ""
        raise CheckpointError(
            f"cannot write checkpoint {path}: {err.strerror or err}{kept}; free space (or fix permissions) and resume"
        ) from None


def copy_training(source: Path, path: Path) -> None:
    """Make ``path`` the checkpoint ``source`` is (``best.pt`` from the ``last.pt`` just written), atomically and
    without serializing it again (a hard link where the filesystem has them)."""
    try:
        copy_atomic(source, path, keep_previous=True)
    except OSError as err:
        kept = f"; {path} still holds the previous checkpoint" if path.exists() else ""
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
        obj = read_file(path, "")
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

