"""Block specifications as users write them: ``"normal"``, ``"normal:scale=learned"``, ``{"name":, "kwargs":}``;
and the defaults that follow from a dataset (number of grey levels, binarization). Shared by the CLI and
:mod:`ppvae.compare`."""

from __future__ import annotations

import json
import re
from typing import Any

from ppvae.data import DataSplits
from ppvae.errors import ConfigError

__all__ = ["parse_block", "with_levels", "default_likelihood", "block_name", "short_spec"]


def parse_block(text: str) -> str | dict:
    """``"normal"`` → ``"normal"``; ``"normal:scale=learned,x=2"`` → ``{"name": "normal", "kwargs": {...}}``."""
    name, _, opts = text.partition(":")
    if not opts:
        return name
    kwargs: dict[str, Any] = {}
    # Split at commas that start a new key=, so list values like hidden=[32,16] stay whole.
    for item in re.split(r",(?=[A-Za-z_][\w-]*=)", opts):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"cannot read option {item!r} in {text!r}; write name:key=value,key=value")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return {"name": name, "kwargs": kwargs}


def with_levels(spec: str | dict, levels: int | None) -> str | dict:
    """Give 256-level likelihoods the data's number of grey levels unless the user chose one."""
    name = spec if isinstance(spec, str) else spec["name"]
    if levels is None or name not in ("categorical", "discretized-logistic"):
        return spec
    kwargs = {} if isinstance(spec, str) else dict(spec.get("kwargs", {}))
    kwargs.setdefault("levels", levels)
    return {"name": name, "kwargs": kwargs}


def default_likelihood(splits: DataSplits) -> str:
    """Bernoulli for binarized data; a Categorical over few grey levels (digits: 17); a discretized logistic
    over many (256: a Categorical would need 256 decoder outputs per pixel); a Normal for continuous data."""
    if splits.binarize:
        return "bernoulli"
    if splits.levels:
        return "categorical" if splits.levels <= 32 else "discretized-logistic"
    return "normal"


def block_name(spec: str | dict | Any) -> str:
    """The registry name of a spec (``"normal"`` for ``"normal"`` and ``{"name": "normal", ...}``)."""
    if isinstance(spec, str):
        return spec.partition(":")[0]
    if isinstance(spec, dict):
        return str(spec["name"])
    return getattr(type(spec), "block_name", type(spec).__name__)




def short_spec(spec: Any) -> str:
    """A block spec as a short label: ``mlp(hidden=[256])``."""
    if isinstance(spec, dict) and spec.get("kwargs"):
        return f"{spec['name']}({', '.join(f'{k}={v}' for k, v in spec['kwargs'].items())})"
    return block_name(spec)

