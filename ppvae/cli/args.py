"""argparse ``type`` functions built from :mod:`ppvae._validate`'s constraints, so a bad flag is a one-line usage
error (before anything is loaded or written) that says what the library would have said."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ppvae._validate import COUNT, SEED, Interval, arg_type
from ppvae.infer.config import CONSTRAINTS

__all__ = ["seed_arg", "count_arg", "whole_arg", "fit_arg", "model_option_arg"]

#: ``--seed``: a whole number in [0, 2^32 − 1].
seed_arg = arg_type("seed", SEED)


def count_arg(name: str) -> object:
    """A whole number ≥ 1 for the flag ``name`` (epochs, batch sizes, sample counts)."""
    return arg_type(name, COUNT)


def whole_arg(name: str, low: int) -> object:
    """A whole number ≥ ``low`` for the flag ``name``."""
    return arg_type(name, Interval(whole=True, low=low))


def fit_arg(name: str) -> object:
    """The flag for the fit setting ``name`` (``"lr"``, ``"beta"``, ...): the values :class:`ppvae.FitConfig` and
    ``fit`` accept (:data:`ppvae.infer.config.CONSTRAINTS`), refused with their message. A flag left out is the
    setting's default, so None is not among the values it parses."""
    allowed = [c for c in CONSTRAINTS[name] if c is not None]
    whole = all(isinstance(c, Interval) and c.whole for c in allowed)
    return arg_type(name, *allowed, parse=int if whole else float)


def model_option_arg(text: str) -> tuple[str, Any]:
    """``--model-option key=value``: the pair ``(key, value)``, the value read as JSON (``3``, ``[64, 32]``,
    ``true``) and otherwise kept as text."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with KEY a Python name (e.g. hidden=[64,32])")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw
