"""Long-run stability of ``ppvae.fit``: does memory stay flat over many epochs with frequent checkpoints?

Trains the VAE that ``ppvae train`` builds by default for the embedded digits data (images (1, 8, 8) on 17 grey
levels, a categorical likelihood over the 17 levels, latent_dim 16, a 64-400-16 MLP encoder and a 16-400-(17×64)
MLP decoder, mean-field Normal guide, N(0, I) prior; batch 128, lr 1e-3, seed 0, validation ELBO every epoch) for
``--epochs`` epochs. ``fit`` is called once per ``--checkpoint-every`` epochs with ``checkpoint_dir`` and
``resume=True``: within a call it writes ``last.pt`` after every epoch (atomically, the previous one kept as
``last.pt.prev``) and ``best.pt`` on improvement, and each new call resumes from ``last.pt``, so a run also
exercises ~epochs / checkpoint-every checkpoint restores.

After each call the script records, for this process:

- resident memory, VmRSS from ``/proc/self/status`` (MiB), and its peak so far (VmHWM);
- the bytes malloc has handed out and not taken back (glibc ``mallinfo2``: ``uordblks`` + ``hblkhd``, MiB): a leak
  grows it, heap fragmentation grows RSS without it;
- Python's heap: allocated pymalloc blocks (``sys.getallocatedblocks``), objects tracked by the garbage collector
  and, among them, live tensors (after a ``gc.collect``), open file descriptors and files in the checkpoint folder.

It prints one table row per ``--report-every`` epochs and a verdict: the least-squares slope of RSS over the
second half of the run (MiB per 100 epochs) and its growth from the middle to the end; memory counts as flat when
that growth is below ``--tolerance`` (default 5%) and the live tensor count did not grow.

    python benchmarks/bench_soak.py                               # 200 epochs, checkpoints every epoch
    python benchmarks/bench_soak.py --epochs 60 --checkpoint-every 2 --report-every 6
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch

import ppvae
from ppvae.blocks.specs import default_likelihood, with_levels

LATENT_DIM = 16  # the CLI's --latent-dim default


def status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


def _mallinfo():
    """glibc's mallinfo2 (None where it is missing: musl, macOS, glibc < 2.33)."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn


MALLINFO = _mallinfo()


def malloc_in_use_mib() -> float:
    """Bytes malloc has handed out and not had back (heap + mmapped chunks), MiB; NaN without mallinfo2."""
    if MALLINFO is None:
        return math.nan
    info = MALLINFO()
    return (info.uordblks + info.hblkhd) / 2**20


def measure(epoch: int, seconds: float, ckpt: Path) -> dict:
    rss = status_kib("VmRSS") / 1024  # first: counting objects below touches memory
    row = {"epoch": epoch, "seconds": seconds, "rss": rss, "peak": status_kib("VmHWM") / 1024}
    row["malloc"] = malloc_in_use_mib()
    row["blocks"] = sys.getallocatedblocks()
    gc.collect()
    objects = gc.get_objects()
    row["objects"] = len(objects)
    row["tensors"] = sum(1 for o in objects if issubclass(type(o), torch.Tensor))  # type(): no __class__ lookups
    del objects
    row["fds"] = len(os.listdir("/proc/self/fd"))
    row["files"] = len(list(ckpt.iterdir())) if ckpt.exists() else 0
    return row


