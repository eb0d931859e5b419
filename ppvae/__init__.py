"""ppvae: probabilistic-programming variational autoencoders.

Generative models and amortized guides are Pyro model/guide pairs; :func:`fit` trains them by SVI; building
blocks (priors, likelihoods, guides, networks) compose into :class:`VAE`.
"""

from . import data
from .errors import CheckpointError, ConfigError, DataError, PPVAEError, TrainingError
from .io import load, save
from .train import FitResult, fit
from .vae import VAE

__all__ = [
    "VAE",
    "fit",
    "FitResult",
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
