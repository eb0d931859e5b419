"""Pyro/torch constraints as plain data, so a ppvae file keeps a ``pyro.param``'s constraint without a pickle.

Pyro's parameter store holds a constrained parameter as an *unconstrained* tensor plus the constraint that maps it
back (``transform_to(constraint)``). A file holding the tensor without its constraint would be read back as the
wrong number (log σ taken for σ), so the constraint is stored too. Pyro's own ``ParamStoreDict.save`` pickles the
constraint objects; ppvae files are read with ``torch.load(weights_only=True)``, which refuses arbitrary objects,
so constraints are written by name instead:

    positive                              → {"name": "positive"}
    interval(0., 2.)                      → {"name": "interval", "lower_bound": 0.0, "upper_bound": 2.0}
    independent(positive, 1)              → {"name": "independent", "base_constraint": {...},
                                             "reinterpreted_batch_ndims": 1}

Every named constraint object of :mod:`pyro.distributions.constraints` (``real``, ``positive``, ``simplex``,
``lower_cholesky``, ...) and its parameterized families (``greater_than``, ``greater_than_eq``, ``less_than``,
``interval``, ``half_open_interval``, ``integer_interval``, ``independent``) can be written; another constraint
(a user's own class) cannot, and :func:`encode_constraint` says so.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions import constraints
from torch.distributions.constraints import Constraint

from ppvae.errors import CheckpointError, ConfigError

__all__ = ["encode_constraint", "decode_constraint"]

# The singletons Pyro and torch name (``dependent`` is a placeholder, never a parameter's constraint).
_NAMED: dict[str, Constraint] = {
    name: getattr(constraints, name)
    for name in constraints.__all__
    if isinstance(getattr(constraints, name), Constraint) and name != "dependent"
}

# Parameterized families: factory name → the attributes that are its arguments, in order.
_FAMILIES: dict[str, tuple[str, ...]] = {
    "greater_than": ("lower_bound",),
    "greater_than_eq": ("lower_bound",),
    "less_than": ("upper_bound",),
    "interval": ("lower_bound", "upper_bound"),
    "half_open_interval": ("lower_bound", "upper_bound"),
    "integer_interval": ("lower_bound", "upper_bound"),
    "independent": ("base_constraint", "reinterpreted_batch_ndims"),
}


def encode_constraint(constraint: Constraint, *, what: str = "a pyro.param") -> dict[str, Any]:
    """``constraint`` as a dict of strings, numbers and tensors; :class:`ConfigError` for one ppvae cannot name.

    ``what`` names the parameter in the error (``"pyro.param 'scale'"``).
    """
    for name, known in _NAMED.items():
        if constraint is known:
            return {"name": name}
    for name, fields in _FAMILIES.items():
        if type(constraint) is getattr(constraints, name):
            out: dict[str, Any] = {"name": name}
            for f in fields:
                value = getattr(constraint, f)
                out[f] = encode_constraint(value, what=what) if isinstance(value, Constraint) else _plain(value)
            return out
    for name, known in _NAMED.items():  # a fresh instance equal to a named one, e.g. type(positive)(0.0)
        if type(constraint) is type(known) and _same_fields(constraint, known):
            return {"name": name}
    raise ConfigError(
        f"{what} has the constraint {constraint!r} ({type(constraint).__name__}), which ppvae cannot write to a "
        f"file (files hold no pickled objects); use one of pyro.distributions.constraints' named constraints "
        f"({', '.join(sorted(_NAMED)[:6])}, ...) or families ({', '.join(_FAMILIES)})"
    )


def decode_constraint(spec: Any, *, what: str = "a pyro.param") -> Constraint:
    """The constraint :func:`encode_constraint` wrote; :class:`CheckpointError` for a spec it did not write."""
    name = spec.get("name") if isinstance(spec, dict) else None
    if name in _NAMED:
        return _NAMED[name]
    if name in _FAMILIES:
        try:
            args = [
                decode_constraint(spec[f], what=what) if isinstance(spec[f], dict) else spec[f] for f in _FAMILIES[name]
            ]
            return getattr(constraints, name)(*args)
        except (KeyError, TypeError, ValueError):
            pass
    raise CheckpointError(
        f"the constraint of {what} in this file ({spec!r}) is not one ppvae wrote; the file is damaged or from "
        "a newer ppvae"
    )


def _plain(value: Any) -> Any:
    """A bound as a float/int, or a detached CPU tensor (bounds may be tensors)."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, (bool, int, float)):
        return value
    raise ConfigError(f"a constraint bound must be a number or a tensor, got {type(value).__name__}")


def _same_fields(a: Constraint, b: Constraint) -> bool:
    fa, fb = vars(a), vars(b)
    if fa.keys() != fb.keys():
        return False
    for key in fa:
        x, y = fa[key], fb[key]
        if torch.is_tensor(x) or torch.is_tensor(y):
            if not (torch.is_tensor(x) and torch.is_tensor(y) and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True
