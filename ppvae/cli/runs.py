"""Saved runs of ``ppvae train``: where the model file is, how to rebuild the model, and the data it was trained on
(its :class:`~ppvae.run_meta.RunMeta`)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ppvae import data as datamod
from ppvae import io
from ppvae.errors import ConfigError, DataError
from ppvae.run_meta import RunMeta

__all__ = ["run_path", "load_run", "load_model_file", "build_from_file", "split_data"]


def load_model_file(path: str | Path) -> Any:
    """Import a model file (``models/x.py``) by path; it must define ``build(data_shape, latent_dim, **opts)``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    if path.suffix != ".py":
        raise ConfigError(
            f"model file {path} is not a Python file (.py); give a file that defines build(data_shape, latent_dim)"
        )
    spec = importlib.util.spec_from_file_location(f"ppvae_user_model_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import model file {path}: Python has no loader for it")
    module = importlib.util.module_from_spec(spec)
    try:
        with _importable(path.parent):
            spec.loader.exec_module(module)
    except Exception as err:  # a user's file: report its error in one line
        raise ConfigError(f"cannot import model file {path}: {type(err).__name__}: {err}") from None
    if not callable(getattr(module, "build", None)):
        raise ConfigError(f"model file {path} must define build(data_shape, latent_dim) returning a model/guide module")
    return module


