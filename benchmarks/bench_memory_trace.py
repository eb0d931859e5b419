"""Resident memory over time while ``ppvae.evaluate`` scores Fashion-MNIST test images: a thread reads VmRSS from
/proc/self/status every ``--every`` seconds, so a slow rise (fragmentation, a leak) shows as a trend rather than
only as the final peak that ``bench_evaluate.py --memory`` reports. Linux only.

    python benchmarks/bench_memory_trace.py --model /tmp/evb/model.pt --rows 2560 --samples 5000 --threads 1

``--model``: a saved ppvae.VAE trained on Fashion-MNIST (``bench_evaluate.py`` explains how to make one).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

import ppvae

sys.path.insert(0, str(Path(__file__).parent))
from bench_evaluate import load_splits  # noqa: E402 - the same data loading as the throughput benchmark


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="saved ppvae.VAE (model.pt) for Fashion-MNIST")
    p.add_argument("--rows", type=int, default=2560, help="test images scored (default %(default)s)")
    p.add_argument("--samples", type=int, default=5000, help="importance samples S (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    p.add_argument("--every", type=float, default=30.0, help="seconds between readings (default %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = load_splits().test[: args.rows]
    vae = ppvae.load(args.model).eval()
    t0, done = time.perf_counter(), threading.Event()
    print(f"# {len(x)} rows, S = {args.samples}, {args.threads} thread(s), torch {torch.__version__}", flush=True)

    def read() -> None:
        while not done.is_set():
            print(f"{time.perf_counter() - t0:7.1f} s  RSS {resident_mib():7.1f} MiB", flush=True)
            done.wait(args.every)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ev = ppvae.evaluate(vae, x, num_samples=args.samples, batch_size=256)
    done.set()
    reader.join()
    seconds = time.perf_counter() - t0
    print(f"end: RSS {resident_mib():.1f} MiB after {seconds:.0f} s; mean log p̂ {ev.log_px.mean():.2f}")


if __name__ == "__main__":
    main()
