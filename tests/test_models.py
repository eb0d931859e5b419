"""The model zoo: every file in models/ builds, trains through fit, and is covered here."""

import importlib.util
from pathlib import Path

import torch

import ppvae
from ppvae.data import LinearGaussian

MODELS = Path(__file__).resolve().parent.parent / "models"
COVERED = {"factor_analysis.py"}


def _load(name):
    spec = importlib.util.spec_from_file_location(name, MODELS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_model_file_is_covered():
    files = {p.name for p in MODELS.glob("*.py") if not p.name.startswith("_")}
    assert files == COVERED, f"add tests for {files - COVERED} in tests/test_models.py"


def test_factor_analysis_reaches_exact_log_likelihood():
    gen = LinearGaussian(data_dim=8, latent_dim=2, noise=0.5, seed=1)
    x, _ = gen.sample(2000, seed=2)
    fa = _load("factor_analysis.py").build((8,), 2)
    ppvae.fit(fa, x, epochs=60, batch_size=100, lr=1e-2, progress=False)
    learned = fa.exact_log_px(x).mean().item()
    truth = gen.log_px(x).mean().item()
    with torch.no_grad():
        elbo = -ppvae.infer.objectives.make_objective("elbo", 200, True, 1)(fa.model, fa.guide, x).item() / len(x)
    assert truth - 0.05 < learned < truth + 0.1
    assert abs(elbo - learned) < 0.05
