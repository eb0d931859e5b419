"""ppvae: probabilistic-programming variational autoencoders.

Generative models and amortized guides are Pyro model/guide pairs; :func:`fit` trains them by SVI; building
blocks (priors, likelihoods, guides, networks) compose into :class:`VAE`.
"""

from . import data
from .diagnostics import Diagnosis, diagnose
from .errors import CheckpointError, ConfigError, DataError, PPVAEError, TrainingError
from .evaluate import Evaluation, evaluate
from .io import load, save
from .train import FitResult, fit
from .vae import VAE

__all__ = [
    "VAE",
    "fit",
    "FitResult",
    "evaluate",
    "Evaluation",
    "diagnose",
    "Diagnosis",
    "save",
    "load",
    "data",
    "PPVAEError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "TrainingError",
]
__version__ = "0.1.0"
