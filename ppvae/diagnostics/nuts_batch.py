"""Many datapoints' posteriors p(z | x_k) in one run of Pyro's NUTS: one vectorized potential, whitened by the guide.

With the network weights fixed and no global latents, the posteriors of K datapoints are independent, so their
product is one posterior over ``(K, D)`` coordinates whose potential is a single batched pass of the decoder. Pyro's
NUTS then pays its per-leapfrog Python overhead once for K datapoints instead of K times (Hoffman & Gelman 2014).

Joint NUTS has one step size and one trajectory length for all K datapoints. Both are set by the hardest
geometry, so the coordinates are first made alike: every datapoint's latents are expressed as

    u_k = μ_k + L_k w_k,

with μ_k and L_k L_kᵀ the mean and covariance of the guide's draws for x_k in NUTS's unconstrained space (a
dense Cholesky factor up to ``DENSE_MAX`` coordinates per datapoint, a diagonal scale above), and NUTS samples
w. This is the preconditioning that neural-transport HMC draws from a variational fit (Hoffman et al. 2019),
with the amortized guide as the fit. The map is affine with a constant Jacobian, so the draws of u are exact
posterior draws whatever the guide's quality; a poor guide only makes sampling slower. Because an amortized
mean-field guide misses the posterior's correlations, the warm-up re-whitens each datapoint with the mean and
covariance of a first stage of NUTS draws (:func:`sample_joint`; a Laplace approximation per datapoint,
:func:`laplace_whitening`, can refine the guide's whitening before it, off by default), and Pyro's diagonal
mass-matrix adaptation corrects what scale remains wrong, coordinate by coordinate. What stays shared is the step
size: a datapoint whose posterior is far from Gaussian (multimodal, heavy-tailed) can still mix badly. Convergence is
therefore read per datapoint (:mod:`ppvae.diagnostics.reference`), and the datapoints that fail are sampled again,
apart from the others. R̂ over two chains cannot see a mode that neither of them reaches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.mcmc.util import initialize_model
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

__all__ = ["Layout", "Whitening", "model_layout", "whitening", "pair_potential", "sample_joint"]

DENSE_MAX = 64  # coordinates per datapoint up to which the guide's covariance is used in full
_PARTICLES = "_ppvae_reference_particles"
# Trajectories of the first stage stop at 2^5 − 1 leapfrog steps: its draws only estimate a covariance, and on a
# poor guide's whitening, before the mass matrix is adapted, NUTS would run up to 1023 steps per iteration.
PILOT_DEPTH = 5
PILOT_MIN_WARMUP = 30  # warm-up iterations below which there is no first stage
# Newton iterations for each run's Laplace approximation (:func:`laplace_whitening`) before the first stage; 0, the
# default, keeps the guide's whitening. On 50 Fashion-MNIST posteriors the Laplace start did not measurably cut the
# gradients (the first stage's count moved by ±15% between runs, as much as chance moves it) and it starts every
# chain near one mode, where R̂ over two chains sees less (benchmarks/RESULTS.md): a knob to measure, not a default.
LAPLACE_ITER = 0
_LAPLACE_TOL = 1e-4  # Newton decrement at which a mode counts as found: within 0.01 of its sd in every direction
_LAPLACE_MAX_STEP = 4.0  # whitened units (the guide's sds) a datapoint moves per Newton iteration, at most


@dataclass(frozen=True)
class Layout:
    """Where one datapoint's unconstrained latents sit in the sites NUTS samples, for a batch of K datapoints.

    Attributes:
        names: every continuous latent site of the model, in trace order.
        shapes: each site's unconstrained value shape for the K datapoints (the data plate's axis of size K).
        axes: the axis of each value that indexes datapoints.
        transforms: constrained → unconstrained bijection of each site (``biject_to(support).inv``).
        event_dims: each site's event dimensions, to read its constrained value per datapoint.
    """

    names: tuple[str, ...]
    shapes: dict[str, torch.Size]
    axes: dict[str, int]
    transforms: dict[str, torch.distributions.Transform]
    event_dims: dict[str, int]

    @property
    def sizes(self) -> dict[str, int]:
        """Unconstrained coordinates of each site per datapoint."""
        return {n: math.prod(self.shapes[n]) // self.shapes[n][self.axes[n]] for n in self.names}

    @property
    def size(self) -> int:
        """``D``: unconstrained coordinates per datapoint, all sites together."""
        return sum(self.sizes.values())

    def flatten(self, values: dict[str, Tensor], lead: int = 0) -> Tensor:
        """Site values (with ``lead`` extra leading axes, such as draws) → ``(*lead, K, D)``."""
        parts = []
        for n in self.names:
            v = values[n].movedim(lead + self.axes[n], lead)
            parts.append(v.reshape(*v.shape[: lead + 1], -1))
        return torch.cat(parts, -1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``(*lead, K, D)`` → unconstrained site values shaped ``(*lead, *shapes[name])``."""
        lead = flat.shape[:-2]
        out, start = {}, 0
        for n in self.names:
            shape, axis, size = self.shapes[n], self.axes[n], self.sizes[n]
            rest = shape[:axis] + shape[axis + 1 :]
            v = flat[..., start : start + size].reshape(*lead, shape[axis], *rest)
            out[n] = v.movedim(len(lead), len(lead) + axis)
            start += size
        return out

    def constrained_rows(self, unconstrained: dict[str, Tensor], names: Sequence[str], lead: int = 1) -> Tensor:
        """The constrained values of ``names`` per datapoint, flattened and joined: ``(*lead, K, D_names)``."""
        parts = []
        for n in names:
            v = self.transforms[n].inv(unconstrained[n]).movedim(lead + self.axes[n], lead)
            parts.append(v.reshape(*v.shape[: lead + 1], -1))
        return torch.cat(parts, -1)