def slope_per_100(rows: list[dict], key: str) -> float:
    """Least-squares slope of ``key`` against the epoch, per 100 epochs."""
    xs, ys = [r["epoch"] for r in rows], [r[key] for r in rows]
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=1, help="epochs per fit call (resumed from last.pt)")
    parser.add_argument("--report-every", type=int, default=10, help="epochs per table row (a multiple is used)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=400, help="MLP width of encoder and decoder (CLI default 400)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest RSS growth over the 2nd half")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dir", default=None, help="checkpoint folder (default: a temporary one)")
    args = parser.parse_args()
    if args.epochs < 2 or args.checkpoint_every < 1 or args.report_every < 1:
        parser.error("--epochs must be ≥ 2, --checkpoint-every and --report-every ≥ 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    every = args.checkpoint_every * max(1, round(args.report_every / args.checkpoint_every))

    splits = ppvae.data.load("digits")
    likelihood = with_levels(default_likelihood(splits), splits.levels)
    net = {"name": "mlp", "kwargs": {"hidden": [args.hidden]}}
    torch.manual_seed(0)
    vae = ppvae.VAE(splits.data_shape, LATENT_DIM, likelihood=likelihood, encoder=net, decoder=net)
    params = sum(p.numel() for p in vae.parameters())
    print(
        f"# digits: {len(splits.train)} train / {len(splits.val)} val images; torch {torch.__version__}, "
        f"pyro {pyro.__version__}, ppvae {ppvae.__version__}, Python {platform.python_version()}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(
        f"# VAE 64-{args.hidden}-{LATENT_DIM} MLP, {likelihood['name']} over {splits.levels} levels, {params:,} "
        f"parameters; {args.epochs} epochs of batch {args.batch_size}, fit called every {args.checkpoint_every} "
        f"epoch(s) with resume=True, last.pt written every epoch; a row every {every} epochs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.dir) if args.dir else Path(tmp) / "checkpoints"
        rows = [measure(0, 0.0, ckpt)]
        header = (
            f"{'epoch':>6} {'s':>7} {'RSS MiB':>8} {'peak':>7} {'malloc':>7} {'py blocks':>10} {'objects':>8} "
            f"{'tensors':>8} {'fds':>4} {'files':>5} {'val ELBO':>9}"
        )
        print(header)
        t0 = time.perf_counter()
        epoch, val_elbo = 0, math.nan

        def show(row: dict) -> None:
            print(
                f"{row['epoch']:>6} {row['seconds']:>7.1f} {row['rss']:>8.1f} {row['peak']:>7.1f} "
                f"{row['malloc']:>7.1f} {row['blocks']:>10,} {row['objects']:>8,} {row['tensors']:>8,} "
                f"{row['fds']:>4} {row['files']:>5} {val_elbo:>9.3f}",
                flush=True,
            )

        show(rows[0])
        while epoch < args.epochs:
            epoch = min(args.epochs, epoch + args.checkpoint_every)
            result = ppvae.fit(
                vae,
                splits.train,
                val_data=splits.val,
                epochs=epoch,
                batch_size=args.batch_size,
                seed=0,
                device="cpu",
                checkpoint_dir=ckpt,
                resume=True,
                progress=False,
            )
            assert len(result.history) == epoch, (len(result.history), epoch)
            val_elbo = result.history[-1]["val_elbo"]
            del result
            if epoch % every == 0 or epoch == args.epochs:
                rows.append(measure(epoch, time.perf_counter() - t0, ckpt))
                show(rows[-1])
    verdict(rows, args.tolerance)


def verdict(rows: list[dict], tolerance: float) -> None:
    last = rows[-1]["epoch"]
    second = [r for r in rows if r["epoch"] >= last / 2 and r["epoch"] > 0]
    if len(second) < 2:
        print("too few rows in the second half for a verdict: use more --epochs or a smaller --report-every")
        return
    first, end = second[0], second[-1]
    growth = (end["rss"] - first["rss"]) / first["rss"]
    tensors_grew = end["tensors"] > first["tensors"]
    print(
        f"second half (epochs {first['epoch']}-{end['epoch']}): RSS {first['rss']:.1f} → {end['rss']:.1f} MiB, "
        f"slope {slope_per_100(second, 'rss'):+.2f} MiB per 100 epochs, growth {100 * growth:+.2f}%; "
        f"malloc in use slope {slope_per_100(second, 'malloc'):+.2f} MiB per 100 epochs; Python blocks "
        f"{first['blocks']:,} → {end['blocks']:,}; live tensors {first['tensors']:,} → {end['tensors']:,}; "
        f"open fds {first['fds']} → {end['fds']}; checkpoint files {first['files']} → {end['files']}"
    )
    flat = growth < tolerance and not tensors_grew and end["fds"] <= first["fds"]
    print(
        f"verdict: memory {'FLAT' if flat else 'GROWING'} (RSS growth {100 * growth:+.2f}% over the second half, "
        f"limit {100 * tolerance:.0f}%; live tensors {'grew' if tensors_grew else 'did not grow'})"
    )
    if not flat:
        sys.exit(1)


if __name__ == "__main__":
    main()
