"""Diagnostics of a trained pair, all computed from per-datapoint importance log-weights and guide draws.

:func:`evaluate` (ELBO, importance-sampled log p(x), bits/dim, PSIS k̂ per datapoint) and :func:`diagnose` (that plus
collapse, amortization/approximation gaps, SBC, NUTS reference posteriors and findings in words). One module per
diagnostic; :mod:`~ppvae.diagnostics.arviz_io` is the only module that talks to ArviZ.
"""

from ppvae.diagnostics.diagnosis import Diagnosis, diagnose
from ppvae.diagnostics.evaluation import Evaluation, evaluate

__all__ = ["evaluate", "Evaluation", "diagnose", "Diagnosis"]
