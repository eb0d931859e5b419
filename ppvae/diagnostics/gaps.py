"""Approximation and amortization gaps: why the ELBO of an amortized guide falls short of log p(x).

For a datapoint x, a decoder held fixed and the amortized guide q(z | x) = head(encoder(x)) (Cremer, Li & Duvenaud
2018, "Inference Suboptimality in Variational Autoencoders")::

    log p(x) − L[q]  =  (log p(x) − L[q*])  +  (L[q*] − L[q])
      inference gap  =  approximation gap   +  amortization gap          (nats, each ≥ 0 in expectation)

where ``L[q] = E_q[log p(x, z) − log q(z)]`` and q* = argmax L over the *same* variational family, optimized for this
x alone. The approximation gap is what the family cannot express (KL(q* ‖ p(z | x))); the amortization gap is what
the encoder loses by sharing one network across datapoints. Amortization ≫ approximation points at a weak encoder
(or under-training), approximation ≫ amortization at a too-simple family.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions import Distribution
from torch import Tensor, nn

from ppvae._local_params import local_module_params
from ppvae._param_store import model_store
from ppvae._rng import fork_rngs
from ppvae._stats import mean_se
from ppvae.blocks.guides import FullRankGuide, LowRankGuide, NormalGuide
from ppvae.data import as_tensor, check_finite
from ppvae.diagnostics.config import GapsConfig
from ppvae.diagnostics.local_family import local_family
from ppvae.diagnostics.parts import PartInput
from ppvae.errors import ConfigError, DataError, NotApplicable
from ppvae.infer.eval_mode import scoring_mode
from ppvae.infer.logweights import log_weights, particles_broadcast
from ppvae.infer.pair import as_pair
from ppvae.infer.sites import discover_sites, per_datapoint_args, take_rows

__all__ = ["Gaps", "inference_gaps", "pair_gaps", "run_part"]

_FIELDS = ("log_px", "elbo_amortized", "elbo_local", "approximation", "amortization")
_LINEAR_HEADS = (NormalGuide, LowRankGuide, FullRankGuide)  # exact types: q depends on h only through A h + c
_CHUNK_ELEMENTS = 2**22  # particles × datapoints × decoder outputs (16 MiB of float32; diagnostics/evaluation.py)


@dataclass
class Gaps:
    """Per-datapoint gaps from :func:`inference_gaps` (numpy float64, nats).

    Attributes:
        index: ``(K,)`` rows of ``data`` used.
        log_px: ``(K,)`` IWAE_S estimate of log p(x) from the better proposal (q or q*, whichever has the higher ELBO
            on S draws of its own, independent of the S draws behind every estimate here).
        elbo_amortized: ``(K,)`` L[q(z | x)] of the encoder's guide.
        elbo_local: ``(K,)`` L[q*], the same family optimized for each datapoint alone.
        approximation: ``(K,)`` log_px − elbo_local.
        amortization: ``(K,)`` elbo_local − elbo_amortized.
        steps: optimization steps of q*.
        num_samples: S, samples per datapoint for every final estimate.
        converged: False when q*'s ELBO was still rising at the end (a warning was issued; raise ``steps``/``lr``).
    """

    index: np.ndarray
    log_px: np.ndarray
    elbo_amortized: np.ndarray
    elbo_local: np.ndarray
    approximation: np.ndarray
    amortization: np.ndarray
    steps: int
    num_samples: int = 0
    converged: bool = True

    def summary(self) -> dict[str, Any]:
        """Mean and standard error over datapoints of each quantity (``name``, ``name_se``), in nats."""
        out: dict[str, Any] = {"num_datapoints": len(self.index), "steps": self.steps, "units": "nats"}
        for name in _FIELDS:
            out[name], out[f"{name}_se"] = mean_se(np.asarray(getattr(self, name)))
        out["num_samples"], out["converged"] = self.num_samples, self.converged
        return out

    def rows(self) -> list[tuple[str, str, str]]:
        """Rows of the diagnosis table: the two gaps, mean ± standard error."""
        g = self.summary()

        def pm(key: str) -> str:
            return f"{g[key]:.3f} ± {g[key + '_se']:.3f} nats"

        return [
            ("amortization gap", pm("amortization"), "L[q*] − L[q]: encoder weakness"),
            ("approximation gap", pm("approximation"), "log p̂ − L[q*]: family weakness"),
        ]


def inference_gaps(
    model: Any,
    data: Any,
    *,
    guide: Callable | None = None,
    index: Sequence[int] | np.ndarray | Tensor | None = None,
    num_points: int = GapsConfig.num_points,
    steps: int = GapsConfig.steps,
    lr: float = GapsConfig.lr,
    num_particles: int = GapsConfig.num_particles,
    num_samples: int = GapsConfig.num_importance_samples,
    latent_sites: str | Sequence[str] | None = None,
    data_plate: str = "data",
    seed: int = 0,
) -> Gaps:
    """Split each datapoint's inference gap into approximation and amortization gaps (Cremer et al. 2018).

    The local guide q* keeps the VAE's own guide head and replaces the encoder by a free feature vector per
    datapoint: ``q*_k = guide_head(h_k)``, h_k initialized at ``encoder(x_k)``; all K datapoints are optimized
    jointly in one vectorized batch, by Adam on the reparameterized ELBO with ``num_particles`` samples, with
    decoder, prior and head frozen; q* is the mean of the iterates over the last half of the steps (Polyak
    averaging). The built-in heads (normal, lowrank, fullrank) read h only through the linear map ``A h + c``
    (A stacks the head's weights: ``n_out × F``), so when ``rank A = n_out ≤ F`` every member
    of the family is ``guide_head(h)`` for some h and q* is the family's best member; otherwise (a warning says so)
    q* is the best member of the head's image. For those heads h moves as ``h = h_0 + A⁺ u``: Adam then steps the
    family's own parameters ``u`` (means, pre-softplus scales, ...) whatever the conditioning of A, as in Cremer et
    al. For other heads (iaf, user modules) h itself is optimized and q* is the best member of {guide_head(h)}.

    Final estimates use S = ``num_samples`` fresh draws from each of q and q*: ELBO_k = mean_s lw_ks and
    IWAE_k = logsumexp_s lw_ks − log S, lw = log p(x, z) + ... − log q(z | x) (Trace_ELBO's estimator, no tracing).
    ``log_px`` is the IWAE estimate of the proposal (q or q*) with the higher ELBO, i.e. the smaller KL to the
    posterior and so the less noisy weights; max(IWAE[q], IWAE[q*]) would pick up the upward excursions of a poor
    proposal's heavy-tailed estimate (+0.08 nats against the exact log p(x) of a linear-Gaussian model with a wrong
    encoder, tests/test_gaps.py). The choice is made on S further draws from each, independent of the S draws
    scored (a choice made on the scored draws favours whichever estimate came out high: about half an ELBO standard
    error of upward bias when q ≈ q*). Given the choice, the chosen IWAE estimate p̂ is unbiased for p(x), so by
    Markov P(log p̂ > log p(x) + t) ≤ e^{−t}: a stochastic lower bound. When q* is chosen the approximation gap is
    its IWAE minus its ELBO on the same draws, ≥ 0 (Jensen); when q is (q* no better than the encoder) it is, like
    the amortization gap, a difference of independent noisy estimates and may come out slightly negative.

    Args:
        model: a :class:`ppvae.VAE`; any other pair (a module with ``model``/``guide``, or a model function with
            ``guide``) goes to :func:`pair_gaps`, which re-fits the guide's own family at its local sites.
        data: ``(N, *data_shape)`` tensor or array (for a pair, also a tuple of model arguments).
        guide: None for a VAE (its own guide is used); the guide function of a pair.
        latent_sites, data_plate: for a pair, the local sites re-fitted (default every one the guide samples) and
            the plate that indexes datapoints.
        index: rows of ``data`` to use; default ``num_points`` rows drawn without replacement with ``seed``.
        steps, lr, num_particles: Adam steps, learning rate and reparameterized samples per step for q*.
        num_samples: S for the final ELBOs and IWAE estimates (the same budget for q and q*).
        seed: seeds the row choice and all sampling (torch's global RNG is left as it was).

    Returns:
        :class:`Gaps`, per datapoint, in nats. Cost: ``steps`` passes of K × num_particles decoder evaluations,
        then 4 × K × num_samples without gradients (the choice of proposal and the final estimates).
    """
    pair = as_pair(model, guide, what="inference_gaps")
    if not pair.is_builtin_vae:
        return pair_gaps(
            model,
            data,
            guide=guide,
            index=index,
            num_points=num_points,
            steps=steps,
            lr=lr,
            num_particles=num_particles,
            num_samples=num_samples,
            latent_sites=latent_sites,
            data_plate=data_plate,
            seed=seed,
        )
    vae = model
    for name, value in (("steps", steps), ("num_particles", num_particles), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a whole number ≥ 1, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    x_all = as_tensor(data)
    if x_all.dim() < 1 or tuple(x_all.shape[1:]) != vae.data_shape:
        raise DataError(f"data must have shape (N, *{vae.data_shape}) for this VAE, got {tuple(x_all.shape)}")
    idx = _choose_rows(len(x_all), index, num_points, seed)
    device = next(vae.parameters()).device
    x = x_all[torch.as_tensor(idx)].to(device)
    check_finite(x, "data")
    cuda = [device] if device.type == "cuda" else []
    # Networks in eval mode (as they were afterwards); gradients stay on for the per-datapoint parameters.
    with torch.random.fork_rng(devices=cuda), local_module_params(), _frozen(vae), scoring_mode(vae, no_grad=False):
        torch.manual_seed(seed)
        head = vae.guide_head
        with torch.no_grad():
            h0 = vae.encoder(x)
        params, features = _local_features(head, h0)
        opt = torch.optim.Adam(params, lr=lr)
        # Polyak & Juditsky 1992: at a constant lr Adam's last iterate jitters around the optimum (L[q*] came out up
        # to 0.05 nats low per datapoint at lr 2e-2 on an exact linear-Gaussian model); averaging settles.
        trace, start, averaged = [], steps // 2, [p.detach().clone() for p in params]
        for t in range(steps):
            opt.zero_grad(set_to_none=True)
            elbo = _log_weights(vae, head(features()), x, num_particles).mean(0)  # (K,)
            (-elbo.sum()).backward()
            opt.step()
            trace.append(elbo.detach().mean())
            if t >= start:
                for a, p in zip(averaged, params, strict=True):
                    a += (p.detach() - a) / (t - start + 1)
        with torch.no_grad():
            for a, p in zip(averaged, params, strict=True):
                p.copy_(a)
        converged = _converged(torch.stack(trace).cpu().double().numpy())
        with torch.no_grad():
            q_amortized, q_local = head(h0), head(features())
            # Choose the proposal on draws of its own, then score on fresh ones: choosing by the ELBO of the draws
            # that also give the IWAE picks whichever proposal's draws came out high, so log p̂ and the
            # approximation gap were biased up when q ≈ q* (+0.0075 nats, 7 se, on KL 0.0795 in tests/test_gaps.py).
            elbo_choice = [_log_weights(vae, q, x, num_samples).double().mean(0) for q in (q_amortized, q_local)]
            local_better = (elbo_choice[1] >= elbo_choice[0]).cpu().numpy()  # (K,)
            lw_amortized = _log_weights(vae, q_amortized, x, num_samples)  # (S, K)
            lw_local = _log_weights(vae, q_local, x, num_samples)
    elbo_a, elbo_l = (lw.double().mean(0).cpu().numpy() for lw in (lw_amortized, lw_local))
    iwae_a, iwae_l = (
        (lw.double().logsumexp(0) - math.log(num_samples)).cpu().numpy() for lw in (lw_amortized, lw_local)
    )
    log_px = np.where(local_better, iwae_l, iwae_a)
    return Gaps(
        index=idx,
        log_px=log_px,
        elbo_amortized=elbo_a,
        elbo_local=elbo_l,
        approximation=log_px - elbo_l,
        amortization=elbo_l - elbo_a,
        steps=steps,
        num_samples=num_samples,
        converged=converged,
    )


def pair_gaps(
    model: Any,
    data: Any,
    *,
    guide: Callable | None = None,
    index: Sequence[int] | np.ndarray | Tensor | None = None,
    num_points: int = GapsConfig.num_points,
    steps: int = GapsConfig.steps,
    lr: float = GapsConfig.lr,
    num_particles: int = GapsConfig.num_particles,
    num_samples: int = GapsConfig.num_importance_samples,
    latent_sites: str | Sequence[str] | None = None,
    data_plate: str = "data",
    seed: int = 0,
) -> Gaps:
    """The gaps of any pair whose guide draws its local latents from a family ppvae can re-parameterize.

    q* is the guide's own family at each local site (Normal, MultivariateNormal, LowRankMultivariateNormal, or
    their ``.to_event`` forms; :mod:`ppvae.diagnostics.local_family`) with free parameters per datapoint,
    initialized at the guide's output for the datapoint and fitted by Adam on the reparameterized ELBO
    (``num_particles`` draws per step, Polyak-averaged over the last half of the steps, as for a VAE), the model's
    parameters fixed. ELBOs and IWAE estimates are computed from :func:`ppvae.infer.logweights.log_weights` (the
    same log-weights as :func:`ppvae.evaluate`), with the choice of proposal for ``log_px`` made on independent
    draws, as in :func:`inference_gaps`. Other families, guides that also sample non-local or discrete sites, and
    models with global latents are :class:`~ppvae.errors.NotApplicable`, with the reason.
    """
    for name, value in (("steps", steps), ("num_particles", num_particles), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a whole number ≥ 1, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    pair = as_pair(model, guide, what="inference_gaps")
    args = per_datapoint_args(data)
    n = len(args[0])
    idx = _choose_rows(n, index, num_points, seed)
    batch = take_rows(args, idx, n)
    store = model_store(pair.model, pair.guide, pair.owner, exercise=lambda: (pair.guide(*batch), pair.model(*batch)))
    # Eval mode (flags and buffers given back; gradients on for q*'s parameters), the pair's own store, weights fixed.
    evaluating = scoring_mode(pair.owner, pair.model, pair.guide, no_grad=False)
    with evaluating, store, fork_rngs(), local_module_params(), _frozen_pair(pair.owner):
        torch.manual_seed(seed)
        sites = discover_sites(pair.model, pair.guide, batch, data_plate=data_plate)
        names = sites.latents(latent_sites, "the amortization/approximation gaps")
        if sites.global_latents:
            raise NotApplicable(
                f"the gaps are per datapoint, but the model has global latent sites {list(sites.global_latents)} "
                f"outside pyro.plate({data_plate!r}); make them parameters (pyro.param) or fix them"
            )
        with poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(pair.guide).get_trace(*batch)
            # Particles at once only where a trial shows the pair broadcasts over them (BatchNorm, masks do not).
            vectorize = particles_broadcast(pair.model, pair.guide, *batch, data_plate=data_plate) is None
        family = local_family(guide_trace, names, sites.guide_sites)

        def lw(g: Callable, num: int) -> Tensor:  # (K, num)
            return log_weights(pair.model, g, *batch, num_samples=num, data_plate=data_plate, vectorize=vectorize)

        params = family.parameters()
        opt = torch.optim.Adam(params, lr=lr)
        trace, start, averaged = [], steps // 2, [p.detach().clone() for p in params]
        for t in range(steps):
            opt.zero_grad(set_to_none=True)
            elbo = lw(family.guide, num_particles).mean(1)  # (K,)
            (-elbo.sum()).backward()
            opt.step()
            trace.append(elbo.detach().mean())
            if t >= start:
                for a, p in zip(averaged, params, strict=True):
                    a += (p.detach() - a) / (t - start + 1)
        with torch.no_grad():
            for a, p in zip(averaged, params, strict=True):
                p.copy_(a)
            converged = _converged(torch.stack(trace).cpu().double().numpy())
            elbo_choice = [lw(g, num_samples).double().mean(1) for g in (pair.guide, family.guide)]
            local_better = (elbo_choice[1] >= elbo_choice[0]).cpu().numpy()
            lw_amortized, lw_local = lw(pair.guide, num_samples).double(), lw(family.guide, num_samples).double()
    elbo_a, elbo_l = (w.mean(1).cpu().numpy() for w in (lw_amortized, lw_local))
    iwae_a, iwae_l = ((w.logsumexp(1) - math.log(num_samples)).cpu().numpy() for w in (lw_amortized, lw_local))
    log_px = np.where(local_better, iwae_l, iwae_a)
    return Gaps(
        index=idx,
        log_px=log_px,
        elbo_amortized=elbo_a,
        elbo_local=elbo_l,
        approximation=log_px - elbo_l,
        amortization=elbo_l - elbo_a,
        steps=steps,
        num_samples=num_samples,
        converged=converged,
    )


@contextmanager
def _frozen_pair(owner: nn.Module | None) -> Iterator[None]:
    """The model's weights (the module's and the parameter store's) fixed while q* is fitted; flags restored."""
    tensors = list(owner.parameters()) if owner is not None else []
    tensors += [p for _, p in pyro.get_param_store().named_parameters()]
    flags = [(p, p.requires_grad) for p in tensors]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _choose_rows(n: int, index: Any, num_points: int, seed: int) -> np.ndarray:
    if index is not None:
        idx = np.asarray(torch.as_tensor(index).cpu()).astype(np.int64).reshape(-1)
        if idx.size == 0 or idx.min() < -n or idx.max() >= n:
            raise ConfigError(f"index must hold row numbers in [0, {n}) of the data, got {index!r}")
        return idx % n
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ConfigError(f"num_points must be a whole number ≥ 1, got {num_points!r}")
    if n == 0:
        raise DataError("data is empty: give at least one datapoint")
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, num_points), replace=False))


