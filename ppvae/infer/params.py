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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pyro
from pyro import poutine
from torch import Tensor, nn

from ppvae._param_store import StateDict, adopt, attach, keep_pair_state, kept, pair_state
from ppvae.blocks.torch_dist import RefuseTorchDistributions
from ppvae.errors import ConfigError, PPVAEError, TrainingError, without_trace_shapes
from ppvae.infer.pair import as_pair

__all__ = [
    "collect_params",
    "param_state",
    "keep_params",
    "unreached_error",
    "referenced_modules",
    "frozen_by",
    "freezing",
]


def collect_params(
    model: Callable,
    guide: Callable,
    owner: nn.Module | None,
    args: tuple,
    frozen: set[int] = frozenset(),  # type: ignore[assignment]
) -> list[tuple[str, Tensor]]:
    """``(name, leaf tensor)`` for every trainable parameter, in a stable order, each once.

    Runs guide then model once on ``args`` (in a blocked trace) so ``pyro.param``/``pyro.module`` sites are
    created in the current parameter store (the model's own, :func:`ppvae._param_store.model_store`); the
    unconstrained tensors are what the optimizer must update. A module's new ``pyro.param`` sites are adopted as
    its parameters first (:func:`ppvae._param_store.adopt`), so they come under the module's names
    (``ppvae_pyro_params.<site>``).

    ``frozen``: ids of tensors that stay fixed (:func:`frozen_by`). Pyro's parameter store sets
    ``requires_grad=True`` on a tensor ``pyro.module`` registers, so a network frozen with
    ``requires_grad_(False)`` would be trained through a pair of functions; these tensors are frozen again and
    left out.
    """
    # A plain torch distribution at a site fails inside Pyro on the first draw: said here, by site, with the fix.
    with poutine.block(), RefuseTorchDistributions():
        names = set()
        for fn in (guide, model):
            try:
                trace = poutine.trace(fn, param_only=True).get_trace(*args)
            except PPVAEError as err:
                raise without_trace_shapes(err) from None
            names.update(n for n, s in trace.nodes.items() if s["type"] == "param")
    found: dict[int, tuple[str, Tensor]] = {}
    if owner is not None:
        adopt(owner)
        for name, p in owner.named_parameters():
            if p.requires_grad:
                found[id(p)] = (name, p)
    for name, p in pyro.get_param_store().named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
        elif name in names and p.requires_grad:
            found.setdefault(id(p), (name, p))
    for fn in (model, guide):
        _refuse_unregistered_modules(fn, found, owner, frozen)
    if not found:
        raise TrainingError(
            "model and guide have no trainable parameters, so there is nothing to fit; register networks with "
            "pyro.module('name', net) or give the pair as an nn.Module with model and guide methods"
        )
    return list(found.values())


def _refuse_unregistered_modules(
    fn: Callable, found: dict[int, tuple[str, Tensor]], owner: nn.Module | None, frozen: set[int]
) -> None:
    """Refuse an ``nn.Module`` the function refers to whose parameters Pyro never sees."""
    if owner is not None and getattr(fn, "__self__", None) is owner:
        return  # a method of the module being trained: its parameters() are all optimized
    for name, obj in referenced_modules(fn).items():
        skip = found.keys() | frozen
        missing = [n for n, p in obj.named_parameters() if p.requires_grad and id(p) not in skip]
        if missing:
            raise TrainingError(
                f"{fn.__name__} uses the network {name!r} ({type(obj).__name__}) but {len(missing)} of its "
                f"parameter tensors are not registered with Pyro, so they would never be optimized; call "
                f"pyro.module({name!r}, {name}) inside {fn.__name__}"
            )


