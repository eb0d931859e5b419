"""log p̂ throughput of ``ppvae.evaluate`` vs a hand-written vectorized PyTorch IWAE of the same networks.

The model is what ``ppvae train --dataset fashion-mnist`` builds by default: images (1, 28, 28) scaled to 256 grey
levels, a 784-400-16 MLP encoder and 16-400-(3×784) MLP decoder (softplus), mean-field Normal guide, N(0, I) prior
and a one-component discretized logistic likelihood over 256 levels (``ppvae.blocks.specs.default_likelihood``), trained
for ``--epochs`` (default 1) of ``ppvae.fit`` at the CLI's defaults (batch 128, lr 1e-3, seed 0) on the training
split; ``--epochs 0`` keeps the random initialization.

The reference computes the same IWAE_S estimate, log p̂(x) = logsumexp_s [log p(x|z_s) + log p(z_s) − log q(z_s|x)]
− log S, directly from the VAE's own encoder, guide head and decoder modules: reparameterized draws vectorized over
(particles, datapoints), Normal densities and the discretized-logistic bin probability written out by hand, the
same batch of datapoints and the same number of particles per chunk as ``evaluate`` (its ``_CHUNK_ELEMENTS``
budget). Both run one after the other in this process, interleaved over ``--repeats`` rounds; the fastest run of
each is reported as datapoint·samples per second, with the ratio, and their mean log p̂ are compared (they use
different random draws, so they agree within Monte Carlo error).

    python benchmarks/bench_evaluate.py                  # 256 test images, S = 1000
    python benchmarks/bench_evaluate.py --memory         # S = 5000 over all 10,000 test images, fresh process
    python benchmarks/bench_evaluate.py --pair           # also the same networks as a user's pyro.module pair

Targets (issue 3): ppvae.evaluate ≥ 0.8× the reference's throughput; peak memory ≤ 2 GiB for S = 5000 over the
10,000 Fashion-MNIST test images.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from torch import Tensor
from torch.nn import functional as F

import ppvae
from ppvae.blocks.specs import default_likelihood

evaluate_module = importlib.import_module("ppvae.diagnostics.evaluation")  # where evaluate keeps its chunk budget

LATENT_DIM = 16  # the CLI's --latent-dim default


def load_splits() -> ppvae.data.DataSplits:
    try:
        return ppvae.data.load("fashion-mnist", download=False)
    except ppvae.DataError as err:
        sys.exit(f"this benchmark needs the Fashion-MNIST files: {err}")


def build_vae(splits: ppvae.data.DataSplits, epochs: int, path: str | None = None) -> ppvae.VAE:
    """The CLI's default VAE for this data (same blocks as ``ppvae train --dataset fashion-mnist``), or a saved one."""
    if path:
        return ppvae.load(path).eval()
    likelihood = default_likelihood(splits)
    torch.manual_seed(0)  # as the CLI seeds the initial weights with --seed (default 0)
    vae = ppvae.VAE(splits.data_shape, LATENT_DIM, likelihood={"name": likelihood, "kwargs": {"levels": splits.levels}})
    if epochs:
        ppvae.fit(vae, splits.train, epochs=epochs, batch_size=128, lr=1e-3, seed=0, progress=False, device="cpu")
    return vae.eval()


