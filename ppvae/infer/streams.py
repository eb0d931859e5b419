"""Several data streams in one ``fit``, each with its own loss and weight (the semi-supervised recipe).

A :class:`Stream` is data plus what a step on its batches minimizes: the negative β-ELBO of a model/guide pair
(``fit``'s own, or the stream's ``model``/``guide``), under the stream's ``objective``, times ``weight``; plus, when
given, an auxiliary loss ``aux(*batch)`` times ``aux_weight`` (Kingma et al. 2014's classifier term α·(−log q(y|x)) on
labelled batches). Both are sums over the batch in nats; the step divides their weighted sum by the batch's
datapoints, as a single-stream step does.

Order: the streams' batches alternate round-robin, one optimizer step per batch (stream 1, stream 2, ..., stream 1,
...). An epoch is one pass over the stream with the most batches; a shorter stream starts again (freshly shuffled)
when it runs out, so every step has a batch of every stream in turn. Each epoch starts every stream afresh, so the
order depends only on the RNG state at the epoch's start, which a checkpoint stores: resume stays exact.

Pyro's SS-VAE tutorial (M2, https://pyro.ai/examples/ss-vae.html) in this form::

    fit(ss_vae, [
        Stream(unlabelled_x, name="unlabelled", objective="enum"),           # y enumerated: TraceEnum_ELBO
        Stream((labelled_x, labelled_y), name="labelled",                    # y observed
               aux=ss_vae.classifier_loss, aux_weight=0.1 * len(unlabelled_x)),
    ])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from ppvae.errors import ConfigError
from ppvae.infer.objectives import BatchLoss

__all__ = ["Stream", "StreamLoss", "TrainStream", "round_robin", "as_streams"]


@dataclass(frozen=True, eq=False)  # data may be tensors: compared by identity, not elementwise
class Stream:
    """One data stream of a multi-stream :func:`ppvae.fit`.

    Attributes:
        data: anything ``fit`` accepts as ``data`` (tensor, tuple, Dataset, DataLoader, list of batches).
        name: the stream's name in ``history[i]["streams"]``; default ``"stream<k>"`` (k from 1).
        model, guide: the pair whose ELBO this stream's batches train; default ``fit``'s pair. A function pair
            given here must register its networks with ``pyro.module`` under the same names as ``fit``'s pair so
            the same parameters are trained.
        objective: the stream's objective (a name of ``ppvae.infer.objectives.OBJECTIVES`` or an ``ELBO``);
            default ``fit``'s.
        weight: multiplies the stream's negative β-ELBO.
        aux: an auxiliary loss called like the model, ``aux(*batch) -> Tensor``, summed over the batch (nats).
        aux_weight: multiplies ``aux`` (the tutorial's α).
        batch_size: this stream's batch size; default ``fit``'s.
        elbo: whether the stream has an ELBO term (False: only ``aux``, e.g. a classifier trained on its own).
    """

    data: Any
    name: str | None = None
    model: Callable | None = None
    guide: Callable | None = None
    objective: Any = None
    weight: float = 1.0
    aux: Callable[..., Tensor] | None = None
    aux_weight: float = 1.0
    batch_size: int | None = None
    elbo: bool = True

    def __post_init__(self) -> None:
        if not self.elbo and self.aux is None:
            raise ConfigError(f"stream {self.name or ''!r} has elbo=False and no aux: it has no loss; give aux=...")
        if (self.model is None) != (self.guide is None):
            raise ConfigError("a Stream takes model and guide together (or neither, for fit's pair)")
        if self.aux is not None and not callable(self.aux):
            raise ConfigError(f"Stream aux must be a callable aux(*batch) -> Tensor, got {type(self.aux).__name__}")
        for what in ("weight", "aux_weight"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"Stream {what} must be a number ≥ 0, got {value!r}")


def as_streams(data: Any) -> list[Stream] | None:
    """``data`` as a list of named streams when it is a :class:`Stream` or a list/tuple of them, else None.

    A mixed sequence (some streams, some data) and repeated names are refused.
    """
    items = [data] if isinstance(data, Stream) else list(data) if isinstance(data, (list, tuple)) else None
    if not items or not any(isinstance(s, Stream) for s in items):
        return None
    if not all(isinstance(s, Stream) for s in items):
        raise ConfigError("fit's data mixes Streams and plain data; wrap every part in a ppvae.Stream(data=...)")
    named = [s if s.name else _renamed(s, f"stream{k + 1}") for k, s in enumerate(items)]
    names = [s.name for s in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"stream names must differ, got {names}")
    return named


def _renamed(stream: Stream, name: str) -> Stream:
    return replace(stream, name=name)


@dataclass(frozen=True)
class StreamLoss:
    """A stream's step loss: ``weight · elbo(batch, β) + aux_weight · aux(*batch)`` (either may be absent)."""

    elbo: BatchLoss | None
    weight: float = 1.0
    aux: Callable[..., Tensor] | None = None
    aux_weight: float = 1.0

    def __call__(self, batch: tuple[Any, ...], beta: float = 1.0) -> Tensor:
        total = None
        if self.elbo is not None:
            total = self.elbo(batch, beta)
            if self.weight != 1.0:
                total = total * self.weight
        if self.aux is not None:
            extra = self.aux(*batch) * self.aux_weight
            total = extra if total is None else total + extra
        return total


@dataclass(frozen=True)
class TrainStream:
    """What the :class:`~ppvae.infer.train.Trainer` runs of one stream: its batches, its step loss, and the pair
    traced to name the sites of a faulty step."""

    name: str
    batches: Any  # ppvae.data.batches.Batches
    loss: BatchLoss
    pair: tuple[Callable, Callable]


def round_robin(streams: Sequence[TrainStream]) -> Iterator[tuple[TrainStream, tuple]]:
    """One epoch of ``(stream, batch)``: the streams in turn, for as many rounds as the longest has batches; a
    shorter stream starts again when it runs out. One stream: its batches, exactly as iterating it."""
    if len(streams) == 1:
        for batch in streams[0].batches:
            yield streams[0], batch
        return
    rounds = max(len(s.batches) for s in streams)
    iters = [iter(s.batches) for s in streams]
    for _ in range(rounds):
        for k, s in enumerate(streams):
            try:
                batch = next(iters[k])
            except StopIteration:
                iters[k] = iter(s.batches)
                batch = next(iters[k])
            yield s, batch