def model_layout(model: Callable, guide: Callable, args: tuple, plate: str) -> tuple[Layout, dict[str, Tensor]]:
    """The layout of the model's continuous latents on the batch ``args``, and one guide draw of them.

    The model is replayed on a draw of the guide, so a latent the guide does not sample gets a draw from the
    model. Returns the layout and that draw, unconstrained (NUTS's starting point for an enumerated model).
    """
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args)
        trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    shapes, axes, transforms, events, start = {}, {}, {}, {}, {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if site["fn"].support.is_discrete or site["infer"].get("enumerate"):
            continue
        frame = next(f for f in site["cond_indep_stack"] if f.name == plate)
        t = biject_to(site["fn"].support).inv
        u = t(site["value"])
        events[name] = site["fn"].event_dim
        axes[name] = site["value"].dim() - events[name] + frame.dim  # batch axes lead in both spaces
        shapes[name], transforms[name], start[name] = u.shape, t, u
    return Layout(tuple(shapes), shapes, axes, transforms, events), start


@dataclass(frozen=True)
class Whitening:
    """``u = loc + tril @ w`` per datapoint: ``loc (K, D)``, ``tril (K, D, D)`` lower triangular (diagonal when
    the latents are many)."""

    loc: Tensor
    tril: Tensor

    def __call__(self, w: Tensor) -> Tensor:
        """``(*lead, K, D)`` whitened → unconstrained coordinates."""
        return self.loc + (self.tril @ w.unsqueeze(-1)).squeeze(-1)

    def inverse(self, u: Tensor) -> Tensor:
        """``(K, D)`` unconstrained → whitened coordinates."""
        solved = torch.linalg.solve_triangular(self.tril, (u - self.loc).unsqueeze(-1), upper=False)
        return solved.squeeze(-1)


def whitening(draws: Tensor, dense_max: int = DENSE_MAX) -> Whitening:
    """The affine map that whitens the guide's ``draws (L, K, D)`` (unconstrained): their mean and the Cholesky
    factor of their covariance (or their standard deviations, for ``D > dense_max`` or ``L ≤ 2 D``).

    Coordinates where the guide hardly varies (a point-mass guide) get a scale floor of 1e-3 of the median scale
    (1 where every scale is 0), so NUTS starts with steps it can take; its mass-matrix adaptation does the rest.
    """
    x = draws.double()
    num, _, d = x.shape
    loc = x.mean(0)
    sd = x.std(0) if num > 1 else torch.ones_like(loc)
    median = sd.median()
    floor = 1e-3 * median if median > 0 else torch.ones((), dtype=x.dtype)
    sd = torch.clamp(sd, min=float(floor))
    if d <= dense_max and num > 2 * d:
        centred = (x - loc) / sd
        corr = torch.einsum("lki,lkj->kij", centred, centred) / (num - 1)
        # A floored coordinate's variance is below 1 in these units: lift it to 1, so its scale is the floor itself
        # (adding to the diagonal keeps the matrix positive definite).
        lift = torch.clamp(1.0 - torch.diagonal(corr, dim1=-2, dim2=-1), min=0.0)
        corr = corr + torch.diag_embed(lift) + 1e-6 * torch.eye(d, dtype=x.dtype)
        chol, info = torch.linalg.cholesky_ex(corr)
        if bool((info == 0).all()):
            return Whitening(loc.to(draws.dtype), (sd.unsqueeze(-1) * chol).to(draws.dtype))
    return Whitening(loc.to(draws.dtype), torch.diag_embed(sd).to(draws.dtype))


def laplace_whitening(
    potential: Callable[[dict[str, Tensor]], Tensor], layout: Layout, white: Whitening, max_iter: int | None = None
) -> Whitening:
    """Each datapoint's Laplace approximation, found from ``white`` (the guide's whitening): the mode of its
    posterior and the inverse of the potential's Hessian there, ``u_k ≈ N(û_k, H_k⁻¹)`` (MacKay 2003, ch. 27).

    The potential is a sum over datapoints, so its Hessian is block diagonal, and D Hessian-vector products give
    every datapoint's ``(D, D)`` block at once. The modes are found by Newton's method in the whitened coordinates,
    from the guide's mean: every datapoint's step is ``−|H_k|⁻¹ g_k`` (eigenvalues taken in absolute value, so a
    step away from a saddle still descends; Dauphin et al. 2014), at most ``_LAPLACE_MAX_STEP`` long, scaled by one
    backtracking factor for the summed potential (Armijo) until every datapoint is in its quadratic region (Newton
    decrement below 1e-2), and then taken whole. It stops when every datapoint's Newton decrement ``g_kᵀ|H_k|⁻¹g_k``
    (its squared distance to the mode in the approximation's standard deviations) is below ``_LAPLACE_TOL``, after
    ``max_iter`` (default ``LAPLACE_ITER``) iterations, or when no step decreases the potential. A datapoint keeps
    the guide's whitening where its Hessian is not positive definite or its decrement not small at the end (no mode
    found: a flat direction, a saddle), or where its gradient or Hessian is not finite (it is then left where it
    is while the others move on); every datapoint keeps it when the potential is not twice differentiable, when its
    value is not finite (the sum hides which datapoint's is not), or with more than ``DENSE_MAX`` coordinates per
    datapoint.
    """
    k, d = white.loc.shape
    max_iter = LAPLACE_ITER if max_iter is None else max_iter
    if d > DENSE_MAX or max_iter <= 0:
        return white
    dtype = white.loc.dtype

    def value(v: Tensor) -> Tensor:
        return potential(layout.unflatten(white(v)))

    def curvature(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v = v.detach().requires_grad_(True)
        u = value(v)
        (grad,) = torch.autograd.grad(u, v, create_graph=True)
        # column j of every datapoint's block at once: the summed potential's Hessian times e_j in every row
        cols = [torch.autograd.grad(grad[:, j].sum(), v, retain_graph=j < d - 1)[0] for j in range(d)]
        hess = torch.stack(cols, dim=-1).detach().double()
        return u.detach().double(), grad.detach().double(), 0.5 * (hess + hess.mT)

    def finite(grad: Tensor, hess: Tensor) -> Tensor:
        return torch.isfinite(grad).all(-1) & torch.isfinite(hess).flatten(1).all(-1)

    eye = torch.eye(d, dtype=torch.float64)
    try:
        with torch.enable_grad():
            w = torch.zeros(k, d, dtype=torch.float64)
            u, grad, hess = curvature(w.to(dtype))
            live = finite(grad, hess)  # datapoints still moved: a non-finite one is frozen, not all
            for _ in range(max_iter):
                live = live & finite(grad, hess)
                if not (bool(live.any()) and torch.isfinite(u)):
                    break
                g = torch.where(live[:, None], grad, 0.0)
                evals, evecs = torch.linalg.eigh(torch.where(live[:, None, None], hess, eye))
                convex = bool((evals[live, 0] > 0).all())
                scale = evals.abs().amax(-1, keepdim=True).clamp(min=1e-30)
                evals = evals.abs().clamp(min=1e-8 * scale)
                newton = -(evecs @ ((evecs.mT @ g[..., None]) / evals[..., None]))[..., 0]
                decrement = -(g * newton).sum(-1)  # g'|H|⁻¹g: squared distance to the mode, in its sds
                if float(decrement.max()) < _LAPLACE_TOL:
                    break
                # At most MAX_STEP whitened units per datapoint and iteration (a trust region): a nearly flat
                # direction's huge step must not make the one backtracking factor tiny for every datapoint.
                length = newton.norm(dim=-1, keepdim=True).clamp(min=1e-30)
                step = newton * (_LAPLACE_MAX_STEP / length).clamp(max=1.0)
                slope = -(g * step).sum()
                if convex and float(decrement.max()) < 1e-2:
                    # Every datapoint in its quadratic region: Newton's full step, without a line search, whose test
                    # on the summed potential (thousands of nats) would not resolve the last digits in float32.
                    trial = w + step
                else:
                    alpha, trial = 1.0, None
                    for _ in range(30):  # backtracking on the summed potential, one factor for every datapoint
                        candidate = w + alpha * step
                        with torch.no_grad():
                            new = value(candidate.to(dtype)).double()
                        if torch.isfinite(new) and new <= u - 1e-4 * alpha * slope:
                            trial = candidate
                            break
                        alpha *= 0.5
                    if trial is None:
                        break
                w = trial
                u, grad, hess = curvature(w.to(dtype))
    except RuntimeError:  # not twice differentiable (a custom autograd function without a double backward)
        return white
    live = live & finite(grad, hess)
    hess = torch.where(live[:, None, None], hess, eye)
    grad = torch.where(live[:, None], grad, 0.0)
    factor, info = torch.linalg.cholesky_ex(hess)
    inverse_grad = torch.cholesky_solve(grad[..., None], torch.where((info == 0)[:, None, None], factor, eye))[..., 0]
    ok = live & (info == 0) & ((grad * inverse_grad).sum(-1) < _LAPLACE_TOL) & torch.isfinite(w).all(-1)
    factor = torch.where(ok[:, None, None], factor, eye)
    cov = torch.cholesky_inverse(factor)  # H⁻¹ in the whitened coordinates
    chol, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.mT))
    ok = ok & (info == 0) & torch.isfinite(chol).flatten(1).all(1)
    tril = torch.where(ok[:, None, None], white.tril.double() @ chol, white.tril.double()).to(white.tril.dtype)
    loc = torch.where(ok[:, None], white(w.to(dtype)), white.loc)
    return Whitening(loc, tril)


