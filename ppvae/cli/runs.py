"""Saved runs of ``ppvae train``: where the model file is, how to rebuild the model, and the data it was trained on."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ppvae import data as datamod
from ppvae import io
from ppvae.errors import ConfigError, DataError

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
        spec.loader.exec_module(module)
    except Exception as err:  # a user's file: report its error in one line
        raise ConfigError(f"cannot import model file {path}: {type(err).__name__}: {err}") from None
    if not callable(getattr(module, "build", None)):
        raise ConfigError(f"model file {path} must define build(data_shape, latent_dim) returning a model/guide module")
    return module


def build_from_file(path: str | Path, data_shape: Sequence[int], latent_dim: int) -> Any:
    module = load_model_file(path)
    try:
        return module.build(tuple(data_shape), latent_dim)
    except Exception as err:  # a user's file: report its error in one line
        raise ConfigError(f"build() in model file {path} failed: {type(err).__name__}: {err}") from None


def run_path(run: str) -> Path:
    path = Path(run)
    return path / "model.pt" if path.is_dir() else path


def load_run(run: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a saved run (a VAE from config, a model file's module via its build function)."""
    path = run_path(run)
    obj = io.read(path)
    meta = obj.get("meta", {})
    if obj.get("kind") == "vae":
        return io.load(path), meta
    if "model_file" in meta:
        model = build_from_file(meta["model_file"], meta["data_shape"], meta["latent_dim"])
        return io.load(path, model=model), meta
    raise ConfigError(
        f"{path} holds a custom model without a model file; load it in Python with ppvae.load(path, model=...)"
    )


def split_data(meta: dict, split: str, path: Path, seed: int) -> torch.Tensor:
    """A split of the run's dataset, loaded and preprocessed as in training (same split seed and binarization)."""
    if "dataset" not in meta or "data_shape" not in meta:
        raise ConfigError(
            f"{path} records no dataset (saved outside ppvae train); score it in Python with "
            "ppvae.evaluate(model, data) or ppvae.diagnose(model, data)"
        )
    splits = datamod.load(meta["dataset"], binarize=meta.get("binarize"), seed=meta.get("seed", 0))
    if list(splits.data_shape) != list(meta["data_shape"]):
        raise DataError(
            f"dataset {meta['dataset']!r} now holds datapoints of shape {list(splits.data_shape)}, but the run was "
            f"trained on shape {meta['data_shape']}; restore the training data"
        )
    x = getattr(splits, split)
    if x is None or len(x) == 0:
        raise ConfigError(f"dataset {splits.name!r} has no {split} split; choose another --split")
    if isinstance(x, datamod.DynamicBinarized):  # one seeded draw, so every diagnostic sees the same binary data
        x = torch.bernoulli(x.grey, generator=torch.Generator().manual_seed(seed))
    return x
