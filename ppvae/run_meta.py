"""What a run directory's ``model.pt`` says about its run: the data it was trained on and how, and its history.

``ppvae train`` and a compare grid's cells write it (``ppvae.save(model, path, meta=RunMeta(...).to_dict())``);
``ppvae evaluate``, ``diagnose``, ``sample`` and ``info`` read it back to rebuild the model and reload the same split.
On disk it stays the JSON object it has always been: :meth:`RunMeta.to_dict` writes the keys older ppvae wrote, in
the same order, and :meth:`RunMeta.from_dict` reads any older file (a missing key is None, an unknown one is kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ppvae.errors import ConfigError

if TYPE_CHECKING:
    from ppvae.data import DataSplits

__all__ = ["RunMeta"]

# Written even when None (a file says "not binarized", not "unknown"); the others only when set.
_ALWAYS = ("dataset", "data_shape", "levels", "binarize", "preprocessing", "latent_dim", "seed")


@dataclass(frozen=True)
class RunMeta:
    """A run's metadata.

    Attributes:
        dataset: the name :func:`ppvae.data.load` takes (``"digits"``, a file path).
        data_shape: one datapoint's shape, e.g. ``[1, 8, 8]``.
        levels: grey levels of the stored data (17 for digits, 256 for MNIST), None for continuous or binary data.
        binarize: ``"static"``, ``"dynamic"`` or None.
        preprocessing: the data's preprocessing record (:attr:`ppvae.data.DataSplits.preprocessing`).
        latent_dim: the model's latent dimension.
        seed: the seed of the data split (and of training, for ``ppvae train``); None in files that lack it.
        model_file: the model file the model was built from (``ppvae train --model``), an absolute path.
        model_options: the keyword options its ``build`` was given (``--model-option key=value``).
        data_plate: the name of the plate holding the local latents and observations, when not ``"data"``.
        cell: the compare grid cell the run is (prior, likelihood, guide, objective, seed).
        history: fit's per-epoch records (:attr:`ppvae.FitResult.history`).
        summary: ``ppvae train``'s summary numbers (ELBOs, seconds, parameters).
        extra: keys this version of ppvae does not know (a newer writer's), kept so they are written back.
    """

    dataset: str | None = None
    data_shape: list[int] | None = None
    levels: int | None = None
    binarize: str | None = None
    preprocessing: dict[str, Any] | None = None
    latent_dim: int | None = None
    seed: int | None = None
    model_file: str | None = None
    model_options: dict[str, Any] | None = None
    data_plate: str | None = None
    cell: dict[str, Any] | None = None
    history: list[dict[str, Any]] | None = None
    summary: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = sorted(set(self.extra) & set(_names()))
        if clash:
            raise ConfigError(f"RunMeta.extra repeats the fields {clash}; set them as fields, not in extra")

    @classmethod
    def of_data(cls, splits: DataSplits, *, latent_dim: int, seed: int, **fields_: Any) -> RunMeta:
        """The metadata of a run on ``splits``: its name, shape, levels, binarization and preprocessing."""
        return cls(
            dataset=splits.name,
            data_shape=list(splits.data_shape),
            levels=splits.levels,
            binarize=splits.binarize,
            preprocessing=splits.preprocessing,
            latent_dim=latent_dim,
            seed=seed,
            **fields_,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in ``model.pt``: the keys of :data:`_ALWAYS`, then those that are set, then
        :attr:`extra`."""
        out: dict[str, Any] = {}
        for name in _names():
            value = getattr(self, name)
            if name in _ALWAYS or value is not None:
                out[name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, meta: dict[str, Any] | None) -> RunMeta:
        """The metadata of a stored JSON object, from any ppvae version (missing keys None, unknown ones in
        :attr:`extra`); ``None`` or ``{}`` (a model saved without metadata) gives an empty RunMeta."""
        if meta is not None and not isinstance(meta, dict):
            raise ConfigError(f"a run's metadata must be a JSON object, got {type(meta).__name__}")
        meta = dict(meta or {})
        known = {name: meta.pop(name) for name in _names() if name in meta}
        return cls(**known, extra=meta)


def _names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(RunMeta) if f.name != "extra")