def guide_particles(model: Callable, guide: Callable, args: tuple, layout: Layout, num: int) -> Tensor:
    """``(L, K, D)`` unconstrained draws of every latent in ``layout``: the guide's, and the model's given the
    guide's for the latents the guide does not sample. One vectorized run in a particle plate, or ``num`` runs for
    a pair that does not broadcast over one."""

    def joint() -> dict[str, Tensor]:
        guide_trace = poutine.trace(guide).get_trace(*args)
        nodes = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args).nodes
        return {n: layout.transforms[n](nodes[n]["value"]) for n in layout.names}

    with poutine.block(), torch.no_grad():
        dims = [f.dim for s in poutine.trace(guide).get_trace(*args).nodes.values() if s["type"] == "sample"
                for f in s["cond_indep_stack"]]  # fmt: skip
        dim = min([-1, *dims, *[-len(layout.shapes[n]) for n in layout.names]]) - 1
        try:
            with pyro.plate(_PARTICLES, num, dim=dim):
                values = joint()
            shaped = {n: v.reshape(num, *layout.shapes[n]) for n, v in values.items()}
            flat = layout.flatten(shaped, lead=1)
            if num == 1 or not bool((flat[1:] == flat[:1]).all()):
                return flat
        except Exception:  # noqa: BLE001 - a pair that cannot take an outer plate is run once per draw below
            pass
        return torch.stack([layout.flatten(joint()) for _ in range(num)])


