"""ppvae: probabilistic-programming variational autoencoders.

Generative models and amortized guides are Pyro model/guide pairs; :func:`fit` trains them by SVI; building
blocks (priors, likelihoods, guides, networks) compose into :class:`VAE`.
"""

from ppvae import data
from ppvae._version import __version__
from ppvae.diagnostics import Diagnosis, Evaluation, diagnose, evaluate
from ppvae.diagnostics.check import ModelCheck, check_model
from ppvae.errors import CheckpointError, ConfigError, DataError, PPVAEError, TrainingError
from ppvae.infer import FitConfig, FitResult, Stream, fit
from ppvae.io import load, save
from ppvae.vae import VAE

__all__ = [
    "VAE",
    "fit",
    "FitConfig",
    "FitResult",
    "Stream",
    "evaluate",
    "Evaluation",
    "diagnose",
    "Diagnosis",
    "check_model",
    "ModelCheck",
    "save",
    "load",
    "data",
    "PPVAEError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "TrainingError",
    "__version__",
]
