"""Exceptions raised for user mistakes.

Every user-facing error is a subclass of :class:`PPVAEError`. Its message is one line that names the problem,
the value seen and the fix; the CLI prints it and exits with status 2, without a traceback.
"""

from __future__ import annotations

import re

import torch

__all__ = ["PPVAEError", "ConfigError", "NotApplicable", "DataError", "CheckpointError", "TrainingError"]


class PPVAEError(Exception):
    """Base class of the errors ppvae raises for a user's input (not for its own bugs)."""


class ConfigError(PPVAEError, ValueError):
    """An argument or building-block name is invalid (unknown name, bad value, inconsistent options)."""


class NotApplicable(ConfigError):
    """This diagnostic cannot run on this pair (it needs something the pair does not have: an amortized encoder,
    a latent site by that name, a family ppvae can re-fit per datapoint), and nothing else.

    :func:`ppvae.diagnose` lists such a part under ``skipped`` with the reason; any other error in a part is
    reported under ``failed`` and the rest of the diagnosis stands. A subclass of :class:`ConfigError`, so code
    that called a diagnostic directly and caught ConfigError still does.
    """


class DataError(PPVAEError, ValueError):
    """Data are unusable: NaN/Inf, wrong shape, empty, or outside the likelihood's support."""


class CheckpointError(PPVAEError, OSError):
    """A saved run or checkpoint is missing, truncated, corrupted, or not a ppvae file."""


class TrainingError(PPVAEError, RuntimeError):
    """Training cannot start or cannot go on (parameters never optimized, non-finite loss, ...)."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: Python's MemoryError, torch's CUDA/MPS out-of-memory, or the CPU
    allocator's "can't allocate memory" (a plain RuntimeError in torch). Never a :class:`PPVAEError`, whose own
    message may say "out of memory" after the allocation failure has been reported."""
    if isinstance(err, PPVAEError):
        return False
    if isinstance(err, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def describe_out_of_memory(err: BaseException, limit: int = 160) -> str:
    """The useful part of an allocation failure's message, one line: the allocator's line without torch's
    ``[enforce fail at ...] err == 0.`` prefix and without the trace shapes Pyro appends; cut with "…"."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = next((line for line in lines if "alloc" in line.lower() or "out of memory" in line.lower()), "")
    text = text or (lines[0] if lines else type(err).__name__)
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def without_trace_shapes(err: PPVAEError) -> PPVAEError:
    """``err`` without the ``Trace Shapes:`` table Pyro appends to an error raised inside a traced model (its
    ``get_trace`` re-raises the error with the shapes of every site added to the message): ppvae's messages are one
    sentence."""
    text = str(err)
    cut = text.find("\nTrace Shapes:")
    return err if cut < 0 else type(err)(text[:cut])
