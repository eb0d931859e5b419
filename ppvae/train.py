"""``fit``: one training loop for every model/guide pair, ppvae's own or the user's.

The loop is PyTorch's: ``loss = ELBO.differentiable_loss(model, guide, batch)`` with one ``torch.optim.Adam`` over
the pair's parameters. This avoids two costs of Pyro's usual ``SVI`` + ``pyro.optim`` loop (one optimizer per
parameter tensor, a ``.item()`` sync every step) and one trap (parameters fetched from the global store): the
parameters are the model's own tensors, collected once and checked to receive gradients.

Faults: every step checks the loss and the largest gradient entry (one device sync, as a loss check alone); a
NaN/Inf stops training *before* the optimizer step (``on_nonfinite="raise"``) with a :class:`TrainingError` naming the
epoch, the batch and the sample site whose log-probability is non-finite, or skips the batch
(``on_nonfinite="skip"``, counted in the history). Checkpoints are written atomically after every epoch and hold
everything a resumed run needs to end bitwise equal to an uninterrupted one (see :func:`ppvae.io.save_training`).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import ELBO
from torch import nn

from . import io
from .batches import Batches, make_batches
from .data import check_seed
from .errors import (
    CheckpointError,
    ConfigError,
    PPVAEError,
    TrainingError,
    describe_out_of_memory,
    is_out_of_memory,
)
from .nonfinite import blame_sites, describe_fault
from .objectives import BatchLoss, PairLoss, VAELoss, has_fast_elbo, make_objective
from .params import collect_params, local_module_params

__all__ = ["fit", "FitResult", "resolve_pair", "ON_NONFINITE"]

ON_NONFINITE = ("raise", "skip")


@dataclass
class FitResult:
    """What ``fit`` returns.

    Attributes:
        model, guide: the trained pair (callables; bound methods for a module).
        module: the trained ``nn.Module`` owning the pair, or None for a pair of functions.
        history: one dict per epoch: ``epoch``, ``train_loss`` (negative β-ELBO, nats per datapoint),
            ``val_elbo`` (ELBO with β = 1, nats per datapoint, or None), ``beta``, ``seconds``, ``examples_per_s``,
            ``skipped_batches`` (batches skipped for a non-finite loss or gradient, ``on_nonfinite="skip"``).
        best_epoch: the epoch whose parameters were kept (best validation ELBO, else the last).
        stopped_early: whether ``patience`` ran out.
        param_state: Pyro parameter-store state of a pair of functions (``pyro.param`` sites); ``with
            pyro.get_param_store().scope(result.param_state): ...`` evaluates that pair later.
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


def resolve_pair(model: Any, guide: Callable | None = None) -> tuple[Callable, Callable, nn.Module | None]:
    """Return ``(model_fn, guide_fn, owner)`` for a ``VAE``, a module with ``model``/``guide`` methods, or functions."""
    owner = model if isinstance(model, nn.Module) else None
    if guide is None:
        if callable(getattr(model, "model", None)) and callable(getattr(model, "guide", None)):
            return model.model, model.guide, owner
        raise ConfigError(
            f"fit needs a guide: pass an object with model and guide methods (a ppvae.VAE) or guide=..., "
            f"got {type(model).__name__} with no guide"
        )
    model_fn = model.model if callable(getattr(model, "model", None)) else model
    if not callable(model_fn) or not callable(guide):
        raise ConfigError(f"model and guide must be callables, got {type(model).__name__} and {type(guide).__name__}")
    return model_fn, guide, owner


def _device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available here; use device='cpu'")
    return dev


def _check_positive(name: str, value: Any, kind: type = int, allow_zero: bool = False) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if kind is float:
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value >= 0 if allow_zero else value > 0)
        )
    if not ok:
        bound = "≥ 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a {'number' if kind is float else 'whole number'} {bound}, got {value!r}")


