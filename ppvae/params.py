"""Find the parameters a model/guide pair trains, and refuse pairs whose weights would never be optimized.

Pyro trains only what reaches its parameter store. A pair of *functions* that calls an ``nn.Module`` without
``pyro.module(...)`` trains nothing of that module, silently; ``fit`` refuses it and names the module.
Modules (a ``ppvae.VAE``, a user's ``nn.Module``/``PyroModule`` with ``model``/``guide`` methods) are trained
through their own ``parameters()``, so their children are always included.

:func:`fork_rngs` keeps the other global state a library call could leave behind, the RNGs, to one block.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from torch import Tensor, nn

from .errors import TrainingError

__all__ = ["collect_params", "fork_rngs", "module_params_are_local", "local_module_params"]

_LOCAL = threading.local()


def module_params_are_local() -> bool:
    """True while a trainer optimizes modules' own ``parameters()`` directly (inside ``fit``).

    A module's ``model``/``guide`` may then skip ``pyro.module(...)``: registering its tensors in the global
    parameter store on every step would cost time and serve no one.
    """
    return getattr(_LOCAL, "active", False)


@contextmanager
def local_module_params() -> Iterator[None]:
    """Mark the block as training modules through their own parameters (see :func:`module_params_are_local`)."""
    previous = module_params_are_local()
    _LOCAL.active = True
    try:
        yield
    finally:
        _LOCAL.active = previous


@contextmanager
def fork_rngs(seed: int | None = None) -> Iterator[None]:
    """Run the block on copies of the global RNGs: torch's (CPU and every initialized CUDA device), NumPy's and
    Python's are restored afterwards, so a library call with ``seed=`` leaves a user's seeded state as it found it.

    With ``seed``, the block starts from :func:`pyro.set_rng_seed` (seed) and draws exactly what it drew when the
    library reseeded the global RNGs: the same numbers, without the side effect. A CUDA device first used inside
    the block keeps the state it got there (there was none of the caller's to restore).
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                pyro.set_rng_seed(seed)
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def collect_params(model: Callable, guide: Callable, owner: nn.Module | None, args: tuple) -> list[tuple[str, Tensor]]:
    """``(name, leaf tensor)`` for every trainable parameter, in a stable order, each once.

    Runs guide then model once on ``args`` (in a blocked trace) so ``pyro.param``/``pyro.module`` sites are
    created in the current parameter store; the unconstrained tensors are what the optimizer must update.
    """
    found: dict[int, tuple[str, Tensor]] = {}
    if owner is not None:
        for name, p in owner.named_parameters():
            if p.requires_grad:
                found[id(p)] = (name, p)
    with poutine.block():
        names = set()
        for fn in (guide, model):
            trace = poutine.trace(fn, param_only=True).get_trace(*args)
            names.update(n for n, s in trace.nodes.items() if s["type"] == "param")
    for name, p in pyro.get_param_store().named_parameters():
        if name in names and p.requires_grad:
            found.setdefault(id(p), (name, p))
    for fn in (model, guide):
        _refuse_unregistered_modules(fn, found, owner)
    if not found:
        raise TrainingError(
            "model and guide have no trainable parameters, so there is nothing to fit; register networks with "
            "pyro.module('name', net) or give the pair as an nn.Module with model and guide methods"
        )
    return list(found.values())


def _refuse_unregistered_modules(fn: Callable, found: dict[int, tuple[str, Tensor]], owner: nn.Module | None) -> None:
    """Refuse an ``nn.Module`` the function refers to whose parameters Pyro never sees."""
    if owner is not None and getattr(fn, "__self__", None) is owner:
        return  # a method of the module being trained: its parameters() are all optimized
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    refs: dict[str, Any] = {}
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        try:
            refs[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    glob = getattr(fn, "__globals__", {})
    refs.update({n: glob[n] for n in code.co_names if n in glob})
    for name, obj in refs.items():
        if isinstance(obj, nn.Module):
            missing = [n for n, p in obj.named_parameters() if p.requires_grad and id(p) not in found]
            if missing:
                raise TrainingError(
                    f"{fn.__name__} uses the network {name!r} ({type(obj).__name__}) but {len(missing)} of its "
                    f"parameter tensors are not registered with Pyro, so they would never be optimized; call "
                    f"pyro.module({name!r}, {name}) inside {fn.__name__}"
                )
