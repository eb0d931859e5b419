"""Inference: the objectives, per-datapoint log-weights, the parameters a pair trains, and the trainer.

:func:`fit` (:mod:`~ppvae.infer.train`) trains any model/guide pair by SVI, with the settings and defaults of
:class:`FitConfig` (:mod:`~ppvae.infer.config`); :mod:`~ppvae.infer.checkpoint` writes
and restores exact-resume checkpoints; :mod:`~ppvae.infer.nonfinite` explains a NaN/Inf step;
:mod:`~ppvae.infer.logweights` computes ``log p(x, z) − log q(z|x)`` per datapoint, the primitive every diagnostic is
computed from. :func:`param_state` and :func:`keep_params` (:mod:`~ppvae.infer.params`) read and set the
``pyro.param`` values ppvae keeps for a model. :class:`Stream` (:mod:`~ppvae.infer.streams`) is one of several
data streams trained together, each with its own loss and weight.
"""

from ppvae.infer.config import FitConfig
from ppvae.infer.params import keep_params, param_state
from ppvae.infer.streams import Stream
from ppvae.infer.train import FitResult, fit

__all__ = ["fit", "FitResult", "FitConfig", "Stream", "param_state", "keep_params"]
