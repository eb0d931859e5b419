"""NUTS reference posteriors: many datapoints in one run (``ppvae``'s reference) against Pyro's NUTS per datapoint.

The model is the CLI's default Fashion-MNIST VAE (784-400-16 MLP encoder, 16-400-(3×784) decoder, discretized
logistic likelihood; see ``bench_evaluate.py``), trained for ``--epochs`` of ``ppvae.fit``, or loaded with
``--model``. Both sides sample p(z | x_k) of test images with the weights fixed, 2 chains of ``--warmup`` +
``--draws`` each:

- ``ppvae``: :func:`ppvae.diagnostics.reference.reference_posterior` on ``--points`` evenly spaced test images, up to
  ``--per-run`` of them in one NUTS run (their coordinates whitened by the guide, then by a first stage of NUTS),
  failed ones sampled again;
- ``pyro``: Pyro's NUTS on one datapoint at a time, dense mass matrix, the VAE's log joint as its potential (what
  the reference did before it sampled datapoints together), on the first ``--baseline-points`` of those images.

Reported per side: seconds per datapoint, the datapoints that reached R̂ < 1.01 and bulk ESS ≥ 400 in every
coordinate, the worst R̂, the smallest bulk and tail ESS, and bulk ESS per second (each datapoint's smallest bulk
ESS over its coordinates, divided by the seconds spent per datapoint; median over datapoints). One thread.

    python benchmarks/bench_reference.py                       # 100 images, 1-epoch VAE
    python benchmarks/bench_reference.py --points 20 --baseline-points 2

Target (issue 13): 100 test images with R̂ < 1.01 and bulk ESS ≥ 400 for every coordinate in ≤ 10 min.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS

sys.path.insert(0, str(Path(__file__).parent))
from bench_evaluate import build_vae, load_splits  # noqa: E402

import ppvae  # noqa: E402
from ppvae.diagnostics.arviz_io import ess, rhat  # noqa: E402
from ppvae.diagnostics.config import ReferenceConfig  # noqa: E402
from ppvae.diagnostics.reference import reference_posterior  # noqa: E402


def pyro_per_datapoint(vae: ppvae.VAE, x: torch.Tensor, warmup: int, draws: int, seed: int) -> np.ndarray:
    """Pyro's NUTS on p(z | x) of one datapoint, 2 chains one after the other: ``(2, draws, D)``."""
    prior = vae.prior()

    def potential(params: dict[str, torch.Tensor]) -> torch.Tensor:
        z = params["z"]
        return -(prior.log_prob(z) + vae.decode(z).log_prob(x)).sum()

    chains = []
    for c in range(2):
        pyro.set_rng_seed(seed + c)
        with torch.no_grad():
            z0 = vae.encode(x).sample()
        mcmc = MCMC(NUTS(potential_fn=potential, full_mass=True), draws, warmup_steps=warmup,
                    initial_params={"z": z0}, disable_progbar=True)  # fmt: skip
        mcmc.run()
        chains.append(mcmc.get_samples()["z"].reshape(draws, -1).double().numpy())
    return np.stack(chains)


def report(name: str, seconds: float, draws: np.ndarray) -> None:
    """One line of figures for ``draws (K, chains, S, D)`` that took ``seconds`` in all."""
    r = np.stack([rhat(d) for d in draws])
    bulk = np.stack([ess(d) for d in draws])
    tail = np.stack([ess(d, "tail") for d in draws])
    per_point = seconds / len(draws)
    ok = ((r < 1.01).all(1) & (bulk >= 400).all(1)).sum()
    ess_per_s = np.median(bulk.min(1) / per_point)
    print(
        f"{name:6s} points={len(draws):4d} seconds={seconds:8.1f} s/point={per_point:7.2f} converged={ok}/{len(draws)} "
        f"rhat_max={r.max():.4f} bulk_ess_min={bulk.min():.0f} tail_ess_min={tail.min():.0f} "
        f"bulk_ess_per_s(median)={ess_per_s:.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--per-run", type=int, default=ReferenceConfig.points_per_run)
    parser.add_argument("--baseline-points", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=ReferenceConfig.num_warmup)
    parser.add_argument("--draws", type=int, default=ReferenceConfig.num_nuts_draws)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model", default=None, help="a saved ppvae.VAE to load instead of training one")
    parser.add_argument("--save", default=None, help="save the trained VAE here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__} pyro {pyro.__version__} "
          f"python {platform.python_version()} threads 1", flush=True)  # fmt: skip
    splits = load_splits()
    vae = build_vae(splits, args.epochs, args.model)
    if args.save:
        ppvae.save(vae, args.save)
    x = torch.as_tensor(splits.test[:1000])
    t0 = time.perf_counter()
    ref = reference_posterior(vae, x, num_points=args.points, num_warmup=args.warmup, num_samples=args.draws,
                              points_per_run=args.per_run, seed=0)  # fmt: skip
    report("ppvae", time.perf_counter() - t0, ref.draws)
    print(f"       retried={int((ref.attempts > 1).sum())} run sizes={sorted(set(ref.run_sizes.tolist()))}", flush=True)
    if args.baseline_points:
        rows = ref.index[: args.baseline_points]
        for p in vae.parameters():  # weights fixed, as the reference fixes them
            p.requires_grad_(False)
        t0 = time.perf_counter()
        base = np.stack([pyro_per_datapoint(vae, x[r : r + 1], args.warmup, args.draws, int(r)) for r in rows])
        report("pyro", time.perf_counter() - t0, base)


if __name__ == "__main__":
    main()
