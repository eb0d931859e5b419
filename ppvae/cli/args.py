"""argparse ``type`` functions built on :mod:`ppvae._validate`, so a bad flag is a one-line usage error."""

from __future__ import annotations

import argparse

from ppvae._validate import check_seed
from ppvae.errors import ConfigError

__all__ = ["seed_arg"]


def seed_arg(text: str) -> int:
    """argparse ``type`` for seeds: a whole number in [0, 2^32 − 1] (checked by :func:`ppvae._validate.check_seed`), so
    a bad ``--seed`` is a one-line usage error rather than an error from NumPy once the work has started."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (seeds are in [0, 2**32 - 1])") from None
    try:
        return check_seed(value)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None

