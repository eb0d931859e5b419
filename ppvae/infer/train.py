"""``fit``: one training loop for every model/guide pair, ppvae's own or the user's.

The loop is PyTorch's: ``loss = ELBO.differentiable_loss(model, guide, batch)`` with one ``torch.optim.Adam`` over
the pair's parameters. This avoids two costs of Pyro's usual ``SVI`` + ``pyro.optim`` loop (one optimizer per
parameter tensor, a ``.item()`` sync every step) and one trap (parameters fetched from the global store): the
parameters are the model's own tensors, collected once and checked to receive gradients.

Faults: every step checks the loss and the largest gradient entry (one device sync, as a loss check alone); a
NaN/Inf stops training *before* the optimizer step (``on_nonfinite="raise"``) with a :class:`TrainingError` naming the
epoch, the batch and the sample site whose log-probability is non-finite, or skips the batch
(``on_nonfinite="skip"``, counted in the history). Checkpoints are written atomically after every epoch and hold
everything a resumed run needs to end bitwise equal to an uninterrupted one (see
:func:`ppvae.infer.checkpoint.save_training`).

Structure: ``fit`` checks its arguments, builds the batches, the loss (a :class:`~ppvae.infer.objectives.BatchLoss`
taking each step's β) and the callbacks of :mod:`ppvae.infer.callbacks` (non-finite policy, progress, early stopping,
checkpoints), and runs a :class:`Trainer` over a :class:`~ppvae.infer.trainer_state.TrainState`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import ELBO
from torch import nn

from ppvae import io
from ppvae._fs import prepare_dir
from ppvae._local_params import local_module_params
from ppvae._param_store import model_store
from ppvae._rng import fork_rngs
from ppvae._validate import COUNT, NONNEGATIVE, POSITIVE, check, check_seed
from ppvae.data.batches import Batches, make_batches
from ppvae.errors import (
    CheckpointError,
    ConfigError,
    PPVAEError,
    TrainingError,
    describe_out_of_memory,
    is_out_of_memory,
)
from ppvae.infer import checkpoint
from ppvae.infer.callbacks import ON_NONFINITE, Callback, Checkpoint, EarlyStopping, NonFinitePolicy, Progress
from ppvae.infer.config import FitConfig, merge_config
from ppvae.infer.eval_mode import scoring_mode
from ppvae.infer.nonfinite import Fault
from ppvae.infer.objectives import BatchLoss, PairLoss, VAELoss, make_objective
from ppvae.infer.pair import Pair, resolve_device, resolve_pair
from ppvae.infer.params import collect_params, freezing, frozen_by, unreached_error
from ppvae.infer.streams import Stream, StreamLoss, TrainStream, as_streams, round_robin
from ppvae.infer.trainer_state import EpochStats, TrainState

__all__ = ["fit", "FitResult", "FitConfig", "resolve_pair", "ON_NONFINITE", "Trainer", "BetaSchedule", "Stream"]

_DEFAULTS = FitConfig()  # fit's defaults: FitConfig is where they are written


@dataclass
class FitResult:
    """What ``fit`` returns.

    Attributes:
        model, guide: the trained pair (callables; bound methods for a module).
        module: the trained ``nn.Module`` owning the pair, or None for a pair of functions.
        history: one dict per epoch: ``epoch``, ``train_loss`` (negative β-ELBO, nats per datapoint),
            ``val_elbo`` (ELBO with β = 1, nats per datapoint, or None), ``beta``, ``seconds``, ``examples_per_s``,
            ``skipped_batches`` (batches skipped for a non-finite loss or gradient, ``on_nonfinite="skip"``); with
            several streams, ``streams`` (each stream's mean loss per datapoint, its weighted ELBO and aux terms, by
            name) and ``train_loss`` the mean over all their datapoints.
        best_epoch: the epoch whose parameters were kept (best validation ELBO, else the last).
        stopped_early: whether ``patience`` ran out.
        param_state: Pyro parameter-store state of a pair of functions (``pyro.param`` and ``pyro.module``
            sites), the pair's own store that ppvae's evaluate, diagnose and save use; under plain Pyro, ``with
            pyro.get_param_store().scope(result.param_state): ...``. None for a module, which keeps its
            ``pyro.param`` values among its parameters (``module.ppvae_pyro_params``).
    """

    model: Callable
    guide: Callable
    module: nn.Module | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    param_state: dict | None = None
    optimizer: torch.optim.Optimizer | None = None
    # The best score so far and a copy of its parameters (checkpointed, so a resumed run keeps them).
    best_score: float = -math.inf
    best_params: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def train_loss(self) -> list[float]:
        return [h["train_loss"] for h in self.history]

    @property
    def val_elbo(self) -> list[float | None]:
        return [h["val_elbo"] for h in self.history]


def fit(
    model: Any,
    data: Any,
    *,
    guide: Callable | None = None,
    epochs: int = _DEFAULTS.epochs,
    batch_size: int = _DEFAULTS.batch_size,
    lr: float = _DEFAULTS.lr,
    objective: str | ELBO = _DEFAULTS.objective,
    num_particles: int = _DEFAULTS.num_particles,
    vectorize_particles: bool | None = _DEFAULTS.vectorize_particles,
    beta: float = _DEFAULTS.beta,
    kl_warmup: float = _DEFAULTS.kl_warmup,
    val_data: Any = None,
    patience: int | None = _DEFAULTS.patience,
    clip_norm: float | None = _DEFAULTS.clip_norm,
    seed: int | None = _DEFAULTS.seed,
    device: str | torch.device | None = _DEFAULTS.device,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    validate_data: bool = True,
    on_nonfinite: str = _DEFAULTS.on_nonfinite,
    config: FitConfig | None = None,
    freeze: Sequence[str | nn.Module | torch.Tensor] = (),
) -> FitResult:
    """Train a model/guide pair by stochastic variational inference.

    Args:
        model: a :class:`ppvae.VAE`, any object with ``model``/``guide`` methods (an ``nn.Module`` or
            ``PyroModule``), or a model function written with ``pyro.module``/``pyro.param`` (then pass ``guide``).
        data: a tensor or array (called as ``model(x)``), a tuple of tensors (``model(*batch)``), a
            ``torch.utils.data.Dataset`` or ``DataLoader``, ``ppvae.data.DynamicBinarized``, or any re-iterable of
            ready-made batches (a list of tuples ``[(packed, mask, lengths), ...]``: parts may be
            ``PackedSequence``s, masks, lengths; used as given, unshuffled, each epoch). The data tensor (the first of
            a tuple) is used as float32, integer or bool ones included; later tensors or integer arrays in a tuple
            (labels, indices) keep their dtype. Several data streams with their own losses and weights: a list of
            :class:`~ppvae.infer.streams.Stream` (the semi-supervised recipe: unlabelled batches with y enumerated,
            labelled ones with y observed and an auxiliary classifier loss); their batches alternate round-robin,
            an epoch is one pass over the stream with the most batches, and ``history[i]["streams"]`` holds each
            stream's loss (see :mod:`ppvae.infer.streams`).
        epochs: passes over ``data``.
        batch_size: examples per step (ignored for a ``DataLoader``, which batches itself).
        lr: Adam learning rate.
        objective: ``"elbo"`` (Trace_ELBO), ``"meanfield"`` (TraceMeanField_ELBO: analytic KL where registered),
            ``"iwae"`` (RenyiELBO with alpha=0; Burda et al. 2015), ``"enum"`` (TraceEnum_ELBO, with every
            discrete site that supports it enumerated in parallel, as ``config_enumerate`` would mark it; a site's own
            ``infer={"enumerate": ...}`` is kept, ``None`` leaves it sampled; a warning says so when nothing is
            enumerated), or an ``ELBO`` instance (used as it is).
        num_particles: samples of z per datapoint per step (IWAE's K).
        vectorize_particles: draw particles in one vectorized pass (default: yes for a ppvae.VAE).
        beta: weight of the latent terms, β·(log p(z) − log q(z|x)) (Higgins et al. 2017). Scales the latent
            sites in model **and** guide, so it is β·KL, not β·log p(z) − log q(z|x).
        kl_warmup: epochs over which β rises linearly from 0 to ``beta`` (Sønderby et al. 2016).
        val_data: held-out data scored each epoch by the ELBO with β = 1 (nats per datapoint), without
            gradients, in batches of max(batch_size, 1024) rows, halved while memory runs out.
        patience: stop after this many epochs without a better validation ELBO and keep the best parameters.
        clip_norm: clip the global gradient norm to this value.
        seed: seeds the training's draws, on copies of torch's, NumPy's and Python's RNGs, so the caller's global
            random state is the same afterwards (None: training draws from the caller's RNGs and advances them).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, or a ``torch.device``.
        checkpoint_dir: write ``last.pt`` there after every epoch and ``best.pt`` on improvement, atomically
            (temporary file, fsync, rename; the one before kept as ``last.pt.prev``). Checked to be writable, with
            room for the checkpoints, before training starts.
        resume: continue from ``checkpoint_dir/last.pt`` if it exists (same data, same arguments): parameters,
            optimizer state, RNG states and history are restored, so the result equals an uninterrupted run
            (bitwise on CPU); a run killed mid-epoch restarts that epoch. A damaged ``last.pt`` raises
            :class:`CheckpointError` naming the older checkpoint to use.
        progress: print a line per epoch on stderr (loss, validation ELBO, β, seconds, examples/s) and, on a
            terminal or in a notebook, show a progress bar within the epoch; stderr redirected to a file or a pipe
            gets the lines only. False prints nothing.
        validate_data: check data against the likelihood's support before training (a ppvae.VAE only).
        on_nonfinite: what a NaN/Inf loss or gradient does. ``"raise"``: stop with a :class:`TrainingError`
            naming the epoch, batch and sample site, with the parameters from before that batch kept (in the
            model and in ``checkpoint_dir/nonfinite.pt``; ``last.pt`` stays the last good epoch). ``"skip"``: leave
            the batch out (no optimizer step), count it in ``history[i]["skipped_batches"]`` and warn once per
            epoch; an epoch whose every batch is skipped raises.
        config: the settings above as one :class:`~ppvae.infer.config.FitConfig` (the source of their defaults).
            An argument left at its default takes the config's value; one that contradicts the config raises
            :class:`ConfigError`.
        freeze: sub-networks or parameters to keep fixed: names of the module's children or parameters
            (``"encoder"``, ``"decoder.0.weight"``; for a pair of functions, the name of a network the functions
            use), or the modules/tensors themselves. Frozen for the fit (``requires_grad`` False, restored after)
            and left bitwise unchanged. A network frozen beforehand with ``requires_grad_(False)`` stays fixed too,
            also through ``pyro.module``, which would otherwise make it trainable again.

    Every trainable parameter must get a gradient from some batch of the first epoch (of any stream): one that
    gets none would silently keep its initial value, and ``fit`` stops with a :class:`TrainingError` naming it,
    with advice for the case (freeze a pretrained network, give a branch's batches their own stream, ...).

    Returns:
        :class:`FitResult` with a per-epoch ``history``.
    """
    if config is not None:  # the config's settings, unless an argument says otherwise (then the two must agree)
        given = {name: value for name, value in locals().items() if name in FitConfig.names()}
        return fit(
            model, data, guide=guide, val_data=val_data, checkpoint_dir=checkpoint_dir, resume=resume,
            progress=progress, validate_data=validate_data, freeze=freeze, **merge_config(config, given),
        )  # fmt: skip
    _check_arguments(
        epochs, batch_size, lr, num_particles, beta, kl_warmup, val_data, patience, clip_norm, checkpoint_dir, resume
    )
    if on_nonfinite not in ON_NONFINITE:
        raise ConfigError(f"on_nonfinite must be one of {', '.join(map(repr, ON_NONFINITE))}, got {on_nonfinite!r}")
    if seed is not None:
        seed = check_seed(seed)

    model_fn, guide_fn, owner = resolve_pair(model, guide)
    dev = resolve_device(device)
    # Seeded training runs on copies of the global RNGs: the same draws as reseeding them, and the caller's
    # random state is as it was afterwards (without a seed, training draws from, and advances, the caller's).
    with fork_rngs(seed) if seed is not None else nullcontext():
        if owner is not None:
            owner.to(dev)
        streams = as_streams(data)
        train, val = _batches(
            data if streams is None else streams[0].data,
            val_data,
            batch_size if streams is None else streams[0].batch_size or batch_size,
            dev,
            owner if validate_data and (streams is None or streams[0].model is None) else None,
            what="data" if streams is None else f"stream {streams[0].name!r} data",
        )
        is_vae = Pair(model_fn, guide_fn, owner).is_builtin_vae
        if vectorize_particles is None:
            vectorize_particles = is_vae and num_particles > 1
        step_loss, val_loss = _losses(
            model_fn, guide_fn, owner if is_vae else None, objective, num_particles, vectorize_particles
        )
        if streams is None:
            runs = [TrainStream("data", train, step_loss, (model_fn, guide_fn))]
        else:
            runs = _stream_runs(
                streams, train, step_loss, model_fn, guide_fn, owner if validate_data else None, batch_size, dev,
                objective, num_particles, vectorize_particles, is_vae,
            )  # fmt: skip
        ckpt_dir = prepare_dir(checkpoint_dir) if checkpoint_dir is not None else None
        callbacks = _callbacks(model, on_nonfinite, lr, ckpt_dir, progress, val is not None, patience)
        vectorized = vectorize_particles and isinstance(step_loss, PairLoss)  # the direct VAE ELBO always vectorizes

        def memory_advice(n: int) -> str:
            return (
                f"one step holds batch_size × num_particles = {n} × {num_particles} draws of the "
                "model: lower batch_size or num_particles" + (", or vectorize_particles=False" if vectorized else "")
            )

        failure: TrainingError | None = None
        firsts = [(run.pair, run.batches.first()) for run in runs]

        def exercise() -> None:  # every stream's pair on its first batch: it creates every pyro.param site
            for (m, g), first in firsts:
                g(*first)
                m(*first)

        with ExitStack() as stack:
            stack.enter_context(freezing(freeze, model_fn, guide_fn, owner))
            frozen = frozen_by(model_fn, guide_fn, owner)  # before pyro.module makes them trainable again
            # The model's own parameter store (ppvae._param_store): its kept pyro.param values, else an empty one, so
            # nothing stale from an earlier model under the same names; afterwards the model keeps what it trained.
            param_state = stack.enter_context(model_store(model_fn, guide_fn, owner, exercise=exercise, training=True))
            if owner is not None:
                stack.enter_context(local_module_params())
            if is_vae:
                # Support was checked up front; per-step argument validation only costs time in the hot loop.
                stack.enter_context(pyro.validation_enabled(False))
            found: dict[int, tuple[str, torch.Tensor]] = {}
            for (m, g), first in firsts:
                for name, p in collect_params(m, g, owner, first, frozen):
                    found.setdefault(id(p), (name, p))
            params = list(found.values())
            if ckpt_dir is not None:
                checkpoint.check_space(ckpt_dir, params)
            state = TrainState(params, adam([p for _, p in params], lr=lr))
            if resume and ckpt_dir is not None:
                _resume(ckpt_dir, state, owner)
            trainer = Trainer(
                state,
                runs,
                epochs=epochs,
                beta=BetaSchedule(beta, kl_warmup * len(runs) * max(len(r.batches) for r in runs)),
                val=val,
                val_loss=val_loss,
                clip_norm=clip_norm,
                callbacks=callbacks,
                pair=(model_fn, guide_fn),
                device=dev,
                memory_advice=memory_advice,
            )
            try:
                trainer.fit()
            except TrainingError as err:  # leave the state before the failure in place (the store, for functions)
                failure = err
        if failure is not None:
            raise failure
        return FitResult(
            model_fn,
            guide_fn,
            owner,
            history=state.history,
            best_epoch=state.best_epoch,
            stopped_early=state.stopped_early,
            param_state=None if owner is not None else param_state,
            optimizer=state.optimizer,
            best_score=state.best_score,
            best_params=state.best_params,
        )


def _batches(
    data: Any,
    val_data: Any,
    batch_size: int,
    dev: torch.device,
    check_against: nn.Module | None,
    what: str = "data",
) -> tuple[Batches, Batches | None]:
    """Shuffled training batches and unshuffled validation ones (in batches of max(batch_size, 1024) rows: scoring
    holds no gradients), both checked against ``check_against``'s likelihood when given; ``what`` names the data in
    errors."""
    train = make_batches(data, batch_size, dev, shuffle=True, what=what)
    val = (
        make_batches(val_data, max(batch_size, 1024), dev, shuffle=False, what="val_data", strict=False)
        if val_data is not None
        else None
    )
    if check_against is not None:
        for b in (train, val):
            if b is not None:
                b.check_against(check_against)
    return train, val


def _stream_runs(
    streams: list[Stream],
    first_batches: Batches,
    fit_loss: BatchLoss,
    model_fn: Callable,
    guide_fn: Callable,
    check_against: nn.Module | None,
    batch_size: int,
    dev: torch.device,
    objective: str | ELBO,
    num_particles: int,
    vectorize_particles: bool,
    is_vae: bool,
) -> list[TrainStream]:
    """Each stream's batches and step loss: fit's loss where the stream uses fit's pair and objective, else the
    stream's objective on the stream's pair, weighted, plus its auxiliary loss."""
    runs = []
    for k, st in enumerate(streams):
        what = f"stream {st.name!r} data"
        if k == 0:
            batches = first_batches
        else:
            # A small stream (a few labels) without a batch_size of its own is one batch of all its rows.
            batches = make_batches(
                st.data, st.batch_size or batch_size, dev, shuffle=True, what=what, strict=st.batch_size is not None
            )
            if check_against is not None and st.model is None:
                batches.check_against(check_against)
        m, g = (st.model, st.guide) if st.model is not None else (model_fn, guide_fn)
        own = st.model is None and (st.objective is None or st.objective == objective)
        elbo = None
        if st.elbo:
            if own:
                elbo = fit_loss
            else:
                obj = objective if st.objective is None else st.objective
                mpn = 1 if is_vae and st.model is None else None
                elbo = PairLoss(m, g, make_objective(obj, num_particles, vectorize_particles, max_plate_nesting=mpn))
        plain = st.elbo and st.weight == 1.0 and st.aux is None
        loss = elbo if plain else StreamLoss(elbo, st.weight, st.aux, st.aux_weight)
        runs.append(TrainStream(st.name, batches, loss, (m, g)))
    return runs


def _losses(
    model_fn: Callable,
    guide_fn: Callable,
    vae: nn.Module | None,
    objective: str | ELBO,
    num_particles: int,
    vectorize_particles: bool,
) -> tuple[BatchLoss, BatchLoss]:
    """The step's loss and the validation loss (ELBO, β = 1, one particle).

    ``vae``: the module when the pair is an unmodified ppvae.VAE with its own guide (``Pair.is_builtin_vae``), else
    None; a VAE given with another guide is trained through Pyro's ELBO with that guide. Such a VAE with objective
    "elbo" gets the direct ELBO (Trace_ELBO's estimator without tracing,
    see :func:`ppvae.infer.objectives.vae_elbo_loss`: the same values, much less Python per step); any other pair
    Pyro's ELBOs. The objective is built either way, so a bad one is refused the same way for every pair.
    """
    max_plate_nesting = 1 if vae is not None else None  # a VAE's only plate is its data plate
    loss_fn = make_objective(objective, num_particles, vectorize_particles, max_plate_nesting=max_plate_nesting)
    val_loss_fn = make_objective("elbo", 1, False, max_plate_nesting=max_plate_nesting)
    if vae is not None and objective == "elbo":
        return VAELoss(vae, num_particles), VAELoss(vae)
    return PairLoss(model_fn, guide_fn, loss_fn), PairLoss(model_fn, guide_fn, val_loss_fn)


def _callbacks(
    model: Any,
    on_nonfinite: str,
    lr: float,
    ckpt_dir: Path | None,
    progress: bool,
    validating: bool,
    patience: int | None,
) -> list[Callback]:
    """fit's callbacks, in the order their epoch-end hooks must run: the skip warning and the epoch's line come
    first, early stopping sets ``stopped_early`` before the checkpoint records it."""
    callbacks: list[Callback] = [NonFinitePolicy(on_nonfinite, lr=lr, directory=ckpt_dir, model=model)]
    if progress:
        callbacks.append(Progress())
    if validating:  # keep the best validation epoch's parameters (and stop early with patience)
        callbacks.append(EarlyStopping(patience))
    if ckpt_dir is not None:
        callbacks.append(Checkpoint(ckpt_dir, model))
    return callbacks


def adam(params: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` with PyTorch's fused kernel where it has one for these tensors (real floating point, on
    CPU or CUDA; torch ≥ 2.4): the same algorithm in one kernel per tensor instead of about ten, 0.47 ms a step
    against 1.65 ms for the 784-400-50 VAE's ten tensors on one CPU thread (``benchmarks/RESULTS.md``), equal to
    the default implementation up to float rounding (about 1e-7 after 100 steps). Other tensors (complex, other
    devices) get the default implementation: torch checks them only at the first step, too late to choose. Its state
    dict is the default one's, so checkpoints load either way."""
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if fusable:
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except (RuntimeError, ValueError, TypeError):  # a torch before 2.4: no fused kernel on CPU
            pass
    return torch.optim.Adam(params, lr=lr)


def _check_arguments(
    epochs: Any,
    batch_size: Any,
    lr: Any,
    num_particles: Any,
    beta: Any,
    kl_warmup: Any,
    val_data: Any,
    patience: Any,
    clip_norm: Any,
    checkpoint_dir: Any,
    resume: bool,
) -> None:
    """fit's numeric arguments and the combinations it refuses, before any data is looked at."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("num_particles", num_particles)):
        check(name, value, COUNT)
    check("lr", lr, POSITIVE)
    check("beta", beta, NONNEGATIVE)
    check("kl_warmup", kl_warmup, NONNEGATIVE)
    check("clip_norm", clip_norm, None, POSITIVE)
    if check("patience", patience, None, COUNT) is not None:
        if val_data is None:
            raise ConfigError("patience needs val_data: early stopping watches the validation ELBO")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs checkpoint_dir, where the checkpoint to resume from lives")


@dataclass(frozen=True)
class BetaSchedule:
    """β of each step: rising linearly from β/warmup_steps to ``beta`` over ``warmup_steps`` steps (KL warm-up,
    Sønderby et al. 2016), then constant; ``warmup_steps`` 0 is ``beta`` throughout."""

    beta: float
    warmup_steps: float = 0.0

    def __call__(self, global_step: int) -> float:
        """β of step ``global_step``, counted from 0 over the whole run (epoch × batches per epoch + batch)."""
        if self.warmup_steps > 0:
            return self.beta * min(1.0, (global_step + 1) / self.warmup_steps)
        return self.beta


class Trainer:
    """The loop under :func:`fit`: epochs of steps over ``train``, each a :meth:`training_step` of ``loss``, with
    the faults and bookkeeping every loop needs, and :class:`~ppvae.infer.callbacks.Callback` hooks for the rest.

    A step: β from the schedule, forward and backward (:meth:`training_step`), one device sync checking the loss
    and the largest gradient entry, then the optimizer step, or ``on_nonfinite`` for a NaN/Inf (the batch is left
    out unless a callback raises). An epoch: its steps, the record appended to ``state.history`` (validation ELBO
    with β = 1 on ``val``), the best epoch updated, ``on_epoch_end``. Training stops after ``epochs`` or when
    ``state.stopped_early`` is set. A step that runs out of memory raises a :class:`TrainingError` naming the step
    and ``memory_advice(batch size)``.

    ``pair`` (model and guide) is traced again to name the sites of a faulty step; ``device`` holds the data.
    """

    def __init__(
        self,
        state: TrainState,
        train: Batches | Sequence[TrainStream],
        loss: BatchLoss | None = None,
        *,
        epochs: int,
        beta: Callable[[int], float] = BetaSchedule(1.0),
        val: Batches | None = None,
        val_loss: BatchLoss | None = None,
        clip_norm: float | None = None,
        callbacks: Sequence[Callback] = (),
        pair: tuple[Callable, Callable],
        device: torch.device,
        memory_advice: Callable[[int], str] = lambda n: f"one step holds {n} datapoints: lower the batch size",
    ) -> None:
        if isinstance(train, Batches):
            if loss is None:
                raise ConfigError("Trainer needs a loss for its batches (or a list of TrainStreams)")
            streams = [TrainStream("data", train, loss, pair)]
        else:
            streams = list(train)
        self.streams = streams
        self.state, self.train, self.loss = state, streams[0].batches, streams[0].loss
        self.epochs, self.beta = epochs, beta
        self.val, self.val_loss = val, val_loss if val_loss is not None else self.loss
        self.clip_norm = clip_norm
        self.callbacks = list(callbacks)
        self.pair, self.device, self.memory_advice = pair, device, memory_advice
        # Steps per epoch: round-robin over the streams, as many rounds as the longest has batches.
        self.steps_per_epoch = len(streams) * max(len(st.batches) for st in streams)
        self.epoch_stats = EpochStats(state.epoch, self.steps_per_epoch, torch.zeros((), device=device))
        self._trainable = [p for _, p in state.params]
        # Only the step-end hooks someone overrides run per step: the loop's overhead stays off the hot path.
        self._step_hooks = [cb for cb in self.callbacks if type(cb).on_step_end is not Callback.on_step_end]
        # Dead parameters are caught over the first epoch of a fresh run (a resumed one was checked when it
        # began): a parameter some batches or some streams do not reach is not dead, one no batch reaches is.
        self._gradients_checked = state.epoch > 0
        self._reached: set[int] = set()

    def fit(self) -> TrainState:
        """Train until ``epochs`` epochs are done or ``state.stopped_early``; the state, trained in place."""
        error: BaseException | None = None
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self)
            while self.state.epoch < self.epochs and not self.state.stopped_early:
                self._epoch()
        except BaseException as err:
            error = err
            raise
        finally:
            for cb in self.callbacks:
                cb.on_fit_end(self, error)
        return self.state

    def training_step(self, batch: tuple, beta: float, stream: TrainStream | None = None) -> torch.Tensor:
        """Forward and backward on one batch of ``stream`` (default: the first): the loss per datapoint, with the
        gradients in the parameters' ``.grad``. The piece to replace for another kind of step; with several
        streams it is called with the batch's stream."""
        stream = self.streams[0] if stream is None else stream
        self.state.optimizer.zero_grad(set_to_none=True)
        loss = stream.loss(batch, beta) / stream.batches.batch_len(batch)
        loss.backward()
        return loss

    @torch.no_grad()
    def validate(self) -> float | None:
        """The mean ELBO (β = 1) on ``val`` in nats per datapoint, or None without validation data.

        Scored in eval mode (dropout off, BatchNorm on its running statistics), as evaluate scores: the modules'
        training flags and buffers are restored afterwards, so the next epoch trains as before."""
        if self.val is None:
            return None
        with scoring_mode(*self.pair):
            return _mean_elbo(self.val_loss, self.val)

    def _epoch(self) -> None:
        state = self.state
        stats = self.epoch_stats = EpochStats(state.epoch, self.steps_per_epoch, torch.zeros((), device=self.device))
        for cb in self.callbacks:
            cb.on_epoch_start(self)
        for step, (stream, batch) in enumerate(round_robin(self.streams)):
            self._step(step, batch, stream)
        if not self._gradients_checked:
            self._gradients_checked = True
            unreached = [(name, p) for name, p in state.params if id(p) not in self._reached]
            if unreached and stats.count:
                raise unreached_error(unreached, self._owner(), [st.name for st in self.streams])
        if stats.skipped and stats.count == 0:
            lr = state.optimizer.param_groups[0]["lr"]
            raise TrainingError(
                f"every batch of epoch {stats.index + 1} ({stats.skipped}) had a non-finite loss or gradient, so "
                f"training cannot go on; first: {stats.first_fault}. Lower the learning rate (lr={lr:g}) or "
                "check the data against the likelihood's support"
            )
        seconds = stats.seconds  # the steps' time: validation is not part of examples/s
        record = {
            "epoch": stats.index + 1,
            "train_loss": stats.loss_sum.item() / stats.count,
            "val_elbo": self.validate(),
            "beta": stats.beta,
            "seconds": seconds,
            "examples_per_s": stats.count / seconds,
            "skipped_batches": stats.skipped,
        }
        if len(self.streams) > 1:  # each stream's mean loss per datapoint (its weighted terms)
            record["streams"] = {
                name: (total.item() / stats.stream_counts[name] if stats.stream_counts.get(name) else None)
                for name, total in stats.stream_sums.items()
            }
        state.history.append(record)
        state.observe(record["val_elbo"] if self.val is not None else -record["train_loss"])
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)

    def _owner(self) -> nn.Module | None:
        model_fn = self.pair[0]
        owner = getattr(model_fn, "__self__", None)
        return owner if isinstance(owner, nn.Module) else None

    def _step(self, step: int, batch: tuple, stream: TrainStream) -> None:
        stats = self.epoch_stats
        stats.beta = beta = self.beta(stats.index * stats.batches + step)
        n = stream.batches.batch_len(batch)
        invalid = None
        try:
            # One stream: the call a subclass written for one stream overrides, unchanged.
            single = len(self.streams) == 1
            loss = self.training_step(batch, beta) if single else self.training_step(batch, beta, stream)
        except ValueError as err:  # Pyro/torch validation: a distribution got NaN/Inf or bad values
            if isinstance(err, PPVAEError) or "invalid values" not in str(err):
                raise
            loss, invalid = None, err
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            raise TrainingError(
                f"out of memory at epoch {stats.index + 1}, batch {step + 1} on {self.device} "
                f"({describe_out_of_memory(err)}); {self.memory_advice(n)}"
            ) from err
        grad_sum = None if loss is None else _grad_sum(self._trainable)
        if loss is None or not _all_finite(loss, grad_sum, self._trainable):
            model_fn, guide_fn = stream.pair
            fault = Fault(
                stats.index + 1, step + 1, stats.batches, loss, invalid,
                self.state.params, model_fn, guide_fn, batch, self.device,
            )  # fmt: skip
            for cb in self.callbacks:
                cb.on_nonfinite(self, fault)
            stats.skip(fault)  # no callback stopped training: leave the batch out, no optimizer step
            return
        if self.clip_norm is not None:
            nn.utils.clip_grad_norm_(self._trainable, self.clip_norm)
        if not self._gradients_checked:
            self._reached.update(id(p) for p in self._trainable if p.grad is not None)
        self.state.optimizer.step()
        stats.loss_sum += loss.detach() * n
        stats.count += n
        if len(self.streams) > 1:
            stats.add_stream(stream.name, loss.detach() * n, n)
        for cb in self._step_hooks:
            cb.on_step_end(self, step)


def _resume(ckpt_dir: Path, state: TrainState, owner: Any) -> int:
    """Restore ``ckpt_dir/last.pt`` if there is one; the number of finished epochs (0: start afresh)."""
    last = ckpt_dir / "last.pt"
    if last.exists():
        return checkpoint.restore_training(last, state.params, state.optimizer, state, owner)
    if io.previous(last).exists():  # only a writer other than ppvae's leaves .prev without the file itself
        raise CheckpointError(
            f"cannot resume: {last} is missing but {io.previous(last)} exists; rename it to {last.name} to resume "
            "from it, or start over in a new checkpoint_dir"
        )
    return 0


def _grad_sum(params: list[torch.Tensor]) -> torch.Tensor | None:
    """Sum of every gradient entry: NaN or infinite if any entry is (or, rarely, if a huge finite sum overflows:
    :func:`_all_finite` then looks at the entries). None without gradients.

    A sum is the cheapest reduction that no non-finite entry can survive: 0.09 ms per step for the 784-400-50 VAE
    against 1.9 ms for the largest absolute entry (``torch._foreach_norm(grads, inf)``), 20% of a training step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.stack([g.sum() for g in grads]).sum()


def _grad_max(params: list[torch.Tensor]) -> torch.Tensor | None:
    """Largest absolute gradient entry (NaN/Inf if any entry is) in one fused kernel; None without gradients.

    The max, not the L2 norm: huge but finite gradients are Adam's to scale, not a fault, and a norm can overflow.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.stack(torch._foreach_norm(grads, math.inf)).max()


def _all_finite(loss: torch.Tensor, grad_sum: torch.Tensor | None, params: list[torch.Tensor]) -> bool:
    """One device sync for the loss and the gradients together (a second, exact look only when the sum is not
    finite: a sum of finite entries can overflow, and huge finite gradients are Adam's to scale, not a fault)."""
    if grad_sum is None:
        return bool(torch.isfinite(loss))
    if bool(torch.isfinite(loss) & torch.isfinite(grad_sum)):
        return True
    grad_max = _grad_max(params)
    return bool(torch.isfinite(loss) & torch.isfinite(grad_max))


@torch.no_grad()
def _mean_elbo(loss_fn: BatchLoss, batches: Batches) -> float:
    """ELBO (β = 1, one particle) averaged over all datapoints of ``batches``, nats per datapoint.

    Without gradients (a score, not a step). Out of memory: in-memory data are scored again in batches half as
    large, down to one row; a DataLoader (which sets its own batch size) stops with a :class:`TrainingError`.
    """
    while True:
        try:
            total, count = 0.0, 0
            with torch.no_grad():
                for batch in batches:
                    total -= loss_fn(batch, 1.0).item()
                    count += batches.batch_len(batch)
            return total / count
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            if batches.loader is not None or batches.batch_size == 1:
                fix = (
                    "give val_data as a DataLoader with smaller batches"
                    if batches.loader is not None
                    else ("one datapoint does not fit in memory")
                )
                raise TrainingError(
                    f"out of memory scoring val_data in batches of {batches.batch_size} rows "
                    f"({describe_out_of_memory(err)}); {fix}"
                ) from err
            batches = batches.with_batch_size(max(1, batches.batch_size // 2))
