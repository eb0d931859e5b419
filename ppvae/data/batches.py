"""Minibatches for ``fit``: tensors, tuples of tensors, Datasets, DataLoaders, dynamically binarized data, and any
re-iterable of ready-made batches (a list of tuples whose parts may be ``PackedSequence``s, masks, lengths).

In-memory tensors take a fast path: moved to the device once, shuffled with ``torch.randperm`` (the global torch
RNG, so a seed and a checkpointed RNG state reproduce the order) and sliced, without a DataLoader's per-example
collation. Ready-made batches are used as given, in their own order, each epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence
from torch.utils.data import DataLoader, Dataset

from ppvae.data.datasets import as_tensor, check_finite
from ppvae.errors import DataError

__all__ = ["Batches", "make_batches"]


class Batches:
    """An epoch-iterable of argument tuples ``(x,)`` or ``(x, y, ...)`` on a device.

    Exactly one of ``tensors`` (in-memory), ``source`` (an object with ``get_batch(idx)`` and ``__len__``) or
    ``loader`` (a DataLoader, or any re-iterable of ready-made batches) is set.
    """

    def __init__(
        self,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        *,
        tensors: tuple[Tensor, ...] = (),
        source: Any = None,
        loader: DataLoader | None = None,
    ) -> None:
        self.batch_size, self.device, self.shuffle = batch_size, device, shuffle
        self.tensors, self.source, self.loader = tensors, source, loader
        self.n = len(tensors[0]) if tensors else len(source) if source is not None else None
        self.n_batches: int | None = None  # batches of a ready-made iterable without __len__, counted once

    def __len__(self) -> int:
        if self.loader is not None:
            return self.n_batches if self.n_batches is not None else len(self.loader)
        return math.ceil(self.n / self.batch_size)

    def _index(self, idx: Tensor) -> tuple[Tensor, ...]:
        if self.source is not None:
            return (self.source.get_batch(idx).to(self.device),)
        idx = idx.to(self.tensors[0].device)
        return tuple(t[idx] for t in self.tensors)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        if self.loader is not None:
            for batch in self.loader:
                yield _as_args(batch, self.device)
            return
        order = torch.randperm(self.n) if self.shuffle else torch.arange(self.n)
        for i in range(0, self.n, self.batch_size):
            yield self._index(order[i : i + self.batch_size])

    def first(self) -> tuple[Tensor, ...]:
        """The first examples in storage order (no RNG drawn): used to discover parameters."""
        if self.loader is not None:
            return _as_args(next(iter(self.loader)), self.device)
        return self._index(torch.arange(min(self.batch_size, self.n)))

    def with_batch_size(self, batch_size: int) -> Batches:
        """The same data in batches of ``batch_size`` (in-memory data or a ``get_batch`` source; a DataLoader
        batches itself)."""
        if self.loader is not None:
            raise ValueError("a DataLoader's batch size is its own")
        return Batches(batch_size, self.device, self.shuffle, tensors=self.tensors, source=self.source)

    @staticmethod
    def batch_len(batch: tuple[Any, ...]) -> int:
        """Datapoints in a batch: the rows of its first part (a ``PackedSequence``: its number of sequences)."""
        return _rows(batch[0])

    def check_against(self, vae: Any) -> None:
        """Check data shape (and support, where the model has a likelihood with ``check_data``)."""
        if self.tensors:
            x = self.tensors[0]
        elif self.source is not None:
            # Dynamic binarization draws 0/1 from grey levels: the draws are in a Bernoulli's support by
            # construction, so check a draw (shape and support) rather than the grey levels.
            x = self.source.get_batch(torch.arange(min(self.n, 1024)))
        else:
            x = self.first()[0]
        shape = getattr(vae, "data_shape", None)
        if shape is not None and tuple(x.shape[1:]) != tuple(shape):
            raise DataError(
                f"data examples have shape {tuple(x.shape[1:])} but the model expects {tuple(shape)}; "
                "reshape the data or build the model with data_shape matching it"
            )
        check = getattr(getattr(vae, "likelihood", None), "check_data", None)
        if check is not None:
            check(x)


def _rows(part: Any) -> int:
    if isinstance(part, PackedSequence):
        return int(part.batch_sizes[0])  # the first time step holds every sequence
    return part.shape[0]


def _as_args(batch: Any, device: torch.device) -> tuple[Any, ...]:
    """A DataLoader's (or a ready-made) batch as arguments on ``device``; integer/bool data (the first part: uint8
    images, as torchvision gives them) become float32, as they do for in-memory data. A ``PackedSequence`` (itself a
    tuple) is one argument, moved whole; parts that are neither stay as they are."""
    parts = tuple(batch) if isinstance(batch, (list, tuple)) and not isinstance(batch, PackedSequence) else (batch,)
    return tuple(
        (as_tensor(b) if k == 0 and not b.is_floating_point() else b).to(device)
        if torch.is_tensor(b)
        else b.to(device)
        if isinstance(b, PackedSequence)
        else b
        for k, b in enumerate(parts)
    )


def _is_batch(item: Any) -> bool:
    """A ready-made batch: a tuple/list whose parts include a tensor or PackedSequence, or a PackedSequence."""
    if isinstance(item, PackedSequence):
        return True
    return isinstance(item, (tuple, list)) and any(torch.is_tensor(b) or isinstance(b, PackedSequence) for b in item)


def _ready_made(data: Any, batch_size: int, device: torch.device, shuffle: bool, what: str) -> Batches | None:
    """Batches over a re-iterable of ready-made batches, or None when ``data`` is not one.

    A list/sequence of batch tuples, or an object whose ``__iter__`` yields them anew on every call. A one-shot
    iterator (a generator) is refused: it would be empty from the second epoch on.
    """
    if isinstance(data, (Tensor, np.ndarray, tuple, str, bytes, dict, Dataset, DataLoader)) or not hasattr(
        data, "__iter__"
    ):
        return None
    if isinstance(data, list):
        if not data or not all(_is_batch(b) for b in data):
            return None  # a plain nested list is array data
    elif iter(data) is data:
        raise DataError(
            f"{what} is a one-shot iterator ({type(data).__name__}), used up after one epoch; give a list of "
            "batches, or an object whose __iter__ starts again each epoch"
        )
    batches = Batches(batch_size, device, shuffle, loader=data)
    if not hasattr(data, "__len__"):
        batches.n_batches = sum(1 for _ in data)
    if len(batches) == 0:
        raise DataError(f"{what} holds no batches; give at least one")
    first = next(iter(data))
    if not _is_batch(first) and not torch.is_tensor(first):
        raise DataError(
            f"{what} yields {type(first).__name__} items; each batch must be a tensor or a tuple of arguments "
            "(tensors, PackedSequences, masks, lengths), called as model(*batch)"
        )
    return batches


def _integer_labels(part: Any) -> Any:
    """An integer/bool array or list given after the data in a tuple (labels, indices) as a tensor that keeps an
    integer dtype: native byte order, unsigned types wider than 8 bits as int64 (torch supports them poorly).
    Anything else is returned as it is, for :func:`as_tensor` to convert or refuse."""
    try:
        arr = np.asarray(part)
    except (ValueError, TypeError):
        return part
    if arr.dtype.kind not in "biu" or arr.ndim == 0:
        return part
    dtype = np.dtype(np.int64) if arr.dtype.kind == "u" and arr.dtype.itemsize > 1 else arr.dtype.newbyteorder("=")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=dtype))


def make_batches(
    data: Any, batch_size: int, device: torch.device, *, shuffle: bool, what: str, strict: bool = True
) -> Batches:
    """Wrap ``data`` as :class:`Batches`; ``strict`` refuses a batch larger than the data."""
    if isinstance(data, DataLoader):
        if len(data) == 0:
            raise DataError(f"{what} is an empty DataLoader; give it at least one example")
        return Batches(batch_size, device, shuffle, loader=data)
    if hasattr(data, "get_batch") and hasattr(data, "__len__"):
        n = len(data)
        _check_size(n, batch_size, what, strict)
        return Batches(min(batch_size, n), device, shuffle, source=data)
    if isinstance(data, Dataset):
        n = len(data)  # type: ignore[arg-type]
        _check_size(n, batch_size, what, strict)
        loader = DataLoader(data, batch_size=min(batch_size, n), shuffle=shuffle)
        return Batches(batch_size, device, shuffle, loader=loader)
    ready = _ready_made(data, batch_size, device, shuffle, what)
    if ready is not None:
        return ready
    if isinstance(data, PackedSequence) or (
        isinstance(data, tuple) and any(isinstance(b, PackedSequence) for b in data)
    ):
        raise DataError(
            f"{what} holds a PackedSequence, which ppvae cannot split into minibatches; give a list of ready-made "
            f"batches instead, e.g. [(packed, mask, lengths), ...] ([{what}] for one batch), or a DataLoader"
        )
    parts = data if isinstance(data, tuple) else (data,)
    if not parts:
        raise DataError(f"{what} is an empty tuple; give a tensor or array, or a tuple of them (model(*batch))")
    tensors = []
    for k, part in enumerate(parts):
        if not torch.is_tensor(part) and not isinstance(part, (np.ndarray, list)):
            raise DataError(
                f"{what} must be a tensor, an array, a tuple of them, a Dataset, a DataLoader or a list of batches; "
                f"got {type(part).__name__}"
            )
        name = what if len(parts) == 1 else f"{what}[{k}]"
        # The first part is what the model scores (x): integer/bool data become float32. Later parts (labels,
        # indices) keep an integer/bool dtype, whether given as tensors or arrays.
        if k > 0 and not torch.is_tensor(part):
            part = _integer_labels(part)
        convert = k == 0 or not torch.is_tensor(part) or part.is_floating_point()
        t = as_tensor(part, name) if convert else part
        if t.dim() == 0:
            raise DataError(f"{name} is a scalar; give one example per row, shape (N, ...)")
        if t.is_floating_point():
            check_finite(t, name)
        tensors.append(t.to(device))
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise DataError(f"the tensors in {what} have different lengths {[len(t) for t in tensors]}; they must match")
    _check_size(n, batch_size, what, strict)
    return Batches(min(batch_size, n), device, shuffle, tensors=tuple(tensors))


def _check_size(n: int, batch_size: int, what: str, strict: bool) -> None:
    if n == 0:
        raise DataError(f"{what} is empty (0 examples); give at least one example")
    if strict and batch_size > n:
        raise DataError(f"batch_size {batch_size} is larger than the {n} examples in {what}; use batch_size ≤ {n}")
