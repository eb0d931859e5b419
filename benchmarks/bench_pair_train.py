"""Training speed of a user's own ``pyro.module`` pair: ``ppvae.fit`` against the loops people write by hand.

The pair is the 784-400-50 Bernoulli VAE of ``bench_train.py`` written the way Pyro's tutorials write it
(``pyro.module`` + model/guide methods). Side by side in this process, interleaved over ``--repeats`` rounds,
each run ``--epochs`` epochs of ``--n`` examples from a fresh network, on 1 thread:

- ``pytorch``: the same networks and loss by hand, ``torch.optim.Adam``;
- ``trace``: ``Trace_ELBO().differentiable_loss`` with one ``torch.optim.Adam`` (Pyro's loop without ``SVI``);
- ``jit``: the same with ``JitTrace_ELBO`` (the last short batch dropped: a traced loss is shape-specialized);
- ``fit``: ``ppvae.fit(pair, x, ...)``, the whole call (its set-up and checks included);
- ``fit-noval``: the same under ``pyro.enable_validation(False)`` (Pyro's own switch; distributions then skip
  their argument checks).

Prints the median seconds per run, the spread (min–max) and the ratio of medians to ``pytorch``. The order of
the loops rotates from round to round (a loop run right after another can be slower by 10–20%).

    python benchmarks/bench_pair_train.py --batch 64 128 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import TorchVAE, load_data  # noqa: E402

import ppvae  # noqa: E402


def loop(x: torch.Tensor, batch: int, epochs: int, kind: str) -> float:
    pyro.clear_param_store()
    net = TorchVAE()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    elbo = JitTrace_ELBO() if kind == "jit" else Trace_ELBO()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            if kind == "jit" and len(idx) < batch:
                continue
            xb = x[idx]
            loss = net.loss(xb) * len(idx) if kind == "pytorch" else elbo.differentiable_loss(net.model, net.guide, xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def fit(x: torch.Tensor, batch: int, epochs: int, validate: bool) -> float:
    pyro.clear_param_store()
    net = TorchVAE()
    before = pyro.poutine.util.is_validation_enabled()
    pyro.enable_validation(validate)
    try:
        t0 = time.perf_counter()
        ppvae.fit(net, x, epochs=epochs, batch_size=batch, lr=1e-3, progress=False, device="cpu", seed=None)
        return time.perf_counter() - t0
    finally:
        pyro.enable_validation(before)


def check_cost() -> None:
    """Milliseconds per call of fit's per-step gradient check, now (a sum) and before (the largest entry)."""
    net = TorchVAE()
    grads = [torch.randn_like(p) for p in net.parameters()]

    def per_call(f) -> float:
        f()
        t0 = time.perf_counter()
        for _ in range(300):
            f()
        return (time.perf_counter() - t0) / 300 * 1e3

    largest = per_call(lambda: torch.stack(torch._foreach_norm(grads, float("inf"))).max())
    total = per_call(lambda: torch.stack([g.sum() for g in grads]).sum())
    print(f"# gradient check per step: largest entry {largest:.2f} ms, sum {total:.2f} ms (300 calls)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument("--n", type=int, default=6400)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-cost", action="store_true", help="only time fit's per-step gradient check")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.check_cost:
        check_cost()
        return
    x, source = load_data(args.n)
    runs = {
        "pytorch": lambda b: loop(x, b, args.epochs, "pytorch"),
        "trace": lambda b: loop(x, b, args.epochs, "trace"),
        "fit-noval": lambda b: fit(x, b, args.epochs, False),
        "fit": lambda b: fit(x, b, args.epochs, True),
        "jit": lambda b: loop(x, b, args.epochs, "jit"),
    }
    versions = f"torch {torch.__version__}, pyro {pyro.__version__}, 1 thread"
    print(f"# {source}: {len(x)} examples x {args.epochs} epochs; {versions}")
    print(f"# {args.repeats} rounds, order rotated; median s per run [min-max]; ratio of medians to pytorch")
    for batch in args.batch:
        times: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.repeats):
            # Each round starts one loop later: a run is slower right after some others (the allocator's state),
            # so no loop always follows the same neighbour.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(runs[name](batch))
        base = statistics.median(times["pytorch"])
        cells = [
            f"{name} {statistics.median(t):.2f} [{min(t):.2f}-{max(t):.2f}] {statistics.median(t) / base:.2f}x"
            for name, t in times.items()
        ]
        print(f"batch {batch:>4}: " + " | ".join(cells))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
