"""Checks of user-supplied values shared by the library and the CLI's argparse types.

Ground floor: imports nothing from ppvae but :mod:`ppvae.errors`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ppvae.errors import ConfigError

__all__ = ["check_seed", "is_int"]


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as an int in [0, 2^32 − 1], the range every RNG ppvae seeds accepts (NumPy's is the narrowest);
    :class:`ConfigError` otherwise."""
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise ConfigError(f"{what} must be a whole number in [0, 2**32 - 1] (NumPy's seed range); got {seed!r}")
    return int(seed)


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

