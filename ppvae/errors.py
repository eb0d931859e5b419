"""Exceptions raised for user mistakes.

Every user-facing error is a subclass of :class:`PPVAEError`. Its message is one line that names the problem,
the value seen and the fix; the CLI prints it and exits with status 2, without a traceback.
"""

from __future__ import annotations

__all__ = ["PPVAEError", "ConfigError", "DataError", "CheckpointError", "TrainingError"]


class PPVAEError(Exception):
    """Base class of the errors ppvae raises for a user's input (not for its own bugs)."""


class ConfigError(PPVAEError, ValueError):
    """An argument or building-block name is invalid (unknown name, bad value, inconsistent options)."""


class DataError(PPVAEError, ValueError):
    """Data are unusable: NaN/Inf, wrong shape, empty, or outside the likelihood's support."""


class CheckpointError(PPVAEError, OSError):
    """A saved run or checkpoint is missing, truncated, corrupted, or not a ppvae file."""


class TrainingError(PPVAEError, RuntimeError):
    """Training cannot start or cannot go on (parameters never optimized, non-finite loss, ...)."""
