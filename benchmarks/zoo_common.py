"""What the zoo's benchmarks share: the header line, binarized Fashion-MNIST, and a model file loaded by path."""

from __future__ import annotations

import importlib.util
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import pyro
import torch

import ppvae

MODELS = Path(__file__).resolve().parent.parent / "models"


def begin_run(threads: int | None) -> None:
    """Set torch's threads and print the run's date and versions (the first line RESULTS.md records)."""
    if threads:
        torch.set_num_threads(threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC torch {torch.__version__} pyro {pyro.__version__} "
          f"python {platform.python_version()} threads {torch.get_num_threads()}", flush=True)  # fmt: skip


def binarized_fashion_mnist() -> ppvae.data.DataSplits:
    """Fashion-MNIST, statically binarized, the ppvae split (seed 0); exits with the fix when the files are missing."""
    try:
        return ppvae.data.load("fashion-mnist", binarize="static", download=False)
    except ppvae.DataError as err:
        sys.exit(f"this benchmark needs the Fashion-MNIST files: {err}")


def model_file(name: str) -> ModuleType:
    """``models/<name>.py``, imported by path (the zoo is not a package)."""
    spec = importlib.util.spec_from_file_location(name, MODELS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