def referenced_modules(fn: Callable) -> dict[str, nn.Module]:
    """The ``nn.Module`` objects a function refers to by name (closure cells and globals it reads)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return {}
    refs: dict[str, Any] = {}
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        try:
            refs[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    glob = getattr(fn, "__globals__", {})
    refs.update({n: glob[n] for n in code.co_names if n in glob})
    return {n: obj for n, obj in refs.items() if isinstance(obj, nn.Module)}


def frozen_by(model: Callable, guide: Callable, owner: nn.Module | None) -> set[int]:
    """Ids of the parameter tensors of the pair's networks that are frozen now (``requires_grad`` False).

    Read before the pair first runs: Pyro's ``pyro.module`` flips them to trainable when it registers them.
    """
    modules = [owner] if owner is not None else []
    for fn in (model, guide):
        modules.extend(referenced_modules(fn).values())
    return {id(p) for m in modules for p in m.parameters() if not p.requires_grad}


@contextmanager
def freezing(
    freeze: Sequence[str | nn.Module | Tensor], model: Callable, guide: Callable, owner: nn.Module | None
) -> Iterator[list[Tensor]]:
    """Freeze ``freeze`` (fit's argument) for the block: ``requires_grad`` False, set back afterwards.

    Each entry: a name of the owner's sub-module or parameter (for a pair of functions, of a network the
    functions refer to), or an ``nn.Module`` or tensor. Yields the tensors this froze (those frozen before stay
    as they are).
    """
    if isinstance(freeze, (str, nn.Module, Tensor)):
        freeze = [freeze]
    tensors: list[Tensor] = []
    for entry in freeze:
        tensors.extend(_frozen_tensors(entry, model, guide, owner))
    changed = [t for t in dict.fromkeys(tensors) if t.requires_grad]  # each once, in order
    for t in changed:
        t.requires_grad_(False)
    try:
        yield changed
    finally:
        for t in changed:
            t.requires_grad_(True)


def _frozen_tensors(entry: Any, model: Callable, guide: Callable, owner: nn.Module | None) -> list[Tensor]:
    if isinstance(entry, nn.Module):
        return list(entry.parameters())
    if isinstance(entry, Tensor):
        return [entry]
    if not isinstance(entry, str):
        raise ConfigError(f"freeze takes module or parameter names, modules or tensors; got {type(entry).__name__}")
    if owner is not None:
        try:
            return list(owner.get_submodule(entry).parameters()) if entry else list(owner.parameters())
        except AttributeError:
            pass
        try:
            return [owner.get_parameter(entry)]
        except AttributeError:
            children = [n for n, _ in owner.named_children()]
            raise ConfigError(
                f"freeze names {entry!r}, which is no sub-module or parameter of {type(owner).__name__}; its "
                f"sub-modules are {children}"
            ) from None
    nets = {**referenced_modules(model), **referenced_modules(guide)}
    head, _, rest = entry.partition(".")
    if head not in nets:
        raise ConfigError(
            f"freeze names {entry!r}, but model and guide use no network of that name; they use {sorted(nets)}"
        )
    return _frozen_tensors(rest, model, guide, nets[head]) if rest else list(nets[head].parameters())


def unreached_error(
    unreached: list[tuple[str, Tensor]], owner: nn.Module | None, streams: list[str]
) -> TrainingError:
    """The error for parameters no batch of a whole epoch reached, naming them, with advice for the case.

    Whole sub-networks that were never called get the advice for a network used only for some batches (its own
    stream or an auxiliary loss) or kept fixed (frozen); single tensors of networks that are called get the advice
    for a tensor that does not reach the loss.
    """
    names = [n for n, _ in unreached]
    dead = set(names)
    whole: list[str] = []
    if owner is not None:  # the largest sub-modules all of whose trainable tensors are unreached
        for path, mod in owner.named_modules():
            if not path or any(path.startswith(w + ".") for w in whole):
                continue
            mine = [f"{path}.{n}" for n, p in mod.named_parameters() if p.requires_grad]
            if mine and all(n in dead for n in mine):
                whole.append(path)
    single = [n for n in names if not any(n.startswith(w + ".") for w in whole)]
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    source = "the ELBO" if len(streams) == 1 else f"any of the {len(streams)} streams ({', '.join(streams)})"
    advice = []
    if whole:
        froze = " or ".join(f"{w}.requires_grad_(False)" for w in whole[:3])
        advice.append(
            f"the network(s) {', '.join(whole)} are never called on these batches: if one is pretrained and should "
            f"stay fixed, freeze it ({froze}, or fit(..., freeze={whole[:3]!r})); if it is used only for some "
            "batches (a classifier of labelled data), give those batches as their own ppvae.Stream, or add a loss "
            "that uses it as a stream's aux=..."
        )
    if single or owner is None:
        advice.append(
            "the other tensors are read but do not reach the loss (an unused layer, a detach(), a branch no batch "
            "takes): use them in model or guide, remove them, or freeze them with requires_grad_(False)"
            if whole
            else "use them in model or guide (or in a stream's aux loss), remove them, or freeze them with "
            "requires_grad_(False) or fit(..., freeze=[...])"
        )
    return TrainingError(
        f"{len(names)} parameter(s) got no gradient from {source} over a whole epoch and would never be "
        f"optimized: {shown}; " + "; ".join(advice)
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
