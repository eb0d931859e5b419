"""What the training loop carries from step to step: :class:`TrainState` (checkpointed) and :class:`EpochStats`
(the epoch in progress, not checkpointed: a run killed mid-epoch restarts that epoch).

``TrainState`` has the fields :func:`ppvae.infer.checkpoint.save_training` and
:func:`~ppvae.infer.checkpoint.restore_training` read and write (``history``, ``best_epoch``, ``best_score``,
``best_params``, ``stopped_early``), so a checkpoint of a state is a checkpoint of a ``fit``;
:meth:`TrainState.state_dict` gives the same contents in memory, without the RNG states (those are the process's,
and the checkpoint stores them).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ppvae.errors import CheckpointError
from ppvae.infer.nonfinite import Fault

__all__ = ["TrainState", "EpochStats"]


@dataclass(eq=False)
class TrainState:
    """Parameters, optimizer, history and the best epoch so far of one training run.

    Attributes:
        params: ``(name, tensor)`` of every trained parameter, in the optimizer's order.
        optimizer: the optimizer stepping ``params``.
        history: one record per finished epoch (see :class:`ppvae.infer.train.FitResult`).
        best_epoch, best_score, best_params: the epoch with the highest score (validation ELBO, else the negative
            train loss), its score and a copy of its parameters; None, −inf and None before any.
        stopped_early: set to stop before the next epoch (patience ran out); checkpointed, so a resumed run that
            had stopped stays stopped.
    """

    params: list[tuple[str, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float = -math.inf
    best_params: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    stopped_early: bool = False

    @property
    def epoch(self) -> int:
        """Finished epochs: one history record each, so the two cannot disagree after a resume."""
        return len(self.history)

    @property
    def improved(self) -> bool:
        """Whether the last finished epoch is the best so far (its checkpoint is the new ``best.pt``)."""
        return self.best_epoch is not None and self.best_epoch == self.epoch

    def observe(self, score: float) -> bool:
        """Score the epoch just recorded; keep a copy of the parameters when it beats the best. NaN never does."""
        if not score > self.best_score:
            return False
        self.best_score = score
        self.best_params = {name: p.detach().clone() for name, p in self.params}
        self.best_epoch = self.epoch
        return True

    @torch.no_grad()
    def restore_best(self) -> None:
        """Copy the best epoch's parameters into the trained tensors (in place: the model sees them)."""
        if self.best_params is None:
            return
        for name, p in self.params:
            p.copy_(self.best_params[name])

    def state_dict(self) -> dict[str, Any]:
        """Copies of everything the state holds: parameters, optimizer state, history and the best epoch."""
        return {
            "params": {name: p.detach().clone() for name, p in self.params},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "history": copy.deepcopy(self.history),
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "best_params": None if self.best_params is None else {k: v.clone() for k, v in self.best_params.items()},
            "stopped_early": self.stopped_early,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` in place (the parameter tensors stay the model's own)."""
        saved = state["params"]
        names = [name for name, _ in self.params]
        if sorted(saved) != sorted(names):
            raise CheckpointError(
                f"the state holds different parameters ({len(saved)} saved, {len(names)} here): "
                f"{sorted(set(saved) ^ set(names))[:5]}"
            )
        with torch.no_grad():
            for name, p in self.params:
                if saved[name].shape != p.shape:
                    raise CheckpointError(
                        f"parameter {name} has shape {tuple(saved[name].shape)} in the state, {tuple(p.shape)} here"
                    )
                p.copy_(saved[name])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.history[:] = copy.deepcopy(state["history"])
        self.best_epoch = state["best_epoch"]
        self.best_score = state["best_score"]
        best = state["best_params"]
        self.best_params = None if best is None else {k: v.clone() for k, v in best.items()}
        self.stopped_early = bool(state["stopped_early"])


@dataclass(eq=False)
class EpochStats:
    """Running totals of the epoch in progress.

    Attributes:
        index: the epoch, counted from 0; ``batches``: batches per epoch.
        loss_sum: Σ loss × batch size over the steps taken, on the device (read it sparingly: a sync).
        count: datapoints in the steps taken; ``skipped``: batches left out for a non-finite loss or gradient.
        first_fault: the message of the first skipped batch (traced when it happened).
        stream_sums, stream_counts: the same totals per stream, by name (several streams only).
        started: ``time.perf_counter()`` at the epoch's start.
    """

    index: int
    batches: int
    loss_sum: torch.Tensor
    count: int = 0
    skipped: int = 0
    first_fault: str = ""
    started: float = field(default_factory=time.perf_counter)
    stream_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    stream_counts: dict[str, int] = field(default_factory=dict)

    def add_stream(self, name: str, loss_sum: torch.Tensor, count: int) -> None:
        """Add a step of stream ``name`` (loss × batch size, on the device) to that stream's totals."""
        self.stream_sums[name] = self.stream_sums[name] + loss_sum if name in self.stream_sums else loss_sum
        self.stream_counts[name] = self.stream_counts.get(name, 0) + count

    def skip(self, fault: Fault) -> None:
        """Count a batch left out; describe only the first of an epoch (a trace each would make skipping slow)."""
        self.skipped += 1
        if not self.first_fault:
            self.first_fault = fault.message

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
