"""Seeded work that leaves the caller's global random state as it found it."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyro
import torch

__all__ = ["fork_rngs"]


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
