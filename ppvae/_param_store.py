"""Each model's own Pyro parameter store: where its ``pyro.param`` values live and how ppvae runs it in them.

Pyro keeps ``pyro.param`` values in one global :class:`~pyro.params.param_store.ParamStoreDict`, keyed by name:
two models with a site of the same name share one value, and a model run after another reads the other's. ppvae
runs every model it trains or scores inside Pyro's own ``ParamStoreDict.scope(state)``, with that model's state:

- a **module** (a ``ppvae.VAE``, a user's ``nn.Module``/``PyroModule`` with ``model``/``guide``) keeps its values as
  parameters of a child :class:`PyroParams` (attribute ``ppvae_pyro_params``), so ``state_dict``/``load_state_dict``,
  ``ppvae.save``/``load``, ``.to(device)``, optimizers and training checkpoints carry them like any weight;
- a **pair of functions** has no object to hold them: ppvae keeps its state in a registry keyed by the two callables
  (weakly: it goes when they go), written by ``fit`` and ``load``;
- a model ppvae neither trained nor loaded runs with the ``pyro.param`` values of the global store, as it would
  under Pyro, except values that belong to a model ppvae keeps and the network weights of modules (``nn.Parameter``
  entries from ``pyro.module`` or ``PyroModule``: another module's weights are never swapped into this one).

Training (:func:`model_store` with ``training=True``) starts a model without kept values from an empty store, and
afterwards also leaves the trained values in the global store, as Pyro's SVI would (so plain Pyro code such as
``pyro.param("sigma")`` or ``Predictive`` sees them); ppvae itself never reads them back from there.

Ground floor: :mod:`ppvae.io` saves and loads these states, :mod:`ppvae.infer` trains in them and the diagnostics
score in them.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from torch import Tensor, nn
from torch.distributions.constraints import Constraint

from ppvae._constraints import decode_constraint, encode_constraint
from ppvae._rng import fork_rngs
from ppvae.errors import CheckpointError, ConfigError

__all__ = [
    "ATTR",
    "PyroParams",
    "StateDict",
    "empty_state",
    "kept",
    "attach",
    "adopt",
    "pair_state",
    "keep_pair_state",
    "model_store",
]

# A ParamStoreDict state: {"params": {name: unconstrained tensor}, "constraints": {name: constraint}}.
StateDict = dict[str, dict[str, Any]]

ATTR = "ppvae_pyro_params"


def empty_state() -> StateDict:
    return {"params": {}, "constraints": {}}


class PyroParams(nn.Module):
    """The ``pyro.param`` values of one module, as its parameters: unconstrained tensors, one per site.

    ``pyro.param`` names may hold characters a parameter name cannot (``.``), so each is stored under a sanitized
    key; the names and the constraints are the module's extra state (plain data, written by name: see
    :mod:`ppvae._constraints`), so ``state_dict()`` holds everything and a fresh ``PyroParams`` can load it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._names: dict[str, str] = {}  # key → pyro.param name
        self._constraints: dict[str, Constraint] = {}  # pyro.param name → constraint

    def state(self) -> StateDict:
        """A ParamStoreDict state holding this module's own tensors (new dicts, the same tensors)."""
        return {
            "params": {self._names[key]: p for key, p in self._parameters.items()},
            "constraints": dict(self._constraints),
        }

    def keep(self, name: str, unconstrained: Tensor, constraint: Constraint) -> nn.Parameter:
        """Keep ``name`` (its unconstrained value and constraint); a kept one is overwritten in place."""
        key = next((k for k, n in self._names.items() if n == name), None)
        if key is not None:
            p = self._parameters[key]
            if p.shape != unconstrained.shape:
                raise ConfigError(
                    f"pyro.param {name!r} has shape {tuple(p.shape)} here, got {tuple(unconstrained.shape)}"
                )
            with torch.no_grad():
                p.copy_(unconstrained)
        else:
            key = self._free_key(name)
            p = nn.Parameter(unconstrained.detach(), requires_grad=True)  # shares the tensor's storage
            self.register_parameter(key, p)
            self._names[key] = name
        self._constraints[name] = constraint
        return p  # type: ignore[return-value]

    def _free_key(self, name: str) -> str:
        base = re.sub(r"\W", "_", name) or "_"
        key, i = base, 1
        while key in self._parameters or key in self._names:
            key, i = f"{base}_{i}", i + 1
        return key

    def get_extra_state(self) -> dict[str, Any]:
        # Unknown constraints are written as their repr (a state_dict() must not fail); ppvae.save checks first.
        return {
            "names": dict(self._names),
            "constraints": {name: _encode_or_repr(c, name) for name, c in self._constraints.items()},
        }

    def set_extra_state(self, state: Any) -> None:
        names, specs = state.get("names", {}), state.get("constraints", {})
        if set(names) != set(self._parameters) or set(names.values()) != set(specs):
            raise CheckpointError(
                "the kept pyro.param values in this file do not match their names and constraints; the file is damaged"
            )
        self._names = dict(names)
        self._constraints = {n: decode_constraint(s, what=f"pyro.param {n!r}") for n, s in specs.items()}

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # A fresh PyroParams has no parameters yet: make one for each value in the file, then load as usual.
        for full, value in state_dict.items():
            key = full[len(prefix) :]
            if full.startswith(prefix) and "." not in key and key != "_extra_state" and key not in self._parameters:
                if torch.is_tensor(value):
                    self.register_parameter(key, nn.Parameter(torch.empty_like(value)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(self._constraints)

    def check_writable(self) -> None:
        """Raise :class:`ConfigError` for a constraint a ppvae file cannot hold (before a file is written)."""
        for name, c in self._constraints.items():
            encode_constraint(c, what=f"pyro.param {name!r}")


def _encode_or_repr(constraint: Constraint, name: str) -> dict[str, Any]:
    try:
        return encode_constraint(constraint, what=f"pyro.param {name!r}")
    except ConfigError:
        return {"name": None, "repr": repr(constraint)}


def kept(owner: nn.Module) -> PyroParams | None:
    """The module's kept ``pyro.param`` values, or None when it keeps none."""
    box = getattr(owner, ATTR, None)
    return box if isinstance(box, PyroParams) else None


def attach(owner: nn.Module) -> PyroParams:
    """The module's :class:`PyroParams`, added as the child ``ppvae_pyro_params`` if it has none."""
    box = kept(owner)
    if box is None:
        box = PyroParams()
        owner.add_module(ATTR, box)
    return box


def adopt(owner: nn.Module) -> list[str]:
    """Keep on ``owner`` every ``pyro.param`` the current store holds that is not yet the module's own.

    Called inside the module's scope after a run that may have created sites: each new value becomes a parameter
    of ``owner.ppvae_pyro_params`` and the store's entry is replaced by that very tensor, so what the optimizer
    steps is what ``pyro.param`` returns. Weights registered by ``pyro.module``/``PyroModule`` (``nn.Parameter``
    entries) belong to their modules and are left alone. Returns the names adopted.
    """
    store = pyro.get_param_store()
    state = store.get_state()
    box = kept(owner)
    have = set(box._constraints) if box is not None else set()
    new = [n for n, t in state["params"].items() if not isinstance(t, nn.Parameter) and n not in have]
    for name in new:
        box = box if box is not None else attach(owner)
        constraint = state["constraints"][name]
        p = box.keep(name, state["params"][name], constraint)
        del store[name]
        store.set_state({"params": {name: p}, "constraints": {name: constraint}})
        _own(p)
    return new


# --- pairs of functions ----------------------------------------------------------------------------------------


class _PairEntry:
    __slots__ = ("refs", "state", "pending")

    def __init__(self, refs: list[weakref.ref], state: StateDict, pending: bool) -> None:
        self.refs, self.state, self.pending = refs, state, pending


_PAIRS: dict[tuple[int, ...], _PairEntry] = {}

# Tensors that belong to a model ppvae keeps (by id; the values are weak): never lent to a model it does not know.
_OWNED: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def _anchors(model_fn: Callable, guide_fn: Callable) -> list[Any]:
    """The objects a pair's identity rests on: each function, or a bound method's instance and function (a bound
    method is a new object at every attribute access)."""
    out: list[Any] = []
    for fn in (model_fn, guide_fn):
        self, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
        out += [self, func] if self is not None and func is not None else [fn]
    return out


def _entry(model_fn: Callable, guide_fn: Callable) -> _PairEntry | None:
    anchors = _anchors(model_fn, guide_fn)
    entry = _PAIRS.get(tuple(map(id, anchors)))
    if entry is None or any(r() is not a for r, a in zip(entry.refs, anchors, strict=True)):
        return None  # none, or a dead pair whose ids were reused
    return entry


def pair_state(model_fn: Callable, guide_fn: Callable) -> StateDict | None:
    """The state ppvae keeps for a pair of functions (trained by ``fit`` or loaded), or None."""
    entry = _entry(model_fn, guide_fn)
    return None if entry is None else entry.state


def keep_pair_state(model_fn: Callable, guide_fn: Callable, state: StateDict, *, pending: bool = False) -> bool:
    """Make ``state`` the pair's own store; False if a callable cannot be weakly referenced (nothing kept).

    ``pending``: the values were read from a file, and the tensors of networks the pair registers with
    ``pyro.module`` get them on the pair's first run (see :func:`model_store`).
    """
    anchors = _anchors(model_fn, guide_fn)
    key = tuple(map(id, anchors))
    entry = _entry(model_fn, guide_fn)
    if entry is None:
        try:
            refs = [weakref.ref(a) for a in anchors]
        except TypeError:  # e.g. a builtin: ppvae cannot tell when it goes
            return False
        entry = _PairEntry(refs, state, pending)
        _PAIRS[key] = entry
        for a in dict.fromkeys(anchors):
            weakref.finalize(a, _forget, key, entry)
    entry.state, entry.pending = state, pending
    for t in state["params"].values():
        _own(t)
    return True


def _forget(key: tuple[int, ...], entry: _PairEntry) -> None:
    if _PAIRS.get(key) is entry:
        del _PAIRS[key]


def _own(t: Tensor) -> None:
    _OWNED[id(t)] = t


def _is_owned(t: Tensor) -> bool:
    return _OWNED.get(id(t)) is t


# --- running a model in its store ------------------------------------------------------------------------------


@contextmanager
def model_store(
    model_fn: Callable,
    guide_fn: Callable,
    owner: nn.Module | None,
    *,
    exercise: Callable[[], Any] | None = None,
    training: bool = False,
) -> Iterator[StateDict]:
    """Run the block in the model's own parameter store (Pyro's ``ParamStoreDict.scope``); yields the state.

    Args:
        model_fn, guide_fn, owner: the pair (``owner`` the module holding them, or None for functions).
        exercise: runs guide and model once on real inputs (``lambda: (guide(x), model(x))``): a pair whose
            values were loaded from a file is run so once, parameter sites only and on copies of the RNGs, to
            copy the saved weights into the networks it registers with ``pyro.module`` (which, like Pyro with
            ``update_module_params=False``, would otherwise keep their own).
        training: start a model without kept values from an empty store (not the global one), keep what the
            block trained as the model's own, and leave it in the global store too, as Pyro's SVI would.

    The global store is as it was inside the block's caller afterwards (apart from what ``training`` leaves).
    """
    store = pyro.get_param_store()
    entry = _entry(model_fn, guide_fn) if owner is None else None
    # A module's methods passed as a pair of functions (model=m.model, guide=m.guide) run in the module's values.
    bound = getattr(model_fn, "__self__", None) if owner is None and entry is None else owner
    box = kept(bound) if isinstance(bound, nn.Module) else None
    if box is not None:
        state = box.state()
    elif entry is not None:
        state = entry.state
    else:
        state = empty_state() if training else _unowned(store.get_state())
    with store.scope(state):
        if entry is not None and entry.pending and exercise is not None:
            _bind_networks(exercise)
            entry.pending = False
        yield state
    if not training:
        return
    if owner is not None:
        box = kept(owner)  # adopted during training, when the model has pyro.param sites
        if box is None:
            return
        state = box.state()
    else:
        keep_pair_state(model_fn, guide_fn, state)
    store.set_state(state)


def _unowned(global_state: StateDict) -> StateDict:
    """The global store's ``pyro.param`` values that no model ppvae keeps owns, without modules' weights."""
    names = [n for n, t in global_state["params"].items() if not isinstance(t, nn.Parameter) and not _is_owned(t)]
    return {
        "params": {n: global_state["params"][n] for n in names},
        "constraints": {n: global_state["constraints"][n] for n in names},
    }


def _bind_networks(exercise: Callable[[], Any]) -> None:
    """Copy loaded values into the networks a pair registers with ``pyro.module``, and make the store hold them.

    ``pyro.module(name, net)`` calls ``pyro.param(name$$$weight, net.weight)``: when the store already holds a
    value under that name (loaded from a file), the site records the network's own tensor as its initial value
    and the store's as its value. That is where the network gets the saved numbers.
    """
    store = pyro.get_param_store()
    with fork_rngs(), poutine.block(), torch.no_grad():
        trace = poutine.trace(exercise, param_only=True).get_trace()
    for name, site in trace.nodes.items():
        args = site.get("args", ())
        live = args[1] if site["type"] == "param" and len(args) > 1 else None
        if not isinstance(live, nn.Parameter) or name not in store:
            continue
        saved = store.get_state()["params"][name]
        if saved is live:
            continue
        if saved.shape != live.shape:
            raise CheckpointError(
                f"the saved value of {name!r} has shape {tuple(saved.shape)}, the network's parameter "
                f"{tuple(live.shape)}: the pair is not the one that was saved"
            )
        with torch.no_grad():
            live.copy_(saved.to(live.device))
        del store[name]
        store.set_state({"params": {name: live}, "constraints": {name: constraints.real}})
