"""Declarative checks of user-supplied values, shared by the library and the CLI's argparse types.

A constraint says what is allowed (:class:`Interval` for numbers, :class:`Options` for names) and writes the message
when a value is not: ``epochs must be a whole number ≥ 1, got 0``. The library calls :func:`check` at its entry
points; the CLI builds argparse ``type`` functions from the same constraints (:func:`arg_type`), so a flag and the
argument behind it accept the same values and say the same thing.

Ground floor: imports nothing from ppvae but :mod:`ppvae.errors`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ppvae.errors import ConfigError

__all__ = [
    "Interval",
    "Options",
    "check",
    "arg_type",
    "check_seed",
    "is_int",
    "SEED",
    "COUNT",
    "POSITIVE",
    "NONNEGATIVE",
]


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return (is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(float(value))


@dataclass(frozen=True)
class Interval:
    """Numbers in ``[low, high]`` (either end open with ``low_open``/``high_open``; ``None`` for unbounded).

    ``whole``: integers only (Python or NumPy, never bools), returned as ``int``; otherwise any finite real, returned
    as ``float``.
    """

    whole: bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # said after the range, e.g. "(NumPy's seed range)"

    def accepts(self, value: Any) -> bool:
        if not (is_int(value) if self.whole else _is_real(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def convert(self, value: Any) -> int | float:
        return int(value) if self.whole else float(value)

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '≥'} {_num(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '≤'} {_num(self.high)}"
        else:
            text = kind
        return f"{text} {self.note}" if self.note else text


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values (names, or ``None`` among them)."""

    choices: tuple[Any, ...]

    def accepts(self, value: Any) -> bool:
        return any(value is c or (type(value) is type(c) and value == c) for c in self.choices)

    def convert(self, value: Any) -> Any:
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)


Constraint = Interval | Options


def _num(x: float) -> str:
    if x == 2**32 - 1:
        return "2**32 - 1"
    return str(int(x)) if float(x).is_integer() else repr(x)


def check(name: str, value: Any, *allowed: Constraint | None) -> Any:
    """``value`` (converted: an int for whole numbers) when one of ``allowed`` accepts it, else :class:`ConfigError`.

    ``None`` among ``allowed`` lets ``None`` through (an optional setting). The message names the setting, what it
    must be and the value seen: ``patience must be None or a whole number ≥ 1, got 0``.
    """
    if value is None and None in allowed:
        return None
    for c in allowed:
        if c is not None and c.accepts(value):
            return c.convert(value)
    raise ConfigError(f"{name} must be {_expected(allowed)}, got {value!r}")


def _expected(allowed: Sequence[Constraint | None]) -> str:
    return " or ".join("None" if c is None else c.describe() for c in allowed)


def arg_type(name: str, *allowed: Constraint, parse: Callable[[str], Any] = int) -> Callable[[str], Any]:
    """An argparse ``type`` from constraints: parses the text with ``parse`` and checks it like :func:`check`, so a
    bad flag is a one-line usage error rather than an error once the work has started."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_expected(allowed)}") from None
        try:
            return check(name, value, *allowed)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


#: A whole number ≥ 1 (epochs, batch sizes, sample counts).
COUNT = Interval(whole=True, low=1)
#: A finite number > 0 (learning rates, norms).
POSITIVE = Interval(whole=False, low=0, low_open=True)
#: A finite number ≥ 0 (weights such as β, warm-up epochs).
NONNEGATIVE = Interval(whole=False, low=0)

#: Every RNG ppvae seeds accepts [0, 2^32 − 1] (NumPy's is the narrowest).
SEED = Interval(whole=True, low=0, high=2**32 - 1, note="(NumPy's seed range)")


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as an int in [0, 2^32 − 1]; :class:`ConfigError` otherwise."""
    return check(what, seed, SEED)
