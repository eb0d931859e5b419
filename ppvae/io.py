"""Save and load models, safely: the ppvae file format is :mod:`ppvae._archive` (a torch archive of plain data, read
with ``weights_only=True``, written atomically with the previous file kept as ``<name>.prev``); training checkpoints
are :mod:`ppvae.infer.checkpoint`. A module's file holds its ``state_dict`` (with the ``pyro.param`` values ppvae
keeps for it); a pair of functions' file holds its own Pyro parameter store (:mod:`ppvae._param_store`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppvae._archive import FORMAT, VERSION, config_json, read, write_file
from ppvae._constraints import decode_constraint, encode_constraint
from ppvae._fs import previous
from ppvae._param_store import ATTR, attach, keep_pair_state, kept, pair_state
from ppvae.errors import CheckpointError, ConfigError

__all__ = ["save", "load", "read", "previous", "FORMAT", "VERSION"]


def save(
    model: nn.Module | tuple[Callable, Callable],
    path: str | os.PathLike,
    *,
    meta: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write ``model`` (a ppvae.VAE, any ``nn.Module``, or a pair of functions) to ``path`` atomically.

    A VAE is saved with its JSON configuration and can be rebuilt by :func:`load` alone; any other module is saved
    as weights, loaded back into a module you build (``load(path, model=MyModel())``). A module's weights include
    the ``pyro.param`` values ppvae keeps for it (``model.ppvae_pyro_params``, see :mod:`ppvae._param_store`). A
    pair of functions, ``save((model_fn, guide_fn), path)``, is saved as its own Pyro parameter store (the
    ``pyro.param`` and ``pyro.module`` values ``fit`` trained or ``load`` read for it) and loaded back with
    ``load(path, model=(model_fn, guide_fn))``. ``meta`` is a JSON-serializable dict stored alongside (data
    preprocessing, history).
    """
    if isinstance(model, tuple):
        obj = _pair_file(model)
    elif isinstance(model, nn.Module):
        box = kept(model)
        if box is not None:
            box.check_writable()  # a constraint a file cannot name fails here, not when the file is read back
        obj = {
            "format": FORMAT,
            "version": VERSION,
            "kind": "vae" if config_json(model) else "module",
            "class": type(model).__name__,
            "config": config_json(model),
            "state_dict": model.state_dict(),
        }
    else:
        raise ConfigError(
            f"save needs an nn.Module (a ppvae.VAE or your own) or a pair of functions (model_fn, guide_fn), got "
            f"{type(model).__name__}"
        )
    obj["meta"] = json.dumps(meta or {})
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    path = Path(path)
    try:
        write_file(obj, path)
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}; free space or write elsewhere") from None
    return path


def _pair_file(pair: tuple) -> dict[str, Any]:
    """The file contents of a pair of functions: its own parameter store, constraints by name."""
    model_fn, guide_fn = _check_pair(pair, "save")
    state = pair_state(model_fn, guide_fn)
    if state is None:
        raise ConfigError(
            f"ppvae keeps no parameters for the pair ({_name(model_fn)}, {_name(guide_fn)}), so there is nothing "
            "to save; train it with ppvae.fit first (or give it values with ppvae.infer.keep_params)"
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": "pair",
        "class": f"{_name(model_fn)}/{_name(guide_fn)}",
        "config": None,
        "params": {name: t.detach().cpu().clone() for name, t in state["params"].items()},
        "constraints": {
            name: encode_constraint(c, what=f"pyro.param {name!r}") for name, c in state["constraints"].items()
        },
    }


def load(
    path: str | os.PathLike,
    model: nn.Module | tuple[Callable, Callable] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> Any:
    """Load a saved model: a ppvae.VAE is rebuilt from its config; other modules need ``model=`` to load into.

    ``path`` may also be a training checkpoint of ``fit`` (``last.pt``, ``best.pt``, ``nonfinite.pt``). A pair of
    functions saved with ``save((model_fn, guide_fn), path)`` is loaded with ``load(path, model=(model_fn,
    guide_fn))``, which makes the saved values the pair's own store and returns the pair; networks the pair
    registers with ``pyro.module`` get their saved weights the first time ppvae runs it (fit, evaluate, diagnose),
    before which they hold their own. Files are read by :func:`read`, which never unpickles arbitrary objects.
    """
    obj = read(path)
    kind = obj.get("kind")
    if kind == "checkpoint" and "state_dict" not in obj:
        raise CheckpointError(
            f"{path} is a checkpoint of a pair of functions (Pyro parameters, no module); resume it with "
            "ppvae.fit(model, data, guide=..., checkpoint_dir=..., resume=True)"
        )
    if kind == "pair" or isinstance(model, tuple):
        return _load_pair(path, obj, model, device)
    if model is None:
        if not obj.get("config") or kind not in ("vae", "checkpoint"):
            raise CheckpointError(
                f"{path} holds the weights of a custom {obj.get('class')}; build one and pass it: "
                f"ppvae.load({str(path)!r}, model=...)"
            )
        from ppvae.vae import VAE  # deferred: io is imported by the training loop, VAE by users

        model = VAE(**obj["config"])
    state_dict = obj["state_dict"]
    if any(key.startswith(ATTR + ".") for key in state_dict):
        attach(model)  # a fresh module has no kept pyro.param values yet: their holder loads them
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"the weights in {path} do not fit this model: {str(err).splitlines()[0][:200]}"
        ) from None
    return model.to(device)


def _load_pair(path: str | os.PathLike, obj: dict, model: Any, device: str | torch.device) -> tuple:
    if obj.get("kind") != "pair":
        raise CheckpointError(
            f"{path} holds a {obj.get('kind')} ({obj.get('class')}), not a pair of functions; load it with "
            "model= a module (or none for a ppvae.VAE)"
        )
    if model is None:
        raise CheckpointError(
            f"{path} holds the Pyro parameters of a pair of functions ({obj.get('class')}); pass the pair: "
            f"ppvae.load({str(path)!r}, model=(model_fn, guide_fn))"
        )
    model_fn, guide_fn = _check_pair(model, "load")
    params, specs = obj.get("params"), obj.get("constraints")
    if not isinstance(params, dict) or not isinstance(specs, dict) or set(params) != set(specs):
        raise CheckpointError(f"{path} is damaged: its Pyro parameters and their constraints do not match")
    state = {
        "params": {name: t.to(device).requires_grad_(True) for name, t in params.items()},
        "constraints": {name: decode_constraint(spec, what=f"pyro.param {name!r}") for name, spec in specs.items()},
    }
    if not keep_pair_state(model_fn, guide_fn, state, pending=True):
        raise ConfigError(f"ppvae cannot keep parameters for {model_fn!r}: it cannot be weakly referenced")
    return model_fn, guide_fn


def _check_pair(pair: tuple, what: str) -> tuple[Callable, Callable]:
    if len(pair) != 2 or not all(callable(fn) for fn in pair):
        raise ConfigError(
            f"{what} takes a pair of functions as a tuple (model_fn, guide_fn), got a tuple of {len(pair)}: "
            f"{', '.join(type(fn).__name__ for fn in pair)}"
        )
    return pair[0], pair[1]


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


# --- training checkpoints ---------------------------------------------------------------------------------