def fit(
    model: Any,
    data: Any,
    *,
    guide: Callable | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    objective: str | ELBO = "elbo",
    num_particles: int = 1,
    vectorize_particles: bool | None = None,
    beta: float = 1.0,
    kl_warmup: float = 0.0,
    val_data: Any = None,
    patience: int | None = None,
    clip_norm: float | None = None,
    seed: int | None = 0,
    device: str | torch.device | None = "auto",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    validate_data: bool = True,
    on_nonfinite: str = "raise",
) -> FitResult:
    """Train a model/guide pair by stochastic variational inference.

    Args:
        model: a :class:`ppvae.VAE`, any object with ``model``/``guide`` methods (an ``nn.Module`` or
            ``PyroModule``), or a model function written with ``pyro.module``/``pyro.param`` (then pass ``guide``).
        data: a tensor or array (called as ``model(x)``), a tuple of tensors (``model(*batch)``), a
            ``torch.utils.data.Dataset`` or ``DataLoader``, or ``ppvae.data.DynamicBinarized``. The data tensor
            (the first of a tuple) is used as float32, integer or bool ones included; later tensors or integer
            arrays in a tuple (labels, indices) keep their dtype.
        epochs: passes over ``data``.
        batch_size: examples per step (ignored for a ``DataLoader``, which batches itself).
        lr: Adam learning rate.
        objective: ``"elbo"`` (Trace_ELBO), ``"meanfield"`` (TraceMeanField_ELBO: analytic KL where registered),
            ``"iwae"`` (RenyiELBO with alpha=0; Burda et al. 2015), ``"enum"`` (TraceEnum_ELBO for enumerated
            discrete latents), or an ``ELBO`` instance.
        num_particles: samples of z per datapoint per step (IWAE's K).
        vectorize_particles: draw particles in one vectorized pass (default: yes for a ppvae.VAE).
        beta: weight of the latent terms, β·(log p(z) − log q(z|x)) (Higgins et al. 2017). Scales the latent
            sites in model **and** guide, so it is β·KL, not β·log p(z) − log q(z|x).
        kl_warmup: epochs over which β rises linearly from 0 to ``beta`` (Sønderby et al. 2016).
        val_data: held-out data scored each epoch by the ELBO with β = 1 (nats per datapoint), without
            gradients, in batches of max(batch_size, 1024) rows, halved while memory runs out.
        patience: stop after this many epochs without a better validation ELBO and keep the best parameters.
        clip_norm: clip the global gradient norm to this value.
        seed: seeds torch, numpy and Python's RNG (None leaves them as they are).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, or a ``torch.device``.
        checkpoint_dir: write ``last.pt`` there after every epoch and ``best.pt`` on improvement, atomically
            (temporary file, fsync, rename; the one before kept as ``last.pt.prev``). Checked to be writable, with
            room for the checkpoints, before training starts.
        resume: continue from ``checkpoint_dir/last.pt`` if it exists (same data, same arguments): parameters,
            optimizer state, RNG states and history are restored, so the result equals an uninterrupted run
            (bitwise on CPU); a run killed mid-epoch restarts that epoch. A damaged ``last.pt`` raises
            :class:`CheckpointError` naming the older checkpoint to use.
        progress: show a progress bar with the loss and examples/s on stderr.
        validate_data: check data against the likelihood's support before training (a ppvae.VAE only).
        on_nonfinite: what a NaN/Inf loss or gradient does. ``"raise"``: stop with a :class:`TrainingError`
            naming the epoch, batch and sample site, with the parameters from before that batch kept (in the
            model and in ``checkpoint_dir/nonfinite.pt``; ``last.pt`` stays the last good epoch). ``"skip"``: leave
            the batch out (no optimizer step), count it in ``history[i]["skipped_batches"]`` and warn once per
            epoch; an epoch whose every batch is skipped raises.

    Returns:
        :class:`FitResult` with a per-epoch ``history``.
    """
    _check_positive("epochs", epochs)
    _check_positive("batch_size", batch_size)
    _check_positive("lr", lr, float)
    _check_positive("num_particles", num_particles)
    _check_positive("beta", beta, float, allow_zero=True)
    _check_positive("kl_warmup", kl_warmup, float, allow_zero=True)
    if patience is not None:
        _check_positive("patience", patience)
        if val_data is None:
            raise ConfigError("patience needs val_data: early stopping watches the validation ELBO")
    if clip_norm is not None:
        _check_positive("clip_norm", clip_norm, float)
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs checkpoint_dir, where the checkpoint to resume from lives")
    if on_nonfinite not in ON_NONFINITE:
        raise ConfigError(f"on_nonfinite must be one of {', '.join(map(repr, ON_NONFINITE))}, got {on_nonfinite!r}")
    if seed is not None:
        seed = check_seed(seed)

    model_fn, guide_fn, owner = resolve_pair(model, guide)
    dev = _device(device)
    if seed is not None:
        pyro.set_rng_seed(seed)
    if owner is not None:
        owner.to(dev)
    train = make_batches(data, batch_size, dev, shuffle=True, what="data")
    val = (
        make_batches(val_data, max(batch_size, 1024), dev, shuffle=False, what="val_data", strict=False)
        if val_data is not None
        else None
    )
    if validate_data and owner is not None:
        for b in (train, val):
            if b is not None:
                b.check_against(owner)
    is_vae = owner is not None and hasattr(owner, "likelihood") and hasattr(owner, "encode")
    if vectorize_particles is None:
        vectorize_particles = is_vae and num_particles > 1
    loss_fn = make_objective(objective, num_particles, vectorize_particles, max_plate_nesting=1 if is_vae else None)
    val_loss_fn = make_objective("elbo", 1, False, max_plate_nesting=1 if is_vae else None)
    fast = has_fast_elbo(owner) and objective == "elbo"
    ckpt_dir = io.prepare_dir(checkpoint_dir) if checkpoint_dir is not None else None

    store = pyro.get_param_store()
    failure: TrainingError | None = None
    with ExitStack() as stack:
        # Each fit gets its own parameter store: nothing stale from an earlier model under the same names.
        param_state = stack.enter_context(store.scope())
        if owner is not None:
            stack.enter_context(local_module_params())
        if is_vae:
            # Support was checked up front; per-step argument validation only costs time in the hot loop.
            stack.enter_context(pyro.validation_enabled(False))
        first = train.first()
        params = collect_params(model_fn, guide_fn, owner, first)
        if ckpt_dir is not None:
            io.check_space(ckpt_dir, params)
        optimizer = torch.optim.Adam([p for _, p in params], lr=lr)
        result = FitResult(
            model_fn, guide_fn, owner, param_state=None if owner is not None else param_state, optimizer=optimizer
        )
        start_epoch = _resume(ckpt_dir, params, optimizer, result, owner) if resume and ckpt_dir is not None else 0
        steps_per_epoch = len(train)
        warmup_steps = kl_warmup * steps_per_epoch
        beta_now = float(beta)
        step_loss: BatchLoss
        val_loss: BatchLoss
        if fast:  # a ppvae.VAE: Trace_ELBO's estimator without tracing (see objectives.vae_elbo_loss)
            step_loss, val_loss = VAELoss(owner, num_particles), VAELoss(owner)
        else:
            step_loss, val_loss = PairLoss(model_fn, guide_fn, loss_fn), PairLoss(model_fn, guide_fn, val_loss_fn)

        bad_epochs = len(result.history) - (result.best_epoch or 0)
        checked_grads = start_epoch > 0
        trainable = [p for _, p in params]
        try:
            for epoch in range(start_epoch, epochs):
                if result.stopped_early:  # resumed from the checkpoint of the epoch that ran out of patience
                    break
                t0 = time.perf_counter()
                total, count, skipped, first_skip = torch.zeros((), device=dev), 0, 0, ""
                bar = _progress(progress, steps_per_epoch, epoch, epochs)
                for step, batch in enumerate(train):
                    global_step = epoch * steps_per_epoch + step
                    beta_now = beta * min(1.0, (global_step + 1) / warmup_steps) if warmup_steps > 0 else beta
                    n = train.batch_len(batch)
                    optimizer.zero_grad(set_to_none=True)
                    invalid = None
                    try:
                        loss = step_loss(batch, beta_now) / n
                        loss.backward()
                    except ValueError as err:  # Pyro/torch validation: a distribution got NaN/Inf or bad values
                        if isinstance(err, PPVAEError) or "invalid values" not in str(err):
                            raise
                        loss, invalid = None, err
                    except (RuntimeError, MemoryError) as err:
                        if not is_out_of_memory(err):
                            raise
                        if bar is not None:
                            bar.close()
                        raise TrainingError(
                            f"out of memory at epoch {epoch + 1}, batch {step + 1} on {dev} "
                            f"({describe_out_of_memory(err)}); "
                            f"one step holds batch_size × num_particles = {n} × {num_particles} draws of the "
                            "model: lower batch_size or num_particles"
                            + (", or vectorize_particles=False" if vectorize_particles and not fast else "")
                        ) from err
                    if loss is not None and not checked_grads:
                        _check_gradients(params)
                        checked_grads = True
                    grad_max = None if loss is None else _grad_max(trainable)
                    if loss is None or not _all_finite(loss, grad_max):
                        where = f"epoch {epoch + 1}, batch {step + 1} of {steps_per_epoch}"
                        what = describe_fault(loss, params, invalid)
                        if on_nonfinite == "skip":
                            skipped += 1
                            if not first_skip:  # trace only the first one of an epoch: skipping stays cheap
                                first_skip = f"{what} at {where}{blame_sites(model_fn, guide_fn, batch, dev)}"
                            continue
                        if bar is not None:
                            bar.close()
                        kept = _keep_last_good(ckpt_dir, model, params, optimizer, result, epoch, step)
                        raise TrainingError(
                            f"{what} at {where}{blame_sites(model_fn, guide_fn, batch, dev)}; training stopped "
                            f"with the parameters from before this batch ({kept}). Likely causes: a learning rate too "
                            f"high (lr={lr:g}: try {lr / 10:g}, or clip_norm=...), a likelihood scale collapsing "
                            "to 0, or data outside the likelihood's support; on_nonfinite='skip' skips such batches"
                        )
                    if clip_norm is not None:
                        nn.utils.clip_grad_norm_(trainable, clip_norm)
                    optimizer.step()
                    total += loss.detach() * n
                    count += n
                    if bar is not None and (step % 10 == 0 or step == steps_per_epoch - 1):
                        seconds = time.perf_counter() - t0
                        bar.set_postfix(
                            loss=f"{total.item() / max(count, 1):.3f}", ex_s=f"{count / max(seconds, 1e-9):.0f}"
                        )
                        bar.update(step + 1 - bar.n)
                if bar is not None:
                    bar.close()
                if skipped:
                    if count == 0:
                        raise TrainingError(
                            f"every batch of epoch {epoch + 1} ({skipped}) had a non-finite loss or gradient, so "
                            f"training cannot go on; first: {first_skip}. Lower the learning rate (lr={lr:g}) or "
                            "check the data against the likelihood's support"
                        )
                    warnings.warn(
                        f"skipped {skipped} of {steps_per_epoch} batches in epoch {epoch + 1} with a non-finite "
                        f"loss or gradient (on_nonfinite='skip'); first: {first_skip}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                seconds = time.perf_counter() - t0
                record = {
                    "epoch": epoch + 1,
                    "train_loss": total.item() / count,
                    "val_elbo": _mean_elbo(val_loss, val) if val is not None else None,
                    "beta": beta_now,
                    "seconds": seconds,
                    "examples_per_s": count / seconds,
                    "skipped_batches": skipped,
                }
                result.history.append(record)
                if progress:
                    print(_describe(record, epochs), file=sys.stderr)
                score = record["val_elbo"] if val is not None else -record["train_loss"]
                improved = score > result.best_score
                if improved:
                    result.best_score = score
                    result.best_params = {name: p.detach().clone() for name, p in params}
                    result.best_epoch = epoch + 1
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                result.stopped_early = patience is not None and bad_epochs >= patience
                if ckpt_dir is not None:
                    io.save_training(ckpt_dir / "last.pt", model, params, optimizer, result)
                    if improved:
                        io.save_training(ckpt_dir / "best.pt", model, params, optimizer, result)
            if val is not None and result.best_params is not None:
                with torch.no_grad():  # keep the parameters of the best validation epoch
                    for name, p in params:
                        p.copy_(result.best_params[name])
        except TrainingError as err:  # leave the state before the failure in place (the store, for functions)
            failure = err
    if owner is None:
        # A pair of functions reads its parameters from the global store: leave the trained ones there.
        store.set_state(param_state)
    if failure is not None:
        raise failure
    return result


def _resume(
    ckpt_dir: Path, params: list[tuple[str, torch.Tensor]], optimizer: Any, result: FitResult, owner: Any
) -> int:
    """Restore ``ckpt_dir/last.pt`` if there is one; the number of finished epochs (0: start afresh)."""
    last = ckpt_dir / "last.pt"
    if last.exists():
        return io.restore_training(last, params, optimizer, result, owner)
    if io.previous(last).exists():  # only a writer other than ppvae's leaves .prev without the file itself
        raise CheckpointError(
            f"cannot resume: {last} is missing but {io.previous(last)} exists; rename it to {last.name} to resume "
            "from it, or start over in a new checkpoint_dir"
        )
    return 0


def _grad_max(params: list[torch.Tensor]) -> torch.Tensor | None:
    """Largest absolute gradient entry (NaN/Inf if any entry is) in one fused kernel; None without gradients.

    The max, not the L2 norm: huge but finite gradients are Adam's to scale, not a fault, and a norm can overflow.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.stack(torch._foreach_norm(grads, math.inf)).max()


def _all_finite(loss: torch.Tensor, grad_max: torch.Tensor | None) -> bool:
    """One device sync for the loss and the gradients together."""
    if grad_max is None:
        return bool(torch.isfinite(loss))
    return bool(torch.isfinite(loss) & torch.isfinite(grad_max))


def _keep_last_good(
    ckpt_dir: Path | None, model: Any, params: list, optimizer: Any, result: FitResult, epoch: int, step: int
) -> str:
    """Write the parameters from before a failed batch to ``nonfinite.pt``; say where the good state is."""
    if ckpt_dir is None:
        return "kept in memory; pass checkpoint_dir=... to keep them on disk too"
    path = ckpt_dir / "nonfinite.pt"
    try:
        io.save_training(
            path, model, params, optimizer, result, extra={"failed_at": {"epoch": epoch + 1, "batch": step + 1}}
        )
    except CheckpointError:
        return f"kept in memory; writing {path} failed"
    last = f", {ckpt_dir / 'last.pt'} holds the end of epoch {epoch}" if (ckpt_dir / "last.pt").exists() else ""
    return f"kept in memory and in {path}{last}"


def _check_gradients(params: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse to train parameters the ELBO never reaches: they would silently stay at their initial values."""
    dead = [name for name, p in params if p.grad is None]
    if dead:
        shown = ", ".join(dead[:8]) + (f" and {len(dead) - 8} more" if len(dead) > 8 else "")
        raise TrainingError(
            f"{len(dead)} parameter(s) get no gradient from the ELBO and would never be optimized: {shown}; "
            "use them in model or guide, or freeze them with requires_grad_(False)"
        )


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


def _progress(enabled: bool, total: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr, leave=False, unit="step")


def _describe(record: dict, epochs: int) -> str:
    val = f"  val ELBO {record['val_elbo']:.3f}" if record["val_elbo"] is not None else ""
    skipped = f"  {record['skipped_batches']} batches skipped" if record.get("skipped_batches") else ""
    return (
        f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.3f}{val}  "
        f"β {record['beta']:.2f}  {record['seconds']:.1f}s  {record['examples_per_s']:.0f} ex/s{skipped}"
    )
