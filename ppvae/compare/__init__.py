"""Comparison grids: priors × likelihoods × guides (× objectives × seeds) trained and scored on the same test rows.

:func:`compare` runs a grid (:mod:`~ppvae.compare.grid`: cache, lock, workers), each cell trained and scored by
:mod:`~ppvae.compare.cells`, and ranked by :mod:`~ppvae.compare.table` within comparability groups.
"""

from ppvae.compare.cells import Cell, GridSettings
from ppvae.compare.grid import Comparison, combine, compare
from ppvae.compare.table import COLUMNS

__all__ = ["compare", "combine", "Comparison", "GridSettings", "Cell", "COLUMNS"]