def pair_potential(
    model: Callable, args: tuple, layout: Layout, start: dict[str, Tensor], max_plate_nesting: int | None
) -> Callable[[dict[str, Tensor]], Tensor]:
    """Pyro's potential energy of ``model(*args)`` (−log joint in unconstrained space, Jacobians included,
    enumerated sites summed out), as Pyro's NUTS builds it for the model (``initialize_model``)."""
    _, potential, _, _ = initialize_model(
        model, model_args=args, max_plate_nesting=max_plate_nesting, initial_params=start
    )
    return potential


def sample_joint(
    potential: Callable[[dict[str, Tensor]], Tensor],
    layout: Layout,
    white: Whitening,
    *,
    num_chains: int,
    num_warmup: int,
    num_samples: int,
    seeds: Sequence[int],
    progress: bool = False,
) -> Tensor:
    """NUTS on the whitened coordinates of K datapoints at once, chains one after another, warmed up in two stages.

    The guide's Gaussian is only a first whitening: an amortized mean-field guide misses the posterior's
    correlations, and joint NUTS then takes long trajectories of short steps (85 leapfrog steps per iteration for
    20 Fashion-MNIST posteriors, against about 21 after re-whitening; counted as ``benchmarks/RESULTS.md`` says).
    So the warm-up is spent in two stages (after :func:`laplace_whitening` when ``LAPLACE_ITER`` > 0):

    1. a third of it as Pyro's NUTS warm-up on the guide-whitened coordinates, a third as draws from that run;
    2. those draws, pooled over chains, re-estimate each datapoint's mean and covariance (:func:`whitening`), and
       each chain restarts from its last draw in the new coordinates, with the last third as a fresh warm-up of
       step size and diagonal mass, followed by the ``num_samples`` draws that are kept.

    Every stage is exact NUTS on an affine reparameterization, so only efficiency depends on the whitenings.
    Under 30 warm-up steps there is no first stage.

    Args:
        potential: −log joint of the K datapoints, taking unconstrained site values (``layout``'s shapes).
        white: the whitening of each datapoint's coordinates from the guide (:func:`whitening`).
        num_warmup: warm-up iterations per chain, both stages together (none of them kept).
        seeds: one seed per chain; each chain starts at a draw of ``w ~ N(0, I)`` (the guide's Gaussian, or
            a datapoint's Laplace Gaussian where one was found).

    Returns:
        ``(chains, num_samples, K, D)`` unconstrained draws.
    """
    dtype = white.loc.dtype
    seeds = list(seeds[:num_chains])
    white = laplace_whitening(potential, layout, white)
    first = num_warmup // 3 if num_warmup >= PILOT_MIN_WARMUP else 0
    starts = []
    for seed in seeds:
        pyro.set_rng_seed(seed)
        starts.append(white(torch.randn(white.loc.shape, dtype=dtype)))
    if first:
        pilot = [_nuts(potential, layout, white, start, first, first, progress, PILOT_DEPTH) for start in starts]
        white = whitening(torch.cat(pilot))
        starts = [draws[-1] for draws in pilot]
    chains = []
    for seed, start in zip(seeds, starts, strict=True):
        pyro.set_rng_seed((seed + 1) % 2**32)  # a seed of its own for the second stage (numpy's seeds are < 2³²)
        chains.append(_nuts(potential, layout, white, start, num_warmup - 2 * first, num_samples, progress))
    return torch.stack(chains)


def _nuts(
    potential: Callable[[dict[str, Tensor]], Tensor],
    layout: Layout,
    white: Whitening,
    start: Tensor,
    num_warmup: int,
    num_samples: int,
    progress: bool,
    max_tree_depth: int = 10,
) -> Tensor:
    """One chain of Pyro's NUTS (diagonal mass) on ``w`` with ``u = white(w)``, from ``start (K, D)`` in u:
    ``(num_samples, K, D)`` draws of u."""

    def whitened(params: dict[str, Tensor]) -> Tensor:
        return potential(layout.unflatten(white(params["w"])))

    kernel = NUTS(potential_fn=whitened, full_mass=False, max_tree_depth=max_tree_depth)
    mcmc = MCMC(kernel, num_samples, warmup_steps=num_warmup, initial_params={"w": white.inverse(start)},
                disable_progbar=not progress)  # fmt: skip
    mcmc.run()
    return white(mcmc.get_samples()["w"].detach())
