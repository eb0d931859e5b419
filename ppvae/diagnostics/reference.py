"""Reference posteriors by NUTS, per datapoint, with the decoder fixed; and how far the guide is from them.

For a datapoint ``x_k`` and fixed network weights, the exact posterior of the local latent is

    p(z | x_k) ∝ p(x_k | z) p(z),

which NUTS (Hoffman & Gelman 2014) samples to arbitrary accuracy. Comparing the amortized guide q(z | x_k)
with these draws separates what the *guide* gets wrong from what the *decoder* learned. Convergence is read
from rank-normalized split R-hat < 1.01 and bulk ESS > 400 in every dimension (Vehtari et al. 2021). The
comparison uses samples only (guides such as planar flows cannot score NUTS draws), per dimension:

- ``mean_error_sd``: (E_q z − E_ref z) / sd_ref;
- ``sd_ratio``: sd_q / sd_ref (< 1: the guide is over-confident);
- ``w1``: 1-D Wasserstein-1 distance between the marginals, in units of sd_ref;

and jointly ``mmd``: squared maximum mean discrepancy, RBF kernel, unbiased U-statistic (Gretton et al. 2012).

Sites are found from a trace (:mod:`ppvae.infer.sites`): the local latents are the model's continuous unobserved
sites inside the data plate (``pyro.plate("data")`` by default), whatever their names; the data are the model's
arguments (a tensor, or a tuple of data, labels, masks... indexed by row). NUTS runs ``model(*args)`` on the rows
of up to ``points_per_run`` datapoints at once (their posteriors are independent given the weights, so one run
samples their product; :mod:`ppvae.diagnostics.nuts_batch`), samples every continuous unobserved site and sums
the enumerated discrete ones out; the chosen local latents are kept. Convergence is read per datapoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn

from ppvae._local_params import local_module_params
from ppvae._param_store import model_store
from ppvae._validate import Interval, check
from ppvae.data import as_tensor, check_finite
from ppvae.diagnostics.arviz_io import ess, rhat
from ppvae.diagnostics.config import ReferenceConfig
from ppvae.diagnostics.nuts_batch import guide_particles, model_layout, pair_potential, sample_joint, whitening
from ppvae.diagnostics.parts import PartInput
from ppvae.errors import ConfigError, DataError, NotApplicable
from ppvae.infer.eval_mode import scoring_mode
from ppvae.infer.logweights import plate_nesting
from ppvae.infer.pair import as_pair, is_builtin_vae
from ppvae.infer.sites import discover_sites, guide_draws, per_datapoint_args, take_rows

__all__ = ["ReferencePosterior", "reference_posterior", "posterior_metrics", "run_part"]

RHAT_MAX = 1.01
ESS_MIN = 400.0
_MMD_MAX_POINTS = 2000  # per sample: the kernel matrix of the pooled sample stays ≤ 4000² floats


@dataclass
class ReferencePosterior:
    """NUTS draws of z per datapoint, their convergence diagnostics, and the guide's distance to them.

    Attributes:
        index: ``(K,)`` rows of the data that were sampled.
        draws: ``(K, chains, draws, D)`` NUTS draws of z.
        rhat: ``(K, D)`` rank-normalized split R-hat.
        ess: ``(K, D)`` bulk effective sample size.
        ess_tail: ``(K, D)`` tail effective sample size (of the 5% and 95% quantiles; Vehtari et al. 2021).
        guide_draws: ``(K, L, D)`` draws from q(z | x_k).
        metrics: see :func:`posterior_metrics`; ``(K, D)`` arrays, ``"mmd"`` ``(K,)``.
        attempts: ``(K,)`` 1, or 2 for a datapoint sampled again after its first joint run did not converge.
        run_sizes: ``(K,)`` how many datapoints shared the NUTS run whose draws are kept.
        seconds: wall-clock time of the whole computation.
    """

    index: np.ndarray
    draws: np.ndarray
    rhat: np.ndarray
    ess: np.ndarray
    guide_draws: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    ess_tail: np.ndarray | None = None
    attempts: np.ndarray | None = None
    run_sizes: np.ndarray | None = None
    seconds: float = 0.0

    def converged(self) -> np.ndarray:
        """``(K,)`` bool: R-hat < 1.01 and bulk ESS > 400 in every dimension (one chain: ESS alone, as it has no
        R-hat)."""
        return _passes(self.rhat, self.ess, self.draws.shape[1])

    def summary(self) -> dict[str, Any]:
        """``{"points": rows, "converged": bool}``: one row per datapoint with the worst diagnostics and the guide's
        mean distances over dimensions; ``converged`` when every datapoint's chains converged."""
        m = self.metrics
        points = [
            {
                "index": int(self.index[k]),
                "rhat_max": float(self.rhat[k].max()),
                "ess_min": float(self.ess[k].min()),
                **({} if self.ess_tail is None else {"ess_tail_min": float(self.ess_tail[k].min())}),
                **({} if self.attempts is None else {"attempts": int(self.attempts[k])}),
                "converged": bool(self.converged()[k]),
                "mean_error_sd": float(np.abs(m["mean_error_sd"][k]).mean()),
                "sd_ratio": float(m["sd_ratio"][k].mean()),
                "w1": float(m["w1"][k].mean()),
                "mmd": float(m["mmd"][k]),
            }
            for k in range(len(self.index))
        ]
        return {"points": points, "converged": bool(self.converged().all())}

    def rows(self) -> list[tuple[str, str, str]]:
        """Rows of the diagnosis table: the worst R-hat and the guide's mean distances to the NUTS draws."""
        m = self.metrics
        return [
            ("NUTS reference R-hat max", f"{np.nanmax(self.rhat):.3f}", f"< {RHAT_MAX} converged"),
            ("NUTS reference bulk ESS min", f"{np.nanmin(self.ess):.0f}", f"> {ESS_MIN:.0f} converged"),
            ("NUTS reference converged", f"{int(self.converged().sum())}/{len(self.index)}", "datapoints"),
            ("q vs NUTS |mean err|/sd", f"{np.nanmean(np.abs(m['mean_error_sd'])):.3f}", "0 when q matches"),
            ("q vs NUTS sd ratio", f"{np.nanmean(m['sd_ratio']):.3f}", "1 when q matches"),
        ]

    def figures(self, directory: Path) -> dict[str, Path]:
        """``reference.png``: the guide's marginals against the NUTS draws."""
        from ppvae.report.figures import reference_plot

        return {"reference": reference_plot(self, Path(directory) / "reference.png")}

    def inference_data(self) -> dict[str, Any]:
        """NUTS draws as the group ``reference_posterior`` (``z (chain, draw, reference_point, latent)``) and the
        guide's draws of the same datapoints as ``posterior`` (``z (1, L, reference_point, latent)``)."""
        return {
            "groups": {"reference_posterior": {"z": np.moveaxis(self.draws, 0, 2)}},
            "posterior": {"z": self.guide_draws.transpose(1, 0, 2)[None]},
            "dims": {"z": ["reference_point", "latent"]},
        }


