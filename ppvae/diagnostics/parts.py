"""What a diagnostic part receives and what its result offers, so :func:`ppvae.diagnose` runs every part alike.

A part is declared by its config class in :mod:`ppvae.diagnostics.config` (``part``, ``runner``, settings). Its
runner is ``run_part(inputs: PartInput, config) -> result``; it raises :class:`~ppvae.errors.NotApplicable` when the
pair cannot have this diagnostic (the part is then *skipped*, with that sentence), and any other error makes the
part *failed*, the other parts standing.

The result has ``summary() -> dict`` (JSON-ready numbers, stored under the part's name in ``diagnosis.json``) and
may have:

- ``rows() -> list[tuple[str, str, str]]``: ``(diagnostic, value, how to read it)`` rows of the report table;
- ``figures(directory) -> dict[str, Path]``: PNGs written by :meth:`Diagnosis.save`, keyed by name;
- ``inference_data() -> dict``: ``{"groups": {name: {var: array}}, "posterior": {var: array}, "dims": {var:
  [dim names]}}``, merged into :meth:`Diagnosis.to_inference_data`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ppvae.infer.pair import as_pair

__all__ = ["PartInput"]


@dataclass(frozen=True)
class PartInput:
    """What every part is given.

    Attributes:
        model, guide: the pair as the caller gave it to :func:`ppvae.diagnose` (``guide`` None for a module).
        x: ``(N, *data_shape)`` the data every part sees (a dynamically binarized dataset drawn once).
        seed: seeds the part's own randomness; parts leave the global RNG state as they found it.
        evaluation: the :class:`~ppvae.diagnostics.evaluation.Evaluation` of the same data (log-weights kept).
        data: the data as the pair takes them (``x``, or a tuple of model arguments: data, labels, masks...).
        data_plate: the plate that indexes datapoints.
        latent_sites: the local latent sites the caller named, or None (every continuous one, found from the trace:
            :mod:`ppvae.infer.sites`).
    """

    model: Any
    guide: Callable | None
    x: Tensor
    seed: int
    evaluation: Any
    data: Any = None
    data_plate: str = "data"
    latent_sites: tuple[str, ...] | None = None

    def model_data(self) -> Any:
        """The data to hand a part's function: ``x`` alone for a ``ppvae.VAE`` (its model takes x) or when no
        other form was given, else the data as the pair takes them (a tuple of its arguments included)."""
        if self.data is None or as_pair(self.model, self.guide).is_builtin_vae:
            return self.x
        return self.data