@contextmanager
def _frozen(vae: nn.Module) -> Iterator[None]:
    """Decoder, prior and head fixed (``requires_grad_(False)``) and eval mode; both restored on exit."""
    saved = [(p, p.requires_grad) for p in vae.parameters()]
    training = vae.training
    try:
        vae.requires_grad_(False)
        vae.eval()
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        vae.train(training)


def _local_features(head: nn.Module, h0: Tensor) -> tuple[list[Tensor], Callable[[], Tensor]]:
    """Free parameters of q* and the map from them to features ``h (K, F)``, starting at ``h0``."""
    width = h0.shape[-1]
    linears = [m for m in head.modules() if type(m) is nn.Linear and m.in_features == width]
    if linears:
        a = torch.cat([m.weight.detach() for m in linears]).double()  # (n_out, F)
        rank = int(torch.linalg.matrix_rank(a))
        if rank < a.shape[0]:
            warnings.warn(
                f"guide head {type(head).__name__} reads {width} features into {a.shape[0]} outputs (rank {rank}): "
                f"not every member of its family is reachable, so q* is only the best member of the head's image "
                f"and the approximation gap may be overestimated; give the encoder ≥ {a.shape[0]} output features",
                stacklevel=3,
            )
        if type(head) in _LINEAR_HEADS:
            pinv = torch.linalg.pinv(a).to(h0.dtype)  # (F, n_out)
            u = torch.zeros(*h0.shape[:-1], a.shape[0], dtype=h0.dtype, device=h0.device, requires_grad=True)
            return [u], lambda: h0 + u @ pinv.T
    h = h0.clone().requires_grad_(True)
    return [h], lambda: h


