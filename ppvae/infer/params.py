"""Find the parameters a model/guide pair trains, refuse pairs whose weights would never be optimized, and give
access to the ``pyro.param`` values ppvae keeps for each model.

Pyro trains only what reaches its parameter store. A pair of *functions* that calls an ``nn.Module`` without
``pyro.module(...)`` trains nothing of that module, silently; ``fit`` refuses it and names the module.
Modules (a ``ppvae.VAE``, a user's ``nn.Module``/``PyroModule`` with ``model``/``guide`` methods) are trained
through their own ``parameters()``, so their children are always included; a ``pyro.param`` site in a module's
``model``/``guide`` becomes a parameter of the module (``ppvae_pyro_params``), kept and saved with it.
Where each model's values live and how ppvae runs it in them: :mod:`ppvae._param_store`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
from pyro import poutine
from torch import Tensor, nn

from ppvae._param_store import StateDict, adopt, attach, keep_pair_state, kept, pair_state
from ppvae.errors import ConfigError, TrainingError
from ppvae.infer.pair import as_pair

__all__ = ["collect_params", "param_state", "keep_params"]

def collect_params(model: Callable, guide: Callable, owner: nn.Module | None, args: tuple) -> list[tuple[str, Tensor]]:
    """``(name, leaf tensor)`` for every trainable parameter, in a stable order, each once.

    Runs guide then model once on ``args`` (in a blocked trace) so ``pyro.param``/``pyro.module`` sites are
    created in the current parameter store (the model's own, :func:`ppvae._param_store.model_store`); the
    unconstrained tensors are what the optimizer must update. A module's new ``pyro.param`` sites are adopted as
    its parameters first (:func:`ppvae._param_store.adopt`), so they come under the module's names
    (``ppvae_pyro_params.<site>``).
    """
    with poutine.block():
        names = set()
        for fn in (guide, model):
            trace = poutine.trace(fn, param_only=True).get_trace(*args)
            names.update(n for n, s in trace.nodes.items() if s["type"] == "param")
    found: dict[int, tuple[str, Tensor]] = {}
    if owner is not None:
        adopt(owner)
        for name, p in owner.named_parameters():
            if p.requires_grad:
                found[id(p)] = (name, p)
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


def param_state(model: Any, guide: Callable | None = None) -> StateDict | None:
    """The Pyro parameter-store state ppvae runs ``model`` in, or None when it keeps none for it.

    A module's kept ``pyro.param`` values, or a pair of functions' own store (trained by ``fit`` or loaded): a
    ``{"params": {name: unconstrained tensor}, "constraints": {...}}`` dict holding the model's own tensors. Run
    the model with them under plain Pyro with ``with pyro.get_param_store().scope(param_state(model)): ...``.
    None: ppvae runs the model with the global store's ``pyro.param`` values, as Pyro would.
    """
    pair = as_pair(model, guide, what="param_state")
    if pair.owner is not None:
        box = kept(pair.owner)
        return None if box is None else box.state()
    return pair_state(pair.model, pair.guide)


def keep_params(model: Any, state: StateDict, guide: Callable | None = None) -> None:
    """Make the ``pyro.param`` values of ``state`` (a ``ParamStoreDict`` state) the model's own.

    For values trained outside ``ppvae.fit``, e.g. by Pyro's SVI in a scope of their own::

        with pyro.get_param_store().scope() as state:
            ...  # svi.step(x) ...
        ppvae.infer.keep_params(model, state)   # ppvae.evaluate, diagnose and save now use them

    A module keeps copies of the values among its parameters (weights registered by ``pyro.module`` or
    ``PyroModule``, ``nn.Parameter`` entries, are left out: they are the networks' own); a pair of functions keeps
    ``state`` itself as its store.
    """
    if not (isinstance(state, dict) and isinstance(state.get("params"), dict) and "constraints" in state):
        raise ConfigError(
            "state must be a Pyro parameter-store state, {'params': {...}, 'constraints': {...}}, as "
            f"pyro.get_param_store().get_state() or .scope() give; got {type(state).__name__}"
        )
    pair = as_pair(model, guide, what="keep_params")
    if pair.owner is None:
        if not keep_pair_state(pair.model, pair.guide, state):
            raise ConfigError(
                f"ppvae cannot keep parameters for {pair.model!r}: it cannot be weakly referenced; wrap the pair "
                "in an nn.Module with model and guide methods"
            )
        return
    for name, t in state["params"].items():
        if not isinstance(t, nn.Parameter):
            attach(pair.owner).keep(name, t.detach().clone(), state["constraints"][name])
