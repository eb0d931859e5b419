"""The zoo's hierarchical-VAE row: log p̂ of the two-layer ladder VAE against a one-layer VAE at the same budget.

On binarized Fashion-MNIST (static, the ppvae split, seed 0) ``models/hvae.py`` (latent 32 + top 16, hidden
``--hidden``) and a one-layer ``ppvae.VAE`` (latent 32, one hidden layer of ``--hidden``, Bernoulli, Normal guide)
are trained with the same budget: ``--epochs`` of ``ppvae.fit`` (Adam, lr 1e-3, batch 128, seed 0, ``--kl-warmup``
epochs of linear KL warm-up for both), keeping the epoch with the best validation ELBO. Both are scored with
``ppvae.evaluate`` (IWAE_S) on the first ``--test`` test images; the difference is paired over images.

    python benchmarks/bench_hvae.py                      # 10 epochs, S = 1000 on 2000 test images

Target (issue 14): the hierarchical VAE above the one-layer VAE, with the paired standard error.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import ppvae

sys.path.insert(0, str(Path(__file__).parent))
from zoo_common import begin_run, binarized_fashion_mnist, model_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--kl-warmup", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    begin_run(args.threads)
    splits = binarized_fashion_mnist()
    hvae = model_file("hvae")
    net = {"name": "mlp", "kwargs": {"hidden": [args.hidden]}}
    torch.manual_seed(0)
    models = {"hvae": hvae.build(splits.data_shape, 32, splits=splits, top=16, hidden=args.hidden)}
    torch.manual_seed(0)
    models["vae"] = ppvae.VAE(splits.data_shape, 32, likelihood="bernoulli", encoder=net, decoder=net)
    test = splits.test[: args.test]
    scores = {}
    for name, model in models.items():
        start = time.perf_counter()
        result = ppvae.fit(model, splits.train, val_data=splits.val, epochs=args.epochs, batch_size=128, lr=1e-3,
                           kl_warmup=args.kl_warmup, seed=0, progress=False)  # fmt: skip
        seconds = (time.perf_counter() - start) / len(result.history)
        ev = ppvae.evaluate(model, test, num_samples=args.samples, seed=0)
        scores[name] = ev.log_px
        weights = sum(p.numel() for p in model.parameters())
        se = ev.log_px.std() / math.sqrt(len(test))
        print(f"{name:5s} weights {weights:8,d}  log p̂ {ev.log_px.mean():9.3f} ± {se:.3f}  ELBO {ev.elbo.mean():9.3f}"
              f"  best epoch {result.best_epoch} of {len(result.history)}  {seconds:5.1f} s/epoch",
              flush=True)  # fmt: skip
    diff = scores["hvae"] - scores["vae"]
    print(f"hvae − vae: {diff.mean():.3f} ± {diff.std() / math.sqrt(len(diff)):.3f} nats (paired, N = {len(diff)}, "
          f"S = {args.samples})", flush=True)


if __name__ == "__main__":
    main()
