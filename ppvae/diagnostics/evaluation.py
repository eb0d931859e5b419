"""``evaluate``: ELBO, importance-sampled log p(x), bits/dim and the inference gap, per datapoint.

Everything comes from one array, the importance log-weights (see :mod:`ppvae.infer.logweights`)::

    lw[i, s] = log p(x_i, z_is) − log q(z_is | x_i),   z_is ~ q(z | x_i)
    ELBO_i   = mean_s lw[i, s]                                   (nats)
    log p̂_i  = logsumexp_s lw[i, s] − log S                     (IWAE_S bound; Burda et al. 2015)
    gap_i    = log p̂_i − ELBO_i ≈ KL(q(z | x_i) ‖ p(z | x_i))

computed in chunks over data and particles so memory stays bounded whatever N and S are. Discrete sites a pair
marks for enumeration are summed over exactly in both (:mod:`ppvae.infer.enumerated`): the ELBO is then
``TraceEnum_ELBO``'s per datapoint, not the mean of the log-weights, where the guide enumerates.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ppvae._local_params import local_module_params
from ppvae._param_store import model_store
from ppvae._rng import fork_rngs
from ppvae._stats import mean_se
from ppvae._validate import COUNT, check, check_seed
from ppvae.data import as_tensor
from ppvae.data.batches import make_batches
from ppvae.errors import ConfigError, DataError, PPVAEError
from ppvae.infer.eval_mode import scoring_mode
from ppvae.infer.logweights import log_weights, particles_broadcast, plate_nesting, scoring_trial
from ppvae.infer.pair import is_builtin_vae, resolve_device, resolve_pair

__all__ = ["Evaluation", "evaluate", "iter_log_weights"]

# Elements of the largest intermediate (particles × datapoints × decoder outputs) per chunk: 2^22 floats = 16 MiB.
# Below glibc's 32 MiB mmap ceiling, freed intermediates are reused from the heap; at 2^24 every one of the
# likelihood's temporaries was a fresh mmap faulted in page by page (benchmarks/RESULTS.md, issue 3).
_CHUNK_ELEMENTS = 2**22


@dataclass
class Evaluation:
    """Per-datapoint results of :func:`evaluate` (numpy float64, nats unless said otherwise).

    Attributes:
        elbo: ``(N,)`` ELBO per datapoint (mean of the log-weights; TraceEnum_ELBO's where sites are enumerated).
        log_px: ``(N,)`` IWAE estimate of log p(x) with ``num_samples`` samples.
        reconstruction, kl: ``(N,)`` E_q log p(x | z) and E_q[log q(z|x) − log p(z)] (a ppvae.VAE only; else None).
        log_weights: ``(N, S)`` float32, kept when asked (``keep_log_weights=True``).
        data_dim: number of elements per datapoint (for bits/dim).
        discrete: whether the likelihood is a probability mass (bits/dim are then meaningful).
        masked: observed sites with elements masked out of the density; then log p̂ is a probability of the
            elements kept, not of the whole datapoint, and bits/dim (÷ ``data_dim``) are not reported.
        mask_key: a hash of the masks on the first batch scored (``ppvae.infer.observed.mask_fingerprint``): pairs
            with the same key, scored on the same data, keep the same elements of it (None: not masked there).
        particles: how the particles were drawn: ``"vectorized"`` (all in one pass) or ``"sequential (why)"``
            (one at a time, for a pair that does not broadcast over a leading particle dim).
        enumerated: how sites marked for enumeration were scored: ``"summed: y, ..."`` (exactly, the ELBO then
            TraceEnum_ELBO's), ``"sampled (why)"``, or None when the pair marks none.
    """

    elbo: np.ndarray
    log_px: np.ndarray
    num_samples: int
    data_dim: int
    discrete: bool | None
    reconstruction: np.ndarray | None = None
    kl: np.ndarray | None = None
    log_weights: np.ndarray | None = field(default=None, repr=False)
    split: str | None = None
    particles: str | None = None
    enumerated: str | None = None
    masked: tuple[str, ...] = ()
    mask_key: str | None = None

    @property
    def summed(self) -> bool:
        """Whether discrete sites marked for enumeration were summed over exactly."""
        return bool(self.enumerated and self.enumerated.startswith("summed"))

    @property
    def inference_gap(self) -> np.ndarray:
        """``(N,)`` log p̂(x) − ELBO: an estimate of KL(q(z|x) ‖ p(z|x)), nats."""
        with np.errstate(invalid="ignore"):  # inf − inf on non-finite datapoints: NaN, listed in ``nonfinite``
            return self.log_px - self.elbo

    @property
    def bits_per_dim(self) -> np.ndarray | None:
        """``(N,)`` −log₂ P̂(x) / D for discrete likelihoods; None for densities (not comparable) and for masked
        observations (fewer than D elements are scored)."""
        if not self.discrete or self.masked:
            return None
        return -self.log_px / (math.log(2) * self.data_dim)

    @property
    def nonfinite(self) -> np.ndarray:
        """Indices of datapoints whose log-weights were NaN or infinite (reported, excluded from means)."""
        return np.flatnonzero(~(np.isfinite(self.elbo) & np.isfinite(self.log_px)))

    def per_datapoint(self) -> dict[str, np.ndarray]:
        """Every ``(N,)`` array by name (those defined for this model)."""
        values = {
            "elbo": self.elbo,
            "log_px": self.log_px,
            "inference_gap": self.inference_gap,
            "reconstruction": self.reconstruction,
            "kl": self.kl,
            "bits_per_dim": self.bits_per_dim,
        }
        return {name: v for name, v in values.items() if v is not None}

    def attrs(self) -> dict[str, Any]:
        """What produced the numbers, for file metadata."""
        return {
            "num_samples": self.num_samples,
            "split": self.split or "",
            "estimator": f"elbo: mean of {self.num_samples} log-weights; log_px: IWAE_{self.num_samples}"
            + ("; enumerated sites summed exactly (elbo: TraceEnum_ELBO's)" if self.summed else ""),
            "units": "nats; bits_per_dim in bits per dimension",
            "particles": self.particles or "",
            "enumerated": self.enumerated or "",
            "masked": ", ".join(self.masked),
            "mask_key": self.mask_key or "",
        }

    def to_inference_data(self) -> Any:
        """ArviZ InferenceData with the per-datapoint arrays in ``sample_stats`` (dim ``datapoint``), and the
        log-weights ``(chain=1, draw=S, datapoint)`` when kept."""
        from ppvae.diagnostics import arviz_io

        stats = {} if self.log_weights is None else {"log_weights": self.log_weights.T[None]}
        return arviz_io.to_inference_data(
            sample_stats=stats,
            per_datapoint=self.per_datapoint(),
            dims={"log_weights": ["datapoint"]},
            attrs=self.attrs(),
        )

    def summary(self) -> dict[str, Any]:
        """Means with standard errors over datapoints (nats; bits/dim where discrete), and the estimator used."""
        out: dict[str, Any] = {"num_datapoints": len(self.elbo), "num_samples": self.num_samples}
        if self.split:
            out["split"] = self.split
        fields = {"elbo": self.elbo, "log_px": self.log_px, "inference_gap": self.inference_gap}
        if self.reconstruction is not None and self.kl is not None:
            fields.update(reconstruction=self.reconstruction, kl=self.kl)
        if self.bits_per_dim is not None:
            fields["bits_per_dim"] = self.bits_per_dim
        ok = np.isfinite(self.elbo) & np.isfinite(self.log_px)
        for name, values in fields.items():
            mean, se = mean_se(values[ok])
            out[name], out[f"{name}_se"] = mean, se
        out["estimator"] = f"ELBO (mean of {self.num_samples} log-weights); log_px: IWAE_{self.num_samples}"
        out["num_nonfinite"] = int((~ok).sum())
        if self.masked:
            out["masked_sites"], out["mask_key"] = list(self.masked), self.mask_key
        return out


def _vae_chunk(vae: Any, q: Any, prior: Any, x: Tensor, num: int) -> tuple[Tensor, Tensor, Tensor]:
    """(lw, log p(x|z), log q − log p) each ``(B, num)`` for a ppvae.VAE, without tracing.

    ``q = vae.encode(x)`` and ``prior = vae.prior()`` are built once per batch and shared by its particle chunks.
    """
    z = q.sample((num,))
    log_lik = vae.decode(z).log_prob(x)
    kl = q.log_prob(z) - prior.log_prob(z)
    return (log_lik - kl).T, log_lik.T, kl.T


def iter_log_weights(
    model: Any,
    data: Any,
    *,
    guide: Callable | None = None,
    num_samples: int = 1000,
    batch_size: int | None = None,
    data_plate: str = "data",
    device: str | torch.device | None = "cpu",
    vectorize: bool | None = None,
) -> Iterator[tuple[slice, Tensor, Tensor | None, Tensor | None]]:
    """Yield ``(rows, lw, log_lik, kl)`` chunks: ``lw (B, S_chunk)`` for datapoints ``rows`` (CPU float32).

    Chunks cover every datapoint (in order) and every particle; ``log_lik``/``kl`` are given for a ppvae.VAE.
    The chunks of one block of rows are views into ``(B, S)`` buffers allocated when the block starts.

    The pair is scored in eval mode without gradients, and every module it calls gets its training flag and
    buffers back afterwards (:func:`ppvae.infer.eval_mode.scoring_mode`). ``vectorize``: draw a chunk's particles
    in one pass (True), one at a time (False), or (None) in one pass when a trial on the first batch shows the
    pair broadcasts over a leading particle dim correctly (:func:`ppvae.infer.logweights.particles_broadcast`).
    """
    for rows, lw, log_lik, kl, _ in _iter_log_weights(
        model, data, guide, num_samples, batch_size, data_plate, device, vectorize, {}
    ):
        yield rows, lw, log_lik, kl


def _iter_log_weights(
    model: Any,
    data: Any,
    guide: Callable | None,
    num_samples: int,
    batch_size: int | None,
    data_plate: str,
    device: str | torch.device | None,
    vectorize: bool | None,
    info: dict[str, Any],
) -> Iterator[tuple[slice, Tensor, Tensor | None, Tensor | None, Tensor | None]]:
    """:func:`iter_log_weights` with a fifth part, the ELBO's terms ``(B, S_chunk)`` where they are not ``lw``
    (enumerated guide sites; else None), recording in ``info`` how particles were drawn (``"particles"``), how
    enumerated sites were scored (``"enumerated"``) and whether the observed sites are discrete (``"discrete"``)."""
    num_samples = check("num_samples", num_samples, COUNT)
    batch_size = 256 if batch_size is None else check("batch_size", batch_size, COUNT)
    if vectorize is not None and not isinstance(vectorize, (bool, np.bool_)):
        raise ConfigError(f"vectorize must be None (decided by a trial run), True or False; got {vectorize!r}")
    model_fn, guide_fn, owner = resolve_pair(model, guide)
    dev = resolve_device(device)
    if owner is not None:
        owner.to(dev)
    batches = make_batches(_as_data(data, owner), batch_size, dev, shuffle=False, what="data", strict=False)
    if owner is not None:
        # Shape and the likelihood's support, as fit checks them: a log-probability of data outside the support
        # (0.5 under a Bernoulli, a value off a categorical's grid) is a finite-looking number that means nothing.
        batches.check_against(owner)
    # A ppvae.VAE is scored by its direct vectorized path; vectorize=False asks for Pyro's traces, particle by particle.
    fast = is_builtin_vae(owner) and vectorize is not False
    _check_memory(min(batch_size, batches.n or batch_size), num_samples, 3 if fast else 1)
    out_size = max(1, getattr(getattr(owner, "likelihood", None), "num_params", 1)) * _data_dim(batches.first()[0])
    nesting = None
    enumerate_sites = False
    trialled: set[int] = set()
    start = 0
    decided_by_trial = vectorize is None
    roots = (owner,) if fast else (owner, model_fn, guide_fn)
    # Eval mode first, so that binding a loaded pair's networks (the store's exercise run) moves no statistics; then
    # the model's own pyro.param values (ppvae._param_store), held while the chunks are produced.
    evaluating = scoring_mode(*roots)
    own_store = model_store(model_fn, guide_fn, owner, exercise=lambda: _run_once(model_fn, guide_fn, batches.first()))
    with evaluating, local_module_params() if owner is not None else nullcontext(), own_store:
        for batch in batches:
            n = batches.batch_len(batch)
            chunk = max(1, min(num_samples, _CHUNK_ELEMENTS // (n * max(out_size, 1))))
            rows = slice(start, start + n)
            # One buffer per block, allocated before its chunks: small per-chunk results kept alive between the
            # chunks' large temporaries fragmented the heap (1.6 GiB resident after 768 images at S = 2000).
            if not fast and nesting is None:
                nesting = plate_nesting(model_fn, guide_fn, *batch)
                enumerate_sites = _enumeration(model_fn, guide_fn, batch, data_plate, nesting, info)
                vectorize = _decide(vectorize, model_fn, guide_fn, batch, data_plate, nesting, info, enumerate_sites)
                trialled = {n}
            elif not fast and decided_by_trial and vectorize and n not in trialled:
                # A batch of another size (the last, shorter one): a pair may broadcast at one size and not at another
                # (code that reads the batch size), so the trial is run again before its particles are drawn together.
                trialled.add(n)
                seen = dict(info)
                if not _decide(None, model_fn, guide_fn, batch, data_plate, nesting, seen, enumerate_sites):
                    vectorize = False
                    why = seen["particles"].removeprefix("sequential (").removesuffix(")")
                    info["particles"] = f"sequential (from datapoint {start}: {why})"
            out = torch.empty(3 if fast else 1 + enumerate_sites, n, num_samples)
            if fast:  # the guide and prior distributions do not depend on the particles: build them once
                q, prior = owner.encode(batch[0]), owner.prior()
            for s0 in range(0, num_samples, chunk):
                cols = slice(s0, min(num_samples, s0 + chunk))
                if fast:
                    for buffer, value in zip(out, _vae_chunk(owner, q, prior, batch[0], cols.stop - s0), strict=True):
                        buffer[:, cols] = value
                    yield rows, out[0, :, cols], out[1, :, cols], out[2, :, cols], None
                    continue
                weigh = functools.partial(
                    log_weights,
                    model_fn,
                    guide_fn,
                    *batch,
                    num_samples=cols.stop - s0,
                    data_plate=data_plate,
                    max_plate_nesting=nesting,
                    enumerate=enumerate_sites,
                    with_elbo=True,
                    masked=info.setdefault("masked", []),  # every batch's: a mask may leave the first batch whole
                )
                try:
                    lw, elbo = weigh(vectorize=vectorize)
                except Exception as err:
                    if not (vectorize and decided_by_trial) or isinstance(err, PPVAEError):
                        raise
                    # The trial's batch broadcast, this one does not (a last, shorter batch): one at a time from here.
                    vectorize = False
                    first = (str(err).strip().splitlines() or [""])[0][:160]
                    info["particles"] = f"sequential (from datapoint {start}: {type(err).__name__}: {first})"
                    lw, elbo = weigh(vectorize=False)
                out[0, :, cols] = lw
                if enumerate_sites:
                    out[1, :, cols] = elbo
                yield rows, out[0, :, cols], None, None, out[1, :, cols] if enumerate_sites else None
            start += n
    info.setdefault("particles", "vectorized" if fast else None)


def _enumeration(model: Callable, guide: Callable, batch: tuple, data_plate: str, nesting: int, info: dict) -> bool:
    """Whether sites the pair marks for enumeration are summed (recorded in ``info``, with the data's kind)."""
    with fork_rngs():  # the trial's draws leave the evaluation's own draws as they were without it
        trial = scoring_trial(model, guide, *batch, data_plate=data_plate, max_plate_nesting=nesting)
    info["discrete"], info["mask_key"] = trial.discrete, trial.mask_key
    if trial.enumerated:
        info["enumerated"] = f"summed: {', '.join(trial.enumerated)}"
    elif trial.sampled_because:
        info["enumerated"] = f"sampled ({trial.sampled_because})"
    return bool(trial.enumerated)


def _decide(
    vectorize: bool | None,
    model: Callable,
    guide: Callable,
    batch: tuple,
    data_plate: str,
    nesting: int,
    info: dict,
    enumerate_sites: bool = False,
) -> bool:
    """``vectorize`` as given, or (None) whether a trial on ``batch`` shows the pair broadcasts over particles."""
    if vectorize is None:
        with fork_rngs():  # the trial's draws leave the evaluation's own draws as they were without it
            reason = particles_broadcast(
                model, guide, *batch, data_plate=data_plate, max_plate_nesting=nesting, enumerate=enumerate_sites
            )
        info["particles"] = "vectorized" if reason is None else f"sequential ({reason})"
        return reason is None
    info["particles"] = "vectorized" if vectorize else "sequential (asked for)"
    return bool(vectorize)


def _run_once(model_fn: Callable, guide_fn: Callable, args: tuple) -> None:
    guide_fn(*args)
    model_fn(*args)


def _as_data(data: Any, owner: Any) -> Any:
    """Data for a model with a ``data_shape`` (a ppvae.VAE) as float32, like ``ppvae.data.load`` gives them: integer
    and boolean tensors are cast (an encoder's float weights cannot multiply them), complex ones refused."""
    if isinstance(data, tuple) and not data:
        raise DataError("data is an empty tuple; give a tensor (N, *data_shape) or a tuple of tensors (x, ...)")
    if getattr(owner, "data_shape", None) is None:
        return data  # a user's pair: its data are its arguments, whatever their dtype
    if isinstance(data, tuple):
        return (_as_data(data[0], owner), *data[1:])
    if torch.is_tensor(data) or isinstance(data, (np.ndarray, list)):
        return as_tensor(data)
    return data


# Bytes per (datapoint, particle) allowed for when refusing a block that cannot fit: the float32 buffers (3 for a
# ppvae.VAE: log-weights, log-likelihood, KL), 12 bytes, plus 24 for the float64 copies evaluate made of them until
# it reduced chunk by chunk; the 24 are kept as a margin so the check refuses no less than it did.
_BYTES_PER_WEIGHT = 4 * 3 + 8 * 3


def _check_memory(rows: int, num_samples: int, buffers: int) -> None:
    """Refuse, before allocating, a (rows, num_samples) block that could not fit in this machine's memory."""
    need = rows * num_samples * (_BYTES_PER_WEIGHT if buffers > 1 else 4 + 8)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available on this platform: let the allocator decide
        return
    if need > total:
        raise ConfigError(
            f"num_samples={num_samples} for blocks of {rows} datapoint(s) needs ~{need / 2**30:.3g} GiB for the "
            f"log-weights, more than this machine's {total / 2**30:.3g} GiB of memory; lower num_samples or batch_size"
        )


def _data_dim(x: Tensor) -> int:
    return int(np.prod(x.shape[1:])) if x.dim() > 1 else 1


def evaluate(
    model: Any,
    data: Any,
    *,
    guide: Callable | None = None,
    num_samples: int = 1000,
    batch_size: int | None = None,
    data_plate: str = "data",
    seed: int | None = 0,
    device: str | torch.device | None = "cpu",
    keep_log_weights: bool = False,
    discrete: bool | None = None,
    split: str | None = None,
    vectorize: bool | None = None,
) -> Evaluation:
    """Score a model/guide pair on ``data`` by importance sampling with its guide as proposal.

    Args:
        model, guide, data: as for :func:`ppvae.fit` (a ppvae.VAE, a module with ``model``/``guide``, or a pair
            of functions whose local latents live in the plate ``data_plate``).
        num_samples: S importance samples per datapoint (≥ 2).
        batch_size: datapoints per chunk (default 256; particles are chunked to bound memory).
        keep_log_weights: keep the ``(N, S)`` float32 log-weights (needed by :func:`ppvae.diagnose`).
        discrete: whether log-likelihoods are log-probabilities (default: the VAE's likelihood says; for any other
            pair the supports of its observed sites, read from one run: None when they are mixed or absent).
        split: a label for reports ("test", "val").
        vectorize: draw particles in one pass (True) or one at a time (False); None (default) decides by a trial
            on the first batch (:func:`ppvae.infer.logweights.particles_broadcast`): a pair with a
            ``BatchNorm1d`` decoder or a ``(batch, D)`` mask is scored one particle at a time: the same estimator,
            from other random draws (the two agree on the same draws, tested), so the numbers of one ``seed`` differ
            between the two, as they do between batch sizes. A ``ppvae.VAE`` is scored by its own vectorized path
            unless ``vectorize=False`` (Pyro's traces then, without the reconstruction/KL split).
            ``Evaluation.particles`` says which was used.

    The pair is scored in eval mode (dropout off, BatchNorm on its running statistics) without gradients; every
    module it calls gets its training flag and its buffers back afterwards, also when the call raises.

    Returns:
        :class:`Evaluation`. A datapoint whose log-weights are NaN or infinite gets NaN/inf entries and is listed
        in ``Evaluation.nonfinite`` instead of stopping the evaluation.

    Raises:
        DataError: data holding NaN/Inf, of the wrong shape, or (for a model with a likelihood head) outside the
            likelihood's support, checked as :func:`ppvae.fit` checks them: their log-probability would be a
            finite-looking number that means nothing. Integer and boolean tensors are cast to float32.
        ConfigError: an invalid option (num_samples, batch_size, seed, discrete), or log-weight blocks that could
            not fit in memory.
    """
    if isinstance(num_samples, (bool, np.bool_)) or not isinstance(num_samples, (int, np.integer)) or num_samples < 2:
        raise ConfigError(
            f"num_samples must be an integer ≥ 2 (importance sampling needs several), got {num_samples!r}"
        )
    num_samples = int(num_samples)
    if discrete is not None and not isinstance(discrete, (bool, np.bool_)):
        raise ConfigError(f"discrete must be None (the likelihood says), True or False; got {discrete!r}")
    likelihood = getattr(model, "likelihood", None) if isinstance(model, torch.nn.Module) else None
    if discrete and likelihood is not None and not getattr(likelihood, "discrete", True):
        raise ConfigError(
            f"discrete=True, but the model's likelihood {type(likelihood).__name__} is a density, so its bits/dim "
            "would not be comparable; score it as grey-level probabilities with "
            "ppvae.evaluate(ppvae.blocks.discretize.scoring_view(model), x) instead"
        )
    if keep_log_weights:
        _check_memory(_num_rows(data), num_samples, 1)
    parts: dict[str, list[np.ndarray]] = {}
    info: dict[str, Any] = {}
    # A seed gives the same numbers as reseeding the global RNGs did, on copies of them: the caller's stay as they
    # were. Without one, sampling draws from (and advances) the caller's RNGs.
    with fork_rngs(check_seed(seed)) if seed is not None else nullcontext():
        chunks = _iter_log_weights(model, data, guide, num_samples, batch_size, data_plate, device, vectorize, info)
        # Chunks of one block of datapoints arrive together. Each is reduced in float64 as it comes and the chunks'
        # sums and log-sum-exps are combined: no (B, S) float64 copy per block (its allocations, 10 MB at B = 256,
        # S = 5000, slowly fragmented the heap over a full test set).
        for _, group in itertools.groupby(chunks, key=lambda chunk: (chunk[0].start, chunk[0].stop)):
            _, lws, log_liks, kls, elbos = zip(*group, strict=True)
            out = {
                "elbo": _mean_over_chunks(lws if elbos[0] is None else elbos, num_samples),
                "log_px": torch.stack([lw.double().logsumexp(1) for lw in lws], 1).logsumexp(1) - math.log(num_samples),
            }
            if log_liks[0] is not None:
                out["reconstruction"] = _mean_over_chunks(log_liks, num_samples)
                out["kl"] = _mean_over_chunks(kls, num_samples)
            if keep_log_weights:
                out["log_weights"] = torch.cat(lws, 1)
            for key, value in out.items():
                parts.setdefault(key, []).append(value.numpy())
    joined = {key: np.concatenate(values) for key, values in parts.items()}
    owner = model if isinstance(model, torch.nn.Module) else None
    if discrete is None:
        known = getattr(likelihood, "discrete", None)
        discrete = known if isinstance(known, bool) else info.get("discrete")
    shape = getattr(owner, "data_shape", None)
    data_dim = int(np.prod(shape)) if shape is not None else _first_dim(data)
    return Evaluation(
        elbo=joined["elbo"],
        log_px=joined["log_px"],
        num_samples=num_samples,
        data_dim=data_dim,
        discrete=discrete,
        reconstruction=joined.get("reconstruction"),
        kl=joined.get("kl"),
        log_weights=joined.get("log_weights"),
        split=split,
        particles=info.get("particles"),
        enumerated=info.get("enumerated"),
        masked=tuple(info.get("masked", ())),
        mask_key=info.get("mask_key"),
    )


def _mean_over_chunks(chunks: tuple[Tensor, ...], num_samples: int) -> Tensor:
    """Per-row mean over the particles of ``(B, S_chunk)`` chunks covering all ``num_samples``, in float64."""
    return torch.stack([c.sum(1, dtype=torch.float64) for c in chunks], 1).sum(1) / num_samples


def _num_rows(data: Any) -> int:
    x = data[0] if isinstance(data, tuple) and data else data
    try:
        return len(x)
    except TypeError:
        return 1


def _first_dim(data: Any) -> int:
    x = data[0] if isinstance(data, tuple) else data
    shape = getattr(x, "shape", None)
    return int(np.prod(shape[1:])) if shape is not None and len(shape) > 1 else 1
