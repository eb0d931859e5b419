"""The zoo's CVAE row: negative conditional log-likelihood of the hidden quadrants, CVAE against its baseline.

For 1, 2 and 3 shown quadrants of binarized Fashion-MNIST (static binarization, the ppvae split, seed 0), the
deterministic baseline and the CVAE of ``models/cvae.py`` (hidden 500, latent ``--latent-dim``) are trained side by
side with the same budget: ``--epochs`` of ``ppvae.fit`` (Adam, lr 1e-3, batch 128, seed 0), keeping the epoch with
the best validation ELBO. Each is then scored on the test images by ``ppvae.evaluate`` with S importance samples:
−log p̂(y | x_o) in nats per image (exact for the baseline, which has no latent), and the paired difference
baseline − CVAE with its standard error over test images.

    python benchmarks/bench_cvae.py                       # 10 epochs, S = 100, all 10,000 test images
    python benchmarks/bench_cvae.py --epochs 2 --test 1000

Anchor (Pyro's CVAE tutorial, MNIST, not binarized, its own budget): baseline 100.4 / 61.9 / 25.4 nats and CVAE
71.8 / 51.0 / 24.2 nats for 1 / 2 / 3 quadrants. The claim checked here is the ordering on this data, CVAE below
the baseline at every quadrant count, not those values.
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
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=500)
    parser.add_argument("--samples", type=int, default=100, help="importance samples S per test image")
    parser.add_argument("--test", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--quadrants", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    begin_run(args.threads)
    splits = binarized_fashion_mnist()
    cvae = model_file("cvae")
    test = splits.test if args.test is None else splits.test[: args.test]
    print("quadrants  model     -log p̂(y|x_o) ± se   epochs  best  s/epoch   (baseline − CVAE) ± paired se")
    for q in args.quadrants:
        scores = {}
        for kind in ("baseline", "cvae"):
            torch.manual_seed(0)
            pair = cvae.build(splits.data_shape, args.latent_dim, splits=splits, kind=kind, quadrants=q,
                              hidden=args.hidden)  # fmt: skip
            start = time.perf_counter()
            result = ppvae.fit(pair, splits.train, val_data=splits.val, epochs=args.epochs, batch_size=128, lr=1e-3,
                               seed=0, progress=False)  # fmt: skip
            seconds = (time.perf_counter() - start) / len(result.history)
            ev = ppvae.evaluate(pair, test, num_samples=args.samples, seed=0)
            scores[kind] = ev.log_px
            se = ev.log_px.std() / math.sqrt(len(ev.log_px))
            print(f"{q:9d}  {kind:8s}  {-ev.log_px.mean():10.2f} ± {se:.2f}      {len(result.history):6d}  "
                  f"{result.best_epoch:4d}  {seconds:7.1f}", end="" if kind == "cvae" else "\n", flush=True)
        diff = scores["cvae"] - scores["baseline"]
        print(f"   {diff.mean():6.2f} ± {diff.std() / math.sqrt(len(diff)):.2f}  (N = {len(diff)}, S = {args.samples})",
              flush=True)


if __name__ == "__main__":
    main()