def particles_per_chunk(rows: int, out_size: int, num_samples: int) -> int:
    """The number of particles ``evaluate`` puts in one chunk of ``rows`` datapoints (its memory budget)."""
    return max(1, min(num_samples, evaluate_module._CHUNK_ELEMENTS // (rows * out_size)))


@torch.no_grad()
def iwae_torch(vae: ppvae.VAE, x: Tensor, num_samples: int, batch_size: int) -> Tensor:
    """Hand-written IWAE_S log p̂(x) per datapoint (nats), ``(N,)`` float64, with the VAE's own networks.

    q(z|x) = N(mu, diag sigma²) from the guide head; p(z) = N(0, I); p(x|z): one logistic (mean m, log-scale
    clamped as the likelihood does) integrated over the pixel's bin [c − h, c + h], c = k / 255, h = 1/510, the
    first and last bins extended to ∓∞; log of the bin mass via log σ(u) + log σ(−w) + log(1 − e^(w − u)).
    """
    lik = vae.likelihood
    n = lik.levels - 1
    d = vae.latent_dim
    log_2pi = math.log(2 * math.pi)
    out_size = lik.num_params * math.prod(vae.data_shape)
    results = []
    for xb in x.split(batch_size):
        b = len(xb)
        c = torch.round(xb.reshape(b, -1) * n) / n  # bin centres, (B, 784)
        first, last = c == 0, c == 1
        inner = ~(first | last)
        loc, scale = vae.guide_head.loc_scale(vae.encoder(xb))  # (B, D) each
        log_q_norm = scale.log().sum(-1) + 0.5 * d * log_2pi
        chunk = particles_per_chunk(b, out_size, num_samples)
        lws = []
        for s0 in range(0, num_samples, chunk):
            k = min(chunk, num_samples - s0)
            eps = torch.randn(k, b, d)
            z = loc + scale * eps  # (k, B, D)
            log_q = -0.5 * eps.square().sum(-1) - log_q_norm
            log_p = -0.5 * z.square().sum(-1) - 0.5 * d * log_2pi
            params = vae.decoder(z).reshape(k, b, lik.num_params, -1)  # mixture logit (one component), mean, log-scale
            m, log_s = params[:, :, 1], params[:, :, 2].clamp_min(lik.min_log_scale)
            inv_s = torch.exp(-log_s)
            cm = c - m
            log_cdf_upper = torch.where(last, 0.0, -F.softplus(-(cm + 0.5 / n) * inv_s))
            log_sf_lower = torch.where(first, 0.0, -F.softplus((cm - 0.5 / n) * inv_s))
            log_width = torch.where(inner, torch.log(-torch.expm1(-inv_s / n)), 0.0)
            log_lik = (log_cdf_upper + log_sf_lower + log_width).sum(-1)
            lws.append(log_lik + log_p - log_q)  # (k, B)
        lw = torch.cat(lws).double()
        results.append(lw.logsumexp(0) - math.log(num_samples))
    return torch.cat(results)


def describe(source: str, n: int) -> str:
    return (
        f"# {source}: {n} test images; torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )


def speed(args: argparse.Namespace) -> None:
    splits = load_splits()
    vae = build_vae(splits, args.epochs, args.model)
    x = splits.test[: args.n]
    n, s = len(x), args.samples
    out_size = vae.likelihood.num_params * math.prod(vae.data_shape)
    chunk = particles_per_chunk(min(args.batch_size, n), out_size, s)
    print(describe("Fashion-MNIST (256 levels)", n))
    trained = args.model or (f"trained {args.epochs} epoch(s)" if args.epochs else "random init")
    budget = int(math.log2(evaluate_module._CHUNK_ELEMENTS))
    print(
        f"# VAE 784-400-{LATENT_DIM} MLP, {type(vae.likelihood).__name__} likelihood, {trained}; S = {s}, "
        f"batch {args.batch_size}, {chunk} particles per chunk (_CHUNK_ELEMENTS = 2^{budget})"
    )
    # Wall-clock seconds, and CPU seconds of this process: on a shared machine the CPU time is the steadier figure.
    wall = {"pytorch": math.inf, "ppvae.evaluate": math.inf}
    cpu = dict(wall)
    runs = {
        "ppvae.evaluate": lambda: ppvae.evaluate(vae, x, num_samples=s, batch_size=args.batch_size, seed=None).log_px,
        "pytorch": lambda: iwae_torch(vae, x, s, args.batch_size).numpy(),
    }
    if args.pair:
        model, guide = user_pair(vae)
        runs["evaluate(pair)"] = lambda: ppvae.evaluate(
            model, x, guide=guide, num_samples=s, batch_size=args.batch_size, seed=None
        ).log_px
        wall["evaluate(pair)"] = cpu["evaluate(pair)"] = math.inf
    log_px = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            log_px[name] = run()
            wall[name] = min(wall[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    print(f"{'':>15}  {'wall s':>7}  {'datapoint·samples/s':>19}  {'CPU s':>7}  {'per CPU s':>10}")
    for name in runs:
        rate, cpu_rate = n * s / wall[name], n * s / cpu[name]
        print(f"{name:>15}  {wall[name]:>7.2f}  {rate:>19,.0f}  {cpu[name]:>7.2f}  {cpu_rate:>10,.0f}")
    ratio, cpu_ratio = wall["pytorch"] / wall["ppvae.evaluate"], cpu["pytorch"] / cpu["ppvae.evaluate"]
    print(f"throughput ratio evaluate/pytorch: {ratio:.3f} wall-clock, {cpu_ratio:.3f} per CPU second (target ≥ 0.8)")
    if args.pair:
        ratio, cpu_ratio = wall["pytorch"] / wall["evaluate(pair)"], cpu["pytorch"] / cpu["evaluate(pair)"]
        print(f"throughput ratio evaluate(pair)/pytorch: {ratio:.3f} wall-clock, {cpu_ratio:.3f} per CPU second")
    ok = True
    for name in [k for k in runs if k != "pytorch"]:
        ev, ref = log_px[name], log_px["pytorch"]
        # Same estimator, independent draws: the paired difference of per-image log p̂ is Monte Carlo noise.
        diff = ev - ref
        se = diff.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
        agree = abs(diff.mean()) < 4 * se + 1e-3
        ok = ok and agree
        print(
            f"mean log p̂ (nats): {name} {ev.mean():.3f}, pytorch {ref.mean():.3f}; "
            f"difference {diff.mean():+.4f} ± {se:.4f} (se) — {'agree' if agree else 'DISAGREE'}"
        )
    if not ok:
        sys.exit(1)


def user_pair(vae: ppvae.VAE) -> tuple:
    """The VAE's own networks as a user's model/guide pair written the way Pyro's VAE tutorial writes one
    (``pyro.module``, a data plate, the prior spelled out), which ``evaluate`` scores by tracing."""
    import pyro.distributions as dist

    latent = vae.latent_dim

    def model(x):
        pyro.module("decoder", vae.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent), x.new_ones(latent)).to_event(1))
            pyro.sample("x", vae.likelihood(vae.decoder(z)), obs=x)

    def guide(x):
        pyro.module("encoder", vae.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", vae.guide_head(vae.encoder(x)))

    return model, guide


def memory(args: argparse.Namespace) -> None:
    """Train (or initialize) here, then evaluate in a fresh process so its peak RSS is evaluate's own."""
    splits = load_splits()
    vae = build_vae(splits, args.epochs, args.model)
    with tempfile.TemporaryDirectory() as tmp:
        path = ppvae.save(vae, Path(tmp) / "model.pt")
        cmd = [sys.executable, __file__, "--memory-child", str(path), "--samples", str(args.samples)]
        cmd += ["--batch-size", str(args.batch_size)] + (["--n", str(args.n)] if args.n else [])
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--chunk-elements", str(args.chunk_elements)] if args.chunk_elements else []
        subprocess.run(cmd, check=True)


def memory_child(args: argparse.Namespace) -> None:
    splits = load_splits()
    vae = ppvae.load(args.memory_child)
    x = splits.test[: args.n] if args.n else splits.test
    # Peak resident memory of this process (VmHWM, KiB). Not ru_maxrss: after fork + exec that also counts the
    # parent's peak. Resetting it (clear_refs 5) makes the next reading the peak while evaluate runs.
    load_peak, resident = _status_kib("VmHWM"), _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    ev = ppvae.evaluate(vae, x, num_samples=args.samples, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    eval_peak = _status_kib("VmHWM")
    summary = ev.summary()
    print(describe("Fashion-MNIST (256 levels)", len(x)))
    print(
        f"ppvae.evaluate, S = {args.samples}, batch {args.batch_size}: {seconds:.0f} s wall, "
        f"{len(x) * args.samples / seconds:,.0f} datapoint·samples/s"
    )
    print(
        f"log p̂ = {summary['log_px']:.2f} ± {summary['log_px_se']:.2f} nats ({summary['bits_per_dim']:.4f} bits/dim), "
        f"ELBO {summary['elbo']:.2f} nats"
    )
    gib = 2**20  # KiB per GiB
    print(
        f"peak resident memory: {max(load_peak, eval_peak) / gib:.3f} GiB (target ≤ 2 GiB); while evaluating "
        f"{eval_peak / gib:.3f} GiB, {resident / gib:.3f} GiB resident before (data, torch); loading peak "
        f"{load_peak / gib:.3f} GiB"
    )


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="test images (default: 256; --memory: all 10,000)")
    parser.add_argument("--samples", type=int, default=None, help="S (default: 1000; --memory: 5000)")
    parser.add_argument("--batch-size", type=int, default=256, help="datapoints per chunk (evaluate's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of ppvae.fit before timing (0: random init)")
    parser.add_argument("--model", default=None, help="a saved ppvae VAE (model.pt) to use instead of training one")
    parser.add_argument("--memory", action="store_true", help="measure peak memory of the full test set instead")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pair", action="store_true", help="also time evaluate on the same networks as a user's pair")
    parser.add_argument(
        "--chunk-elements", type=int, default=None, help="override evaluate's chunk budget (both loops follow it)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.chunk_elements:
        evaluate_module._CHUNK_ELEMENTS = args.chunk_elements
    large = args.memory or args.memory_child
    args.samples = args.samples or (5000 if large else 1000)
    if not large:
        args.n = args.n or 256
    if args.memory_child:
        memory_child(args)
    else:
        (memory if args.memory else speed)(args)


if __name__ == "__main__":
    main()
