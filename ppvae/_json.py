"""Values made JSON-writable (NumPy scalars and arrays, tensors, non-finite floats)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` with numpy types as Python ones and non-finite floats made strict-JSON safe."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        # Strict JSON has no NaN/Infinity: NaN (not computed) becomes null, ±inf the strings "inf"/"-inf".
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value

