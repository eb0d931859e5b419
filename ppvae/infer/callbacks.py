"""Callbacks of the training loop (:class:`ppvae.infer.train.Trainer`): what ``fit`` does around the steps.

A :class:`Callback` overrides the hooks it needs; the trainer calls them in the order of its list:

- ``on_fit_start(trainer)``: once, after a resume, before the first epoch;
- ``on_epoch_start(trainer)``: ``trainer.epoch_stats`` is fresh;
- ``on_step_end(trainer, step)``: after each optimizer step (not after a skipped batch);
- ``on_nonfinite(trainer, fault)``: a step whose loss or gradient is NaN/Inf, before any optimizer step; raise to
  stop training, return to leave the batch out;
- ``on_epoch_end(trainer, record)``: the epoch's record is in ``trainer.state.history`` and scored (best epoch);
- ``on_fit_end(trainer, error)``: always, last; ``error`` is what stopped the run, or None.

``fit`` uses, in this order: :class:`NonFinitePolicy`, :class:`Progress` (unless ``progress=False``),
:class:`EarlyStopping` (with ``val_data``) and :class:`Checkpoint` (with ``checkpoint_dir``), so the epoch's
warning and line come before the checkpoint that records ``stopped_early``.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppvae.errors import CheckpointError, TrainingError
from ppvae.infer import checkpoint
from ppvae.infer.config import ON_NONFINITE
from ppvae.infer.nonfinite import Fault

if TYPE_CHECKING:
    from ppvae.infer.train import Trainer

__all__ = ["Callback", "NonFinitePolicy", "EarlyStopping", "Checkpoint", "Progress", "ON_NONFINITE"]

# The training loop's own modules (this one and its sibling train.py, wherever the package puts the two): a warning
# is attributed to the first caller outside them, the line that called fit, as warnings.warn(stacklevel=2) in fit did.
_LOOP_MODULES = (__name__, __name__.rpartition(".")[0] + ".train")


class Callback:
    """Hooks of the training loop, each a no-op here: override the ones you need (see the module's docstring)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Once, before the first epoch (after a resume: ``trainer.state`` holds the checkpoint)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Before an epoch's first step."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """After the optimizer step of batch ``step`` (from 0) of the epoch."""

    def on_nonfinite(self, trainer: Trainer, fault: Fault) -> None:
        """A faulty step, before any optimizer step: raise to stop; returning leaves the batch out."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After an epoch's record is appended to the history and scored."""

    def on_fit_end(self, trainer: Trainer, error: BaseException | None) -> None:
        """Last, also when training failed (``error``): release what the callback holds."""


class NonFinitePolicy(Callback):
    """What a NaN/Inf loss or gradient does: ``"raise"`` stops with a :class:`TrainingError` naming the step and the
    site, the parameters from before the batch kept in memory and in ``directory/nonfinite.pt``; ``"skip"`` leaves
    the batch out (the trainer counts it) and warns once per epoch with the first such batch."""

    def __init__(self, mode: str, *, lr: float, directory: Path | None = None, model: Any = None) -> None:
        if mode not in ON_NONFINITE:
            raise ValueError(f"mode must be one of {ON_NONFINITE}, got {mode!r}")
        self.mode, self.lr, self.directory, self.model = mode, lr, directory, model

    def on_nonfinite(self, trainer: Trainer, fault: Fault) -> None:
        if self.mode == "skip":
            return
        kept = self._keep_last_good(trainer, fault)
        lr = self.lr
        raise TrainingError(
            f"{fault.message}; training stopped "
            f"with the parameters from before this batch ({kept}). Likely causes: a learning rate too "
            f"high (lr={lr:g}: try {lr / 10:g}, or clip_norm=...), a likelihood scale collapsing "
            "to 0, or data outside the likelihood's support; on_nonfinite='skip' skips such batches"
        )

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        stats = trainer.epoch_stats
        if self.mode == "skip" and stats.skipped:
            warnings.warn(
                f"skipped {stats.skipped} of {stats.batches} batches in epoch {record['epoch']} with a non-finite "
                f"loss or gradient (on_nonfinite='skip'); first: {stats.first_fault}",
                RuntimeWarning,
                stacklevel=_stacklevel_outside_loop(),
            )

    def _keep_last_good(self, trainer: Trainer, fault: Fault) -> str:
        """Write the parameters from before the failed batch to ``nonfinite.pt``; say where the good state is."""
        directory = self.directory
        if directory is None:
            return "kept in memory; pass checkpoint_dir=... to keep them on disk too"
        path = directory / "nonfinite.pt"
        state = trainer.state
        try:
            checkpoint.save_training(
                path,
                self.model,
                state.params,
                state.optimizer,
                state,
                extra={"failed_at": {"epoch": fault.epoch, "batch": fault.batch}},
            )
        except CheckpointError:
            return f"kept in memory; writing {path} failed"
        last = directory / "last.pt"
        return f"kept in memory and in {path}" + (
            f", {last} holds the end of epoch {fault.epoch - 1}" if last.exists() else ""
        )


class EarlyStopping(Callback):
    """Keep the best epoch's parameters at the end of a successful run; with ``patience``, also stop after that
    many epochs without a better score (``trainer.state.stopped_early``)."""

    def __init__(self, patience: int | None = None) -> None:
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.patience is not None:
            state = trainer.state
            # Epochs since the best one: a count that needs no state of its own, so it is right after a resume.
            state.stopped_early = state.epoch - (state.best_epoch or 0) >= self.patience

    def on_fit_end(self, trainer: Trainer, error: BaseException | None) -> None:
        if error is None:
            trainer.state.restore_best()


class Checkpoint(Callback):
    """Write ``directory/last.pt`` after every epoch and ``best.pt`` when it is the best so far, atomically, with
    everything :func:`ppvae.infer.checkpoint.restore_training` needs to resume bitwise (``model``: the object given
    to fit)."""

    def __init__(self, directory: Path, model: Any) -> None:
        self.directory, self.model = directory, model

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        state = trainer.state
        last = self.directory / "last.pt"
        checkpoint.save_training(last, self.model, state.params, state.optimizer, state)
        if state.improved:  # the same bytes: a second name for last.pt's file, not a second serialization
            checkpoint.copy_training(last, self.directory / "best.pt")


class Progress(Callback):
    """A line per epoch on stderr (loss, validation ELBO, β, seconds, examples/s), and a bar within the epoch
    where one renders: a terminal, or a notebook (a widget with ipywidgets, else a text bar). Written to a file or
    a pipe, stderr gets the lines only: no carriage-return frames."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_epoch_start(self, trainer: Trainer) -> None:
        bar = _bar_class()
        if bar is not None:
            stats = trainer.epoch_stats
            self.bar = bar(
                total=stats.batches,
                desc=f"epoch {stats.index + 1}/{trainer.epochs}",
                file=sys.stderr,
                leave=False,
                unit="step",
            )

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        stats = trainer.epoch_stats
        if self.bar is not None and (step % 10 == 0 or step == stats.batches - 1):  # .item() syncs: not every step
            self.bar.set_postfix(
                loss=f"{stats.loss_sum.item() / max(stats.count, 1):.3f}",
                ex_s=f"{stats.count / max(stats.seconds, 1e-9):.0f}",
            )
            self.bar.update(step + 1 - self.bar.n)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._close()
        print(describe_epoch(record, trainer.epochs), file=sys.stderr)

    def on_fit_end(self, trainer: Trainer, error: BaseException | None) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def describe_epoch(record: dict[str, Any], epochs: int) -> str:
    """One epoch's line: ``epoch 3/10  loss 95.123  val ELBO -97.456  β 1.00  2.1s  5000 ex/s``."""
    val = f"  val ELBO {record['val_elbo']:.3f}" if record["val_elbo"] is not None else ""
    skipped = f"  {record['skipped_batches']} batches skipped" if record.get("skipped_batches") else ""
    return (
        f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.3f}{val}  "
        f"β {record['beta']:.2f}  {record['seconds']:.1f}s  {record['examples_per_s']:.0f} ex/s{skipped}"
    )


def _bar_class() -> type | None:
    """The tqdm class that renders on this stderr, or None where a bar would only write frames into a file."""
    if _in_notebook():
        # tqdm.auto would warn "IProgress not found" without ipywidgets and fall back to the text bar: choose here.
        if importlib.util.find_spec("ipywidgets") is not None:
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm
        from tqdm.std import tqdm as text_tqdm

        return text_tqdm
    isatty = getattr(sys.stderr, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.std import tqdm as text_tqdm

        return text_tqdm
    return None


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (tqdm's own test); IPython is never imported just to ask."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _stacklevel_outside_loop() -> int:
    """The ``stacklevel`` that attributes a warning to the first frame outside the training loop's modules."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in _LOOP_MODULES:
        frame, level = frame.f_back, level + 1
    return level
