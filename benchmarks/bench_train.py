"""Seconds per epoch of ``ppvae.fit`` vs a hand-written PyTorch loop vs Pyro's usual SVI loop.

The network is the 784-400-50 MLP Bernoulli VAE (softplus hidden layers, mean-field Normal guide) on
Fashion-MNIST-sized inputs: the real training set (statically binarized) when it is installed, random binary
images of the same size otherwise. The three loops run one after another in this process, interleaved over
``--repeats`` rounds; the fastest epoch of each is reported, with ratios to the PyTorch loop.

    python benchmarks/bench_train.py                  # batch 64, 128, 512
    python benchmarks/bench_train.py --memory         # peak memory of ppvae.fit on the full training set

Targets (issue 2): ppvae.fit ≤ 1.10× PyTorch at batch 128; ≥ 1.3× faster than Pyro's loop at batch 64;
peak memory ≤ 1.5 GiB.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

import ppvae


def load_data(n: int | None) -> tuple[torch.Tensor, str]:
    try:
        splits = ppvae.data.load(
            "fashion-mnist", binarize="static", download=False, flatten=True, split=(1.0, 0.0, 0.0)
        )
        x, source = splits.train, "Fashion-MNIST (static binarization)"
    except ppvae.DataError:
        g = torch.Generator().manual_seed(0)
        x, source = (torch.rand(60000, 784, generator=g) < 0.3).float(), "random binary 784-dim data"
    return (x[:n] if n else x), source


class TorchVAE(nn.Module):
    """The same network as ppvae.VAE((784,), 50) with MLP hidden (400,), by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(784, 400), nn.Softplus())
        self.loc, self.scale = nn.Linear(400, 50), nn.Linear(400, 50)
        self.dec = nn.Sequential(nn.Linear(50, 400), nn.Softplus(), nn.Linear(400, 784))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        loc, scale = self.loc(h), F.softplus(self.scale(h)) + 1e-5
        z = loc + scale * torch.randn_like(loc)
        log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_lik = -F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(-1)
        return -(log_lik + log_p - log_q).mean()

    # Pyro's usual way of writing the same pair.
    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(50), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.enc)
        pyro.module("loc", self.loc)
        pyro.module("scale", self.scale)
        h = self.enc(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc(h), F.softplus(self.scale(h)) + 1e-5).to_event(1))


def epoch_torch(x: torch.Tensor, batch: int) -> float:
    net = TorchVAE()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for idx in torch.randperm(len(x)).split(batch):
        loss = net.loss(x[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def epoch_pyro(x: torch.Tensor, batch: int) -> float:
    pyro.clear_param_store()
    net = TorchVAE()
    svi = pyro.infer.SVI(net.model, net.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch, shuffle=True)
    t0 = time.perf_counter()
    for (xb,) in loader:
        svi.step(xb)
    return time.perf_counter() - t0


def epoch_ppvae(x: torch.Tensor, batch: int) -> float:
    vae = ppvae.VAE(
        (784,),
        50,
        likelihood="bernoulli",
        guide="normal",
        encoder={"name": "mlp", "kwargs": {"hidden": [400]}},
        decoder={"name": "mlp", "kwargs": {"hidden": [400]}},
    )
    result = ppvae.fit(vae, x, epochs=1, batch_size=batch, lr=1e-3, progress=False, device="cpu", seed=None)
    return result.history[0]["seconds"]


def speed(args: argparse.Namespace) -> None:
    x, source = load_data(args.n)
    loops = {"pytorch": epoch_torch, "pyro-svi": epoch_pyro, "ppvae.fit": epoch_ppvae}
    print(
        f"# {source}: {len(x)} examples; torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(
        f"{'batch':>5}  {'pytorch s/epoch':>15}  {'pyro-svi':>9}  {'ppvae.fit':>9}  "
        f"{'fit/pytorch':>11}  {'pyro/pytorch':>12}  {'pyro/fit':>8}"
    )
    for batch in args.batch:
        best = {name: float("inf") for name in loops}
        for _ in range(args.repeats):
            for name, run in loops.items():
                best[name] = min(best[name], run(x, batch))
        t, p, f = best["pytorch"], best["pyro-svi"], best["ppvae.fit"]
        print(f"{batch:>5}  {t:>15.2f}  {p:>9.2f}  {f:>9.2f}  {f / t:>11.3f}  {p / t:>12.3f}  {p / f:>8.3f}")
        sys.stdout.flush()


def memory(args: argparse.Namespace) -> None:
    x, source = load_data(None)
    vae = ppvae.VAE(
        (784,),
        50,
        likelihood="bernoulli",
        encoder={"name": "mlp", "kwargs": {"hidden": [400]}},
        decoder={"name": "mlp", "kwargs": {"hidden": [400]}},
    )
    ppvae.fit(vae, x, epochs=args.epochs, batch_size=128, progress=False, device="cpu")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"# {source}: {len(x)} examples, {args.epochs} epoch(s) of ppvae.fit at batch 128")
    print(f"peak resident memory: {peak_kib / 2**20:.3f} GiB (target ≤ 1.5 GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=None, help="use the first N training examples (default all)")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead of speed")
    parser.add_argument("--epochs", type=int, default=2, help="epochs for --memory")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(False)  # Pyro's loop without argument checks: its fastest usual configuration
    (memory if args.memory else speed)(args)


if __name__ == "__main__":
    main()
