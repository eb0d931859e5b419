"""Which parameters a trainer optimizes directly: a switch the trainer sets and models read.

Inside ``fit`` the optimizer updates each module's own ``parameters()``, so a module's ``model``/``guide`` may skip
``pyro.module(...)`` (registering every tensor in the global parameter store on every step costs time and serves no
one). The switch lives on the ground floor so that :mod:`ppvae.vae` can read it without importing the trainer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["module_params_are_local", "local_module_params"]

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