@contextmanager
def _importable(folder: Path) -> Iterator[None]:
    """The model file's own folder first on ``sys.path`` while it is imported and built, as ``python file.py`` would
    have it, so the file can import its sibling modules; ``sys.path`` is as it was afterwards."""
    entry = str(folder.resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        try:
            sys.path.remove(entry)
        except ValueError:  # the user's code removed it already
            pass


def build_from_file(
    path: str | Path,
    data_shape: Sequence[int],
    latent_dim: int,
    *,
    splits: datamod.DataSplits | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """The model a file's ``build`` returns.

    ``build(data_shape, latent_dim, **options)`` gets ``splits=`` (the :class:`~ppvae.data.DataSplits`: shapes,
    levels, labels, sizes) when its signature names a ``splits`` parameter, and the ``--model-option key=value``
    options as keyword arguments. A build that does not take an option given is refused by name.
    """
    module = load_model_file(path)
    options = dict(options or {})
    params = inspect.signature(module.build).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in options if k not in params and not takes_any)
    if unknown:
        raise ConfigError(
            f"build() in model file {path} takes no option(s) {unknown}; its parameters are "
            f"{[n for n in params if n not in ('data_shape', 'latent_dim')]}"
        )
    if "splits" in params:
        if splits is None:
            raise ConfigError(f"build() in model file {path} asks for splits= but no dataset is known for this run")
        options["splits"] = splits
    try:
        with _importable(Path(path).parent):
            return module.build(tuple(data_shape), latent_dim, **options)
    except Exception as err:  # a user's file: report its error in one line
        raise ConfigError(f"build() in model file {path} failed: {type(err).__name__}: {err}") from None


def wants_splits(path: str | Path) -> bool:
    """Whether a model file's ``build`` takes ``splits=`` (the run's data must then be loaded to rebuild it)."""
    return "splits" in inspect.signature(load_model_file(path).build).parameters


def run_path(run: str) -> Path:
    path = Path(run)
    return path / "model.pt" if path.is_dir() else path


def load_run(run: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a saved run (a VAE from config, a model file's module via its build function).

    Returns the model and the run's metadata as stored (a dict; :meth:`ppvae.run_meta.RunMeta.from_dict` reads it).
    """
    path = run_path(run)
    obj = io.read(path)
    stored = obj.get("meta") or {}
    if obj.get("kind") == "vae":
        return io.load(path), stored
    meta = RunMeta.from_dict(stored)
    if meta.model_file is not None:
        if meta.data_shape is None or meta.latent_dim is None:
            raise ConfigError(
                f"{path} names the model file {meta.model_file} but records no data_shape or latent_dim to build it "
                "with; load it in Python with ppvae.load(path, model=...)"
            )
        splits = _splits_of(meta, path) if wants_splits(meta.model_file) else None
        model = build_from_file(
            meta.model_file, meta.data_shape, meta.latent_dim, splits=splits, options=meta.model_options
        )
        return io.load(path, model=model), stored
    raise ConfigError(
        f"{path} holds a custom model without a model file; load it in Python with ppvae.load(path, model=...)"
    )


def runs_for_grid(runs: Sequence[str], splits: datamod.DataSplits) -> dict[str, torch.nn.Module]:
    """The models of saved runs (``ppvae train``'s, any model file), by a name each (the run directory's), to score
    beside a compare grid's cells on ``splits``; a run trained on other data (another dataset, binarization or split
    seed, so other test rows) is refused, naming what differs."""
    models: dict[str, torch.nn.Module] = {}
    for run in runs:
        path = run_path(run)
        if not path.is_file():
            raise ConfigError(f"--runs {run}: no such run (a directory of ppvae train holding model.pt, or the file)")
        model, stored = load_run(run)
        meta = RunMeta.from_dict(stored)
        if meta.data_plate not in (None, "data"):
            raise ConfigError(
                f"--runs {run} was trained with --data-plate {meta.data_plate}, and compare scores every model on the "
                "plate 'data'; score it with ppvae diagnose instead, or rename its plate to 'data'"
            )
        trained_on = _splits_of(meta, path)
        if (trained_on.name, trained_on.binarize) != (splits.name, splits.binarize) or not _same(trained_on, splits):
            raise ConfigError(
                f"--runs {run} was trained on {trained_on.name!r} (binarize {trained_on.binarize}, split seed "
                f"{meta.seed if meta.seed is not None else 0}), not on the grid's test rows ({splits.name!r}, binarize "
                f"{splits.binarize}, --seed {splits.preprocessing.get('seed', 0)}): give compare the run's --dataset, "
                "--binarize and --seed"
            )
        name = path.parent.name if path.name == "model.pt" else path.stem
        base, k = name, 2
        while name in models:
            name, k = f"{base}-{k}", k + 1
        models[name] = model
    return models


def _same(a: datamod.DataSplits, b: datamod.DataSplits) -> bool:
    """Whether two loads hold the same test rows (grey levels for a dynamic binarization)."""
    x, y = (getattr(t, "grey", t) for t in (a.test, b.test))
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)


def split_data(meta: RunMeta | dict, split: str, path: Path, seed: int) -> torch.Tensor:
    """A split of the run's dataset, loaded and preprocessed as in training (same split seed and binarization).

    ``meta``: the run's :class:`RunMeta`, or its stored dict. A file without a split seed (older ones) used 0.
    """
    splits = _splits_of(meta, path)
    x = getattr(splits, split)
    if x is None or len(x) == 0:
        raise ConfigError(f"dataset {splits.name!r} has no {split} split; choose another --split")
    if isinstance(x, datamod.DynamicBinarized):  # one seeded draw, so every diagnostic sees the same binary data
        x = torch.bernoulli(x.grey, generator=torch.Generator().manual_seed(seed))
    return x


def _splits_of(meta: RunMeta | dict, path: Path) -> datamod.DataSplits:
    """The run's dataset, loaded and split as in training."""
    meta = meta if isinstance(meta, RunMeta) else RunMeta.from_dict(meta)
    if meta.dataset is None or meta.data_shape is None:
        raise ConfigError(
            f"{path} records no dataset (saved outside ppvae train); score it in Python with "
            "ppvae.evaluate(model, data) or ppvae.diagnose(model, data)"
        )
    splits = datamod.load(meta.dataset, binarize=meta.binarize, seed=meta.seed if meta.seed is not None else 0)
    if list(splits.data_shape) != list(meta.data_shape):
        raise DataError(
            f"dataset {meta.dataset!r} now holds datapoints of shape {list(splits.data_shape)}, but the run was "
            f"trained on shape {meta.data_shape}; restore the training data"
        )
    return splits