def _log_weights(vae: Any, q: Distribution, x: Tensor, num: int) -> Tensor:
    """``(num, K)`` log p(z) + log p(x | z) − log q(z), z ~ q reparameterized, in chunks bounding memory."""
    prior = vae.prior()
    per = max(1, math.prod(x.shape) * getattr(vae.likelihood, "num_params", 1))
    chunk = max(1, min(num, _CHUNK_ELEMENTS // per))
    out = []
    for start in range(0, num, chunk):
        z = q.rsample((min(chunk, num - start),))
        out.append(prior.log_prob(z) + vae.decode(z).log_prob(x) - q.log_prob(z))
    return torch.cat(out)


def _converged(trace: np.ndarray) -> bool:
    """Warn when the mean ELBO of q* rose, beyond noise, from the third to the last quarter of the steps.

    Quarters, not tenths: far from the optimum each step's ELBO is noisy (sd of nats), and over the last tenths a
    q* still nats short of its optimum passed as converged; the quarters also span the averaged half of the steps.
    """
    w = len(trace) // 4
    if w < 2:
        return True
    last, before = trace[-w:], trace[-2 * w : -w]
    rise = last.mean() - before.mean()
    noise = math.sqrt((last.var(ddof=1) + before.var(ddof=1)) / w)
    if rise > max(1e-2, 3 * noise):
        warnings.warn(
            f"the per-datapoint optimization of q* had not converged: its mean ELBO rose by {rise:.3g} nats from the "
            "third to the last quarter of the steps, so the amortization gap is underestimated; raise steps or lr",
            stacklevel=3,
        )
        return False
    return True


def run_part(inputs: PartInput, config: GapsConfig) -> Gaps:
    """The ``gaps`` part of :func:`ppvae.diagnose`."""
    return inference_gaps(
        inputs.model,
        inputs.model_data(),
        guide=inputs.guide,
        num_points=config.num_points,
        steps=config.steps,
        lr=config.lr,
        num_particles=config.num_particles,
        num_samples=config.num_importance_samples,
        latent_sites=inputs.latent_sites,
        data_plate=inputs.data_plate,
        seed=inputs.seed,
    )