def posterior_metrics(reference: np.ndarray, approx: np.ndarray) -> dict[str, np.ndarray]:
    """Sample-based distances between one reference posterior and an approximation of it.

    Args:
        reference: ``(R, D)`` draws of the reference (MCMC draws, chains pooled).
        approx: ``(L, D)`` draws of the approximation q.

    Returns:
        float64 arrays ``"mean_error_sd"``, ``"sd_ratio"``, ``"w1"`` of shape ``(D,)`` (see the module docstring)
        and ``"mmd"`` of shape ``()``: squared MMD with k(a, b) = exp(−|a − b|² / (2 h²)), h the median pairwise
        distance of the pooled sample (Gretton et al. 2012). Samples over 2000 draws are thinned evenly for MMD.
    """
    ref = np.asarray(reference, dtype=np.float64)
    q = np.asarray(approx, dtype=np.float64)
    if ref.ndim != 2 or q.ndim != 2 or ref.shape[1] != q.shape[1] or len(ref) < 2 or len(q) < 2:
        raise ConfigError(f"need reference (R, D) and approx (L, D) with R, L ≥ 2; got {ref.shape} and {q.shape}")
    sd_ref = ref.std(axis=0, ddof=1)
    from scipy.stats import wasserstein_distance  # SciPy's stats take a second to import: only when used

    w1 = np.array([wasserstein_distance(q[:, d], ref[:, d]) for d in range(ref.shape[1])])
    return {
        "mean_error_sd": (q.mean(axis=0) - ref.mean(axis=0)) / sd_ref,
        "sd_ratio": q.std(axis=0, ddof=1) / sd_ref,
        "w1": w1 / sd_ref,
        "mmd": np.float64(_mmd2(_thin(ref, _MMD_MAX_POINTS), _thin(q, _MMD_MAX_POINTS))),
    }


