"""Data for ppvae: known datasets, user files and arrays, synthetic data with exact answers, and batching.

:func:`load` returns :class:`DataSplits`. Modules: :mod:`~ppvae.data.datasets` (loading, validation, splits,
binarization, the linear-Gaussian generator), :mod:`~ppvae.data.idx` (MNIST-format files: where they are found and
how they are downloaded), :mod:`~ppvae.data.batches` (the batches a trainer or scorer iterates over).
"""

from ppvae._validate import check_seed
from ppvae.data.datasets import (
    FILE_TYPES,
    KNOWN_NAMES,
    DataSplits,
    DynamicBinarized,
    LinearGaussian,
    as_tensor,
    check_finite,
    load,
)

__all__ = [
    "FILE_TYPES",
    "KNOWN_NAMES",
    "DataSplits",
    "DynamicBinarized",
    "LinearGaussian",
    "as_tensor",
    "check_finite",
    "check_seed",
    "load",
]
