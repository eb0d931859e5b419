"""Score a pair as it is meant to be scored: networks in eval mode, no gradients, and no module state changed.

Dropout and batch statistics belong to training. Scored in train mode, a decoder with ``nn.Dropout`` or
``nn.BatchNorm1d`` gives log-weights of a different, random model (tens of nats per datapoint on a ProdLDA-style
topic model), and every forward pass of a BatchNorm layer moves its running statistics: the user's model changes
because it was measured. :func:`scoring_mode` switches every module the block calls to eval mode, runs the block
under ``torch.no_grad()``, and afterwards gives each module back its own ``training`` flag and its buffers as they
were, also when the block raises.

Which modules: those named up front (an owner module, or the modules a model/guide function refers to through its
closure, its globals or ``self``), and, as a net under them, every module whose ``forward`` is called inside the
block (a global forward pre-hook that acts in this thread only), so a network reached in any other way (an
attribute of an attribute, a helper in another file) is switched before its first call.
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["scoring_mode", "modules_of"]

# How far modules_of follows references (a method's instance, a closure's function, that function's globals...).
_DEPTH = 4


@contextmanager
def scoring_mode(*roots: Any, no_grad: bool = True) -> Iterator[None]:
    """Run the block in eval mode without gradients; every module's training flag and buffers restored afterwards.

    Args:
        roots: modules, model/guide callables or objects holding them; their modules are switched at once (see
            :func:`modules_of`), any other module when the block first calls it.
        no_grad: run under ``torch.no_grad()``; False for work that differentiates with respect to the latents
            (NUTS on a reference posterior), with the networks still in eval mode.
    """
    saved: dict[int, _Saved] = {}
    thread = threading.get_ident()

    def switch(module: nn.Module) -> None:
        for m in module.modules():
            if id(m) not in saved:
                saved[id(m)] = _Saved(m)
                m.training = False  # per module, not m.eval(): each keeps its own flag to restore

    def pre_hook(module: nn.Module, _inputs: Any) -> None:
        if id(module) not in saved and threading.get_ident() == thread:  # another thread's training is not ours
            switch(module)

    handle = None
    try:
        for root in roots:
            for module in modules_of(root):
                switch(module)
        handle = nn.modules.module.register_module_forward_pre_hook(pre_hook)
        with torch.no_grad() if no_grad else nullcontext():
            yield
    finally:
        if handle is not None:
            handle.remove()
        for s in saved.values():
            s.restore()


class _Saved:
    """A module's training flag and a copy of its own buffers, to put back after scoring."""

    __slots__ = ("module", "training", "buffers")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.training = module.training
        self.buffers: dict[str, tuple[Tensor, Tensor]] = {
            name: (b, b.detach().clone()) for name, b in module._buffers.items() if b is not None
        }

    def restore(self) -> None:
        m = self.module
        m.training = self.training
        with torch.no_grad():
            for name, (tensor, copy) in self.buffers.items():
                if m._buffers.get(name) is not tensor:  # a forward that rebinds its buffer (x = x + ...) instead
                    m._buffers[name] = tensor
                if tensor.shape != copy.shape or not torch.equal(tensor, copy):
                    tensor.copy_(copy)


def modules_of(obj: Any, depth: int = 0, seen: set[int] | None = None) -> list[nn.Module]:
    """The ``nn.Module`` objects ``obj`` is or refers to: itself, a bound method's instance, a ``functools.partial``'s
    parts, a function's closure cells and the globals its code names (recursively, a few levels), an object's
    attributes. Without duplicates; submodules are not listed (they come with their parents)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > _DEPTH:
        return []
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        return [obj]
    found: list[nn.Module] = []
    for ref in _references(obj):
        found += modules_of(ref, depth + 1, seen)
    return found


def _references(obj: Any) -> list[Any]:
    if isinstance(obj, types.MethodType):
        return [obj.__self__, obj.__func__]
    if isinstance(obj, functools.partial):
        return [obj.func, *obj.args, *obj.keywords.values()]
    if isinstance(obj, types.FunctionType):
        cells = []
        for cell in obj.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
        names = _code_names(obj.__code__)
        glob = obj.__globals__
        return cells + [glob[n] for n in sorted(names) if n in glob and _worth_following(glob[n])]
    if isinstance(obj, (types.ModuleType, type, types.BuiltinFunctionType)) or _is_plain_value(obj):
        return []
    attrs = getattr(obj, "__dict__", None)
    return [v for v in attrs.values() if _worth_following(v)] if isinstance(attrs, dict) else []


def _code_names(code: types.CodeType) -> set[str]:
    """Global names a function's code (and the lambdas and comprehensions inside it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _worth_following(value: Any) -> bool:
    """Modules, callables that may reach one, and plain objects; not modules of code, classes or values."""
    if isinstance(value, nn.Module):
        return True
    if isinstance(value, (types.ModuleType, type)) or _is_plain_value(value):
        return False
    return isinstance(value, (types.FunctionType, types.MethodType, functools.partial)) or hasattr(value, "__dict__")


def _is_plain_value(value: Any) -> bool:
    return isinstance(value, (str, bytes, int, float, complex, bool, Tensor, type(None)))