def _thin(x: np.ndarray, n: int) -> np.ndarray:
    return x if len(x) <= n else x[np.linspace(0, len(x) - 1, n).round().astype(int)]


def _mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD: mean of k over off-diagonal pairs within x and y, minus twice the cross mean."""
    pooled = np.concatenate([x, y])
    sq = np.maximum((pooled**2).sum(1)[:, None] + (pooled**2).sum(1)[None, :] - 2 * pooled @ pooled.T, 0.0)
    iu = np.triu_indices(len(pooled), k=1)
    h2 = np.median(sq[iu])  # median of squared distances = (median distance)²
    k = np.exp(-sq / (2 * h2)) if h2 > 0 else np.ones_like(sq)
    m, n = len(x), len(y)
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def reference_posterior(
    model: Any,
    data: Any,
    *,
    guide: Callable | None = None,
    index: Any = None,
    num_points: int = ReferenceConfig.num_points,
    num_chains: int = ReferenceConfig.num_chains,
    num_warmup: int = ReferenceConfig.num_warmup,
    num_samples: int = ReferenceConfig.num_nuts_draws,
    num_guide_samples: int = ReferenceConfig.num_guide_draws,
    latent_site: str | None = None,
    latent_sites: str | Sequence[str] | None = None,
    points_per_run: int = ReferenceConfig.points_per_run,
    data_plate: str = "data",
    seed: int = 0,
    progress: bool = False,
) -> ReferencePosterior:
    """NUTS on the local latent of ``K`` datapoints, network weights fixed, and the guide compared with it.

    Up to ``points_per_run`` datapoints share one run of Pyro's NUTS on their joint (independent) posterior, each
    datapoint's coordinates whitened by its guide's draws (:mod:`ppvae.diagnostics.nuts_batch`). R-hat and bulk and
    tail ESS are then read per datapoint (ArviZ); the datapoints that did not converge are sampled again, together
    and apart from the rest, with twice the warm-up, and that second run is kept (``attempts``). When
    ``N · log10(N) ≤ 400`` for ``N = num_chains × num_samples`` (N ≤ 190; ArviZ's bound on the bulk ESS of N draws)
    no datapoint can pass the bulk-ESS criterion (:meth:`converged`), and none is sampled again.

    Args:
        model: a :class:`ppvae.VAE`, any object with ``model``/``guide`` methods, or a model function (then
            ``guide`` is required). Weights are frozen while sampling and restored after.
        data: ``(N, *data_shape)`` tensor or array, or a tuple of model arguments (data, labels, masks...), each
            indexed by row.
        guide: the guide function, for a model function (overrides the object's ``guide`` otherwise).
        index: explicit rows of ``data``; else ``num_points`` evenly spaced rows.
        num_chains, num_warmup, num_samples: per run, chains run one after another (seeded from ``seed``, the
            run's first row, its size and the chain: a row's draws depend on the rows it shares a run with).
        num_guide_samples: ``L`` draws of q(z | x_k) for the comparison, and as many for the whitening.
        points_per_run: datapoints sampled together in one NUTS run; 1 gives every datapoint a run of its own.
        latent_site, latent_sites: the local latent site (or sites) kept and compared; default every continuous
            latent in ``data_plate``, found from the trace (:mod:`ppvae.infer.sites`). Enumerated discrete latents
            are marginalized by NUTS (the model's site enumerated in parallel); a model with global latents (outside
            the data plate) is refused, as NUTS on one datapoint would sample them too.
        data_plate: the plate that indexes datapoints.
        progress: show Pyro's progress bars.

    Returns:
        :class:`ReferencePosterior` with ``draws (K, chains, num_samples, D)``; Pyro's global RNG state is
        restored afterwards. Reference: Hoffman & Gelman 2014 (NUTS); Vehtari et al. 2021 (R-hat, ESS).
    """
    start = time.perf_counter()
    model_fn, guide_fn, owner = _resolve(model, guide)
    for name, value in (
        ("num_points", num_points),
        ("num_chains", num_chains),
        ("num_samples", num_samples),
        ("num_guide_samples", num_guide_samples),
        ("points_per_run", points_per_run),
    ):
        check(name, value, Interval(whole=True, low=2 if name in ("num_samples", "num_guide_samples") else 1))
    check("num_warmup", num_warmup, Interval(whole=True, low=0))
    args = _check_data(data)
    n = len(args[0])
    rows = _select(index, num_points, n)
    rng_state = pyro.util.get_rng_state()
    wanted = (latent_site,) if latent_site is not None else latent_sites
    fast = is_builtin_vae(owner) and guide is None and wanted in (None, "z", ("z",))
    a0 = take_rows(args, rows[:1], n)
    runs: dict[int, _Run] = {}
    try:
        # Networks in eval mode (their training flags and buffers given back afterwards; gradients with respect to
        # z stay on for NUTS), in the model's own parameter store (ppvae._param_store), whose weights _frozen fixes.
        evaluating = scoring_mode(owner, model_fn, guide_fn, no_grad=False)
        own_store = model_store(model_fn, guide_fn, owner, exercise=lambda: (guide_fn(*a0), model_fn(*a0)))
        with evaluating, own_store, _frozen(owner):
            names, enumerated = _check_sites(model_fn, guide_fn, a0, wanted, data_plate)
            # The model's own density: a site's scale (poutine.scale, a subsampling plate's N/b) weighs a training
            # loss, and NUTS under it would sample a posterior tempered by it, and by the run's size.
            nuts_model, nesting = _Unscaled()(model_fn), None
            if enumerated:  # marginalized exactly: NUTS sums the model's enumerated sites out of the potential
                nuts_model = poutine.infer_config(
                    nuts_model, lambda msg: {"enumerate": "parallel"} if msg["name"] in enumerated else {}
                )
                nesting = plate_nesting(model_fn, guide_fn, *a0)

            def sample(group: np.ndarray, attempt: int, warmup: int) -> None:
                argk = take_rows(args, group, n)
                pyro.set_rng_seed(_seed(seed, int(group[0]), len(group), attempt, 2))
                layout, begin = model_layout(model_fn, guide_fn, argk, data_plate)
                white = whitening(guide_particles(model_fn, guide_fn, argk, layout, num_guide_samples))
                if fast:  # a ppvae.VAE: its log-density in closed form, without tracing the model per step
                    potential = _vae_potential(owner, argk[0])
                else:
                    potential = pair_potential(nuts_model, argk, layout, begin, nesting)
                seeds = [_seed(seed, int(group[0]), len(group), attempt, 0, c) for c in range(num_chains)]
                u = sample_joint(potential, layout, white, num_chains=num_chains, num_warmup=warmup,
                                 num_samples=num_samples, seeds=seeds, progress=progress)  # fmt: skip
                with torch.no_grad():
                    z = layout.constrained_rows(layout.unflatten(u), names, lead=2)  # (chains, S, K, D)
                    pyro.set_rng_seed(_seed(seed, int(group[0]), len(group), attempt, 1))
                    with poutine.block():
                        q = guide_draws(guide_fn, argk, names, data_plate, num_guide_samples)  # (L, K, D)
                for k, row in enumerate(group):
                    zk, qk = z[:, :, k].double().numpy(), q[:, k].double().numpy()
                    runs[int(row)] = _Run(zk, qk, attempt + 1, len(group))

            for i in range(0, len(rows), points_per_run):
                sample(rows[i : i + points_per_run], 0, num_warmup)
            # One shared step size serves every datapoint of a run; the ones that did not converge are sampled again
            # together, apart from the others, with twice the warm-up, and their second run is the one kept. Runs too
            # short to ever reach the ESS criterion are not: ArviZ's bulk ESS of N draws is at most N·log10(N).
            retry = _ess_bound(num_chains * num_samples) > ESS_MIN
            failed = np.array([r for r in rows if retry and not _converged(runs[int(r)].draws)], dtype=np.int64)
            for i in range(0, len(failed), points_per_run):
                sample(failed[i : i + points_per_run], 1, 2 * num_warmup)
    finally:
        pyro.util.set_rng_state(rng_state)
    draws_arr = np.stack([runs[int(r)].draws for r in rows])
    q_arr = np.stack([runs[int(r)].guide for r in rows])
    per_point = [posterior_metrics(d.reshape(-1, d.shape[-1]), q) for d, q in zip(draws_arr, q_arr, strict=True)]
    return ReferencePosterior(
        index=rows,
        draws=draws_arr,
        rhat=np.stack([rhat(d) for d in draws_arr]).astype(np.float64),
        ess=np.stack([ess(d) for d in draws_arr]).astype(np.float64),
        ess_tail=np.stack([ess(d, "tail") for d in draws_arr]).astype(np.float64),
        guide_draws=q_arr,
        metrics={key: np.stack([m[key] for m in per_point]) for key in per_point[0]},
        attempts=np.array([runs[int(r)].attempts for r in rows], dtype=np.int64),
        run_sizes=np.array([runs[int(r)].run_size for r in rows], dtype=np.int64),
        seconds=time.perf_counter() - start,
    )


class _Unscaled(Messenger):
    """Every site at scale 1: the model's density as scoring reads it (``scaled=False``), not a training loss's."""

    def _process_message(self, msg: dict) -> None:
        msg["scale"] = 1.0


@dataclass(frozen=True)
class _Run:
    """One datapoint's result from a joint NUTS run: draws ``(chains, S, D)``, guide draws ``(L, D)``, which attempt
    produced them and how many datapoints shared the run."""

    draws: np.ndarray
    guide: np.ndarray
    attempts: int
    run_size: int


def _converged(draws: np.ndarray) -> bool:
    """Whether one datapoint's ``draws (chains, S, D)`` pass :func:`_passes`."""
    return bool(_passes(rhat(draws), ess(draws), len(draws)))


def _ess_bound(num_draws: int) -> float:
    """The largest bulk ESS ArviZ reports for ``num_draws`` draws in all: N·log10(N) (its cap on antithetic chains)."""
    return num_draws * math.log10(num_draws)


def _passes(r: np.ndarray, e: np.ndarray, num_chains: int) -> np.ndarray:
    """R-hat < 1.01 and bulk ESS > 400 in every dimension (the last axis of ``r`` and ``e``); one chain has no
    R-hat and passes on its ESS alone."""
    ok = (e > ESS_MIN).all(axis=-1)
    return ok if num_chains < 2 else ok & (r < RHAT_MAX).all(axis=-1)


def _resolve(model: Any, guide: Callable | None) -> tuple[Callable, Callable, nn.Module | None]:
    pair = as_pair(model, guide, what="reference_posterior")
    return pair.model, pair.guide, pair.owner


def _check_data(data: Any) -> tuple[Tensor, ...]:
    """The data as a tuple of model arguments, each indexed by row; the first (what the model scores) finite."""
    args = per_datapoint_args(data) if isinstance(data, tuple) else (as_tensor(data),)
    x = args[0]
    if x.dim() < 1 or len(x) == 0:
        raise DataError(f"data are empty (shape {tuple(x.shape)}); give (N, *data_shape) with N ≥ 1")
    if x.is_floating_point():
        check_finite(x, "data")
    return args


def _select(index: Any, num_points: int, n: int) -> np.ndarray:
    if index is None:
        return np.unique(np.linspace(0, n - 1, min(num_points, n)).round().astype(np.int64))
    rows = np.atleast_1d(np.asarray(index))
    if rows.size == 0 or rows.ndim != 1 or rows.dtype.kind not in "iu" or rows.min() < -n or rows.max() >= n:
        raise ConfigError(f"index must be a non-empty list of row numbers in [0, {n}), got {index!r}")
    return np.where(rows < 0, rows + n, rows).astype(np.int64)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@contextmanager
def _frozen(owner: nn.Module | None) -> Iterator[None]:
    """Fix every network weight (the module's and the parameter store's) and keep modules out of the store.

    NUTS differentiates the potential with respect to z only; frozen weights spare building their graph and
    guarantee that no gradient reaches them. ``requires_grad`` flags are restored on exit.
    """
    tensors = list(owner.parameters()) if owner is not None else []
    tensors += [p for _, p in pyro.get_param_store().named_parameters()]
    flags = [(p, p.requires_grad) for p in tensors]
    with ExitStack() as stack:
        if owner is not None:
            stack.enter_context(local_module_params())
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


def _vae_potential(vae: Any, xk: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
    """U(z) = −log p(z) − log p(x_k | z) of a ppvae.VAE, the negative log joint NUTS integrates (``z: (1, D)``).

    The same density as tracing ``vae.model(x_k)`` (prior and likelihood are the model's own distributions), at a
    fraction of the cost: Pyro's tracing is most of a gradient evaluation for a small decoder.
    """
    prior = vae.prior()

    def potential(params: dict[str, Tensor]) -> Tensor:
        z = params["z"]
        return -(prior.log_prob(z) + vae.decode(z).log_prob(xk)).sum()

    return potential


def _check_sites(
    model_fn: Callable, guide_fn: Callable, args: tuple, wanted: str | Sequence[str] | None, plate: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The local latent sites compared and the enumerated sites NUTS marginalizes; :class:`NotApplicable` (naming
    the pair's sites by role) for a pair NUTS cannot serve."""
    sites = discover_sites(model_fn, guide_fn, args, data_plate=plate)
    names = sites.latents(wanted, "the NUTS reference")
    if sites.global_latents:
        raise NotApplicable(
            f"the NUTS reference samples one datapoint's latents with the model's other variables fixed, but the model "
            f"has global latent sites {list(sites.global_latents)} outside pyro.plate({plate!r}), which NUTS on one "
            "datapoint would sample from that datapoint alone; make them parameters (pyro.param) or fix them"
        )
    if sites.masked:
        raise NotApplicable(
            f"the NUTS reference samples every latent of a datapoint, but the latent sites {list(sites.masked)} are "
            "masked out for some datapoints (a sequence's padding): there the posterior is flat in them and NUTS "
            "would not converge; diagnose datapoints without padding (all steps observed) to get it"
        )
    missing = [s for s in names if s not in sites.guide_sites]
    if missing:
        raise NotApplicable(
            f"the NUTS reference compares the guide's draws of {missing}, which the guide does not sample"
        )
    return names, sites.enumerated


def run_part(inputs: PartInput, config: ReferenceConfig) -> ReferencePosterior:
    """The ``reference`` part of :func:`ppvae.diagnose`."""
    return reference_posterior(
        inputs.model,
        inputs.model_data(),
        guide=inputs.guide,
        num_points=config.num_points,
        num_chains=config.num_chains,
        num_warmup=config.num_warmup,
        num_samples=config.num_nuts_draws,
        num_guide_samples=config.num_guide_draws,
        points_per_run=config.points_per_run,
        latent_sites=inputs.latent_sites,
        data_plate=inputs.data_plate,
        seed=inputs.seed,
    )
