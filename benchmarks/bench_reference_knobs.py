"""What the joint NUTS reference's knobs cost: potential calls per stage, retries and ESS on 50 Fashion-MNIST images.

The model and data are ``bench_reference.py``'s (load a saved VAE with ``--model``). One variant per call, on one
thread; the number of potential evaluations per stage (the pilot, depth-capped, and the main stage) does not depend
on the machine's load, so variants can run side by side and be compared on those counts. Variants, joined by commas:

- ``base``: the defaults (450 warm-up, 1000 draws per chain, target acceptance 0.8);
- ``acceptP``: NUTS's target acceptance probability P in both stages;
- ``pilotF``: the first stage keeps F × its draws for the re-whitening;
- ``depthN``: the first stage's tree depth capped at N;
- ``drawsN``: N draws per chain;
- ``nopilot``: no first stage (one stage of NUTS, all the warm-up on the Laplace or guide whitening);
- ``perrunN``: N datapoints per joint run (``reference_points_per_run``; default 50);
- ``laplaceN``: at most N Newton iterations for the Laplace whitening (``laplace0``: the guide's whitening alone);
  its count is one potential call per iteration, each with D more Hessian-vector products.

    python benchmarks/bench_reference_knobs.py base --model /tmp/fm1.ppvae
    python benchmarks/bench_reference_knobs.py accept0.65,draws700 --model /tmp/fm1.ppvae
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_evaluate import build_vae, load_splits  # noqa: E402

from ppvae.diagnostics import nuts_batch, reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", help="base, or comma-separated variants (the list above)")
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--model", default=None, help="a saved ppvae.VAE (default: train one for 1 epoch)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}
    stage = ["main"]
    draws, pilot_fraction, per_run = 1000, 1.0, reference.ReferenceConfig.points_per_run

    vae_potential = reference._vae_potential

    def counting(vae, xk):  # every evaluation of the potential, by stage
        potential = vae_potential(vae, xk)

        def counted(params):
            counts[stage[0]] = counts.get(stage[0], 0) + 1
            return potential(params)

        return counted

    nuts = nuts_batch._nuts

    def timed(potential, layout, white, start, num_warmup, num_samples, progress, max_tree_depth=10):
        stage[0] = "pilot" if max_tree_depth != 10 else "main"
        if stage[0] == "pilot":
            num_samples = max(2, int(num_samples * pilot_fraction))
        t = time.perf_counter()
        out = nuts(potential, layout, white, start, num_warmup, num_samples, progress, max_tree_depth)
        seconds[stage[0]] = seconds.get(stage[0], 0.0) + time.perf_counter() - t
        return out

    laplace = nuts_batch.laplace_whitening

    def timed_laplace(*a, **kw):
        stage[0] = "laplace"
        t = time.perf_counter()
        out = laplace(*a, **kw)
        seconds["laplace"] = seconds.get("laplace", 0.0) + time.perf_counter() - t
        return out

    reference._vae_potential, nuts_batch._nuts, nuts_batch.laplace_whitening = counting, timed, timed_laplace
    for part in args.variant.split(","):
        if part.startswith("accept"):
            accept, kernel = float(part[6:]), nuts_batch.NUTS
            nuts_batch.NUTS = lambda *a, _k=kernel, _p=accept, **kw: _k(*a, target_accept_prob=_p, **kw)
        elif part.startswith("pilot"):
            pilot_fraction = float(part[5:])
        elif part.startswith("depth"):
            nuts_batch.PILOT_DEPTH = int(part[5:])
        elif part.startswith("perrun"):
            per_run = int(part[6:])
        elif part == "nopilot":
            nuts_batch.PILOT_MIN_WARMUP = 10**9
        elif part.startswith("laplace"):
            nuts_batch.LAPLACE_ITER = int(part[7:])
        elif part.startswith("draws"):
            draws = int(part[5:])
        elif part != "base":
            parser.error(f"unknown variant {part!r}")
    splits = load_splits()
    vae = build_vae(splits, 1, args.model)
    x = torch.as_tensor(splits.test[:1000])
    t0 = time.perf_counter()
    ref = reference.reference_posterior(vae, x, num_points=args.points, num_warmup=450, num_samples=draws,
                                        points_per_run=per_run, seed=0)  # fmt: skip
    bulk = ref.ess.min(1)
    print(json.dumps({
        "variant": args.variant, "points": args.points, "seconds": round(time.perf_counter() - t0, 1),
        "potential_calls": counts, "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "converged": int(ref.converged().sum()), "retried": int((ref.attempts > 1).sum()),
        "ess_min": round(float(bulk.min()), 1), "ess_q10": round(float(np.quantile(bulk, 0.1)), 1),
        "ess_median": round(float(np.median(bulk)), 1), "rhat_max": round(float(ref.rhat.max()), 4),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
