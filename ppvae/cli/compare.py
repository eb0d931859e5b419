"""``ppvae compare``: the command-line side of :func:`ppvae.compare.compare` (grid, cache, report)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ppvae import data as datamod
from ppvae import io
from ppvae.blocks.guides import GUIDES
from ppvae.blocks.likelihoods import LIKELIHOODS
from ppvae.blocks.priors import PRIORS
from ppvae.blocks.specs import parse_block
from ppvae.cli.args import count_arg, fit_arg, seed_arg
from ppvae.cli.runs import runs_for_grid
from ppvae.compare.grid import Cell, Comparison, GridSettings, check_grid, compare
from ppvae.diagnostics.config import DiagnoseConfig, part_configs
from ppvae.errors import ConfigError
from ppvae.infer.objectives import OBJECTIVES
from ppvae.report.figures import image_grid

__all__ = ["add_compare_args", "add_demo_args", "compare_command", "demo_command", "DEMO_GRID", "QUICK_DIAGNOSE"]

# Cheap diagnostics for every cell of a grid (DiagnoseConfig.quick: gaps on 30 points, SBC 100, NUTS on 1 point
# with 150 + 150 steps); the grid sets the importance samples itself. Only the settings that differ from diagnose's
# defaults are listed: they are part of each cell's cache key, which then stays the same when a new part is declared.
_QUICK, _DEFAULT = DiagnoseConfig.quick().diagnose_kwargs(), DiagnoseConfig().diagnose_kwargs()
QUICK_DIAGNOSE: dict[str, Any] = {
    k: v
    for k, v in _QUICK.items()
    if k != "num_samples" and k not in {c.part for c in part_configs()} and v != _DEFAULT[k]
}

# `ppvae demo`'s grid on the embedded digits (17 grey levels): 2 priors × 2 likelihoods × 2 guides.
DEMO_GRID: dict[str, Any] = {
    "priors": ["normal", "mixture"],
    "likelihoods": ["categorical", "normal"],
    "guides": ["normal", "fullrank"],
}


# ... and what its cells share: a small MLP VAE (one hidden layer of 128: the whole demo in under a minute on two
# cores, where 256 took about 55-65 s), early-stopped on the validation ELBO, scored with IWAE_500 and the
# quick diagnostics but the NUTS reference, which the verdict does not read (it ranks on log p̂, paired differences,
# k̂ and inference gaps) and which on one datapoint with 2 × 150 draws rarely passes its own convergence test; the
# best cell is saved as a run, so `ppvae diagnose runs/demo` gives it a full reference.
DEMO_SETTINGS = GridSettings(
    latent_dim=8,
    encoder={"name": "mlp", "kwargs": {"hidden": [128]}},
    decoder={"name": "mlp", "kwargs": {"hidden": [128]}},
    epochs=60,
    patience=10,
    num_samples=500,
    diagnose={**QUICK_DIAGNOSE, "reference": False},
)


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--epochs", type=fit_arg("epochs"), default=DEMO_SETTINGS.epochs, help="most epochs per cell (early stopping)"
    )
    p.add_argument(
        "--jobs", type=count_arg("jobs"), default=None, help="cells in parallel (default: 2 where there are 2 cores)"
    )
    p.add_argument("--seed", type=seed_arg, default=0, help="seeds the data split and every cell")
    p.add_argument("--out", default="runs/demo", help="cache, report and best run directory (default %(default)s)")


def demo_command(args: argparse.Namespace) -> Comparison:
    """The README's main job: the demo grid on digits, its report, and the best cell saved as a run."""
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be ≥ 1, got {args.epochs}")
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {jobs}")
    out = Path(args.out)
    splits = datamod.load("digits", seed=args.seed)
    settings = dataclasses.replace(DEMO_SETTINGS, epochs=args.epochs)
    print(f"demo: comparing 2 priors × 2 likelihoods × 2 guides on digits ({jobs} processes); report in {out}/")
    start = time.perf_counter()
    result = compare(splits, **DEMO_GRID, seeds=[args.seed], settings=settings, out=out, jobs=jobs, progress=print)
    _report(result, out, start)
    best = _best_cell(result)
    if best is not None:  # the winner is a run like ppvae train's: ppvae diagnose/sample/info OUT work on it
        shutil.copyfile(Path(best["directory"]) / "model.pt", out / "model.pt")
        model = io.load(out / "model.pt")
        torch.manual_seed(args.seed)
        image_grid(model.generate(64).reshape(-1, *splits.data_shape), out / "samples.png")
        print(f"best cell saved as a run: {out / 'model.pt'} (samples: {out / 'samples.png'})")
    return result


def _best_cell(result: Comparison) -> dict | None:
    table = result.table()
    ok = table[(table["status"] == "ok") & (table["rank"] == 1)]
    if ok.empty:
        return None
    label = ok["cell"].iloc[0]
    return next(c for c in result.cells if c["label"] == label)


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="as for ppvae train (default digits, embedded)")
    p.add_argument("--binarize", choices=["static", "dynamic"], default=None)
    p.add_argument("--priors", nargs="+", default=["normal"], help=f"space-separated; of {', '.join(PRIORS.names())}")
    p.add_argument(
        "--likelihoods",
        nargs="+",
        default=["default"],
        help=f"space-separated; of {', '.join(LIKELIHOODS.names())}, or default (the data's own, as ppvae train)",
    )
    p.add_argument("--guides", nargs="+", default=["normal"], help=f"space-separated; of {', '.join(GUIDES.names())}")
    p.add_argument("--objectives", nargs="+", default=[Cell.objective], choices=OBJECTIVES)
    p.add_argument("--seeds", nargs="+", type=seed_arg, default=[0])
    p.add_argument("--latent-dim", type=count_arg("latent_dim"), default=GridSettings.latent_dim)
    p.add_argument("--encoder", default="mlp", help="shared by every cell (options: mlp:hidden=[256,128])")
    p.add_argument("--decoder", default="mlp", help="shared by every cell")
    # Training flags: GridSettings' defaults, which are FitConfig.cli()'s (as ppvae train's), with fit's checks.
    p.add_argument("--epochs", type=fit_arg("epochs"), default=GridSettings.epochs)
    p.add_argument("--batch-size", type=fit_arg("batch_size"), default=GridSettings.batch_size)
    p.add_argument("--lr", type=fit_arg("lr"), default=GridSettings.lr)
    p.add_argument(
        "--num-particles",
        type=fit_arg("num_particles"),
        default=GridSettings.num_particles,
        help="particles per step (the iwae objective's K)",
    )
    p.add_argument(
        "--patience",
        type=fit_arg("patience"),
        default=GridSettings.patience,
        help="early stopping on the validation ELBO",
    )
    p.add_argument(
        "--num-samples",
        type=count_arg("num_samples"),
        default=1000,
        help="importance samples S for log p̂ (default 1000)",
    )
    p.add_argument(
        "--max-test-points",
        type=count_arg("max_test_points"),
        default=2000,
        help="evenly spaced test rows scored (default 2000)",
    )
    p.add_argument(
        "--runs",
        nargs="+",
        default=[],
        metavar="RUN",
        help="trained runs (ppvae train's directories: a built-in VAE or a model file) scored beside the cells, "
        "on the same test rows; each must have been trained on this --dataset, --binarize and --seed",
    )
    p.add_argument("--full-diagnostics", action="store_true", help="ppvae diagnose's defaults for every cell")
    p.add_argument("--jobs", type=count_arg("jobs"), default=1, help="cells run in parallel processes (cores shared)")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells whose cached result is a failure")
    p.add_argument("--seed", type=seed_arg, default=0, help="seeds the data split")
    p.add_argument(
        "--out",
        default="runs/compare",
        help="cache and report directory (default %(default)s); a rerun reuses its finished cells and trained "
        "models; one grid at a time",
    )


def _report(result: Comparison, out: Path, start: float) -> None:
    """Write the report files and print the verdict and the main columns of the table."""
    paths = result.save(out)
    print("\nverdict:")
    print("\n".join(f"- {line}" for line in result.verdict()))
    table = result.table()
    cols = ["cell", "rank", "log_px", "log_px_se", "bits_per_dim", "delta_per_point", "delta_se", "khat_median",
            "inference_gap", "active_units", "status"]  # fmt: skip
    print()
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    seconds = time.perf_counter() - start
    print(f"\n{seconds:.0f} s; wrote {paths['html']}, {paths['csv'].name}, {paths['markdown'].name}")


def compare_command(args: argparse.Namespace) -> Comparison:
    for name, low in (("latent_dim", 1), ("epochs", 1), ("batch_size", 1), ("num_samples", 2), ("jobs", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be ≥ {low}, got {getattr(args, name)}")
    if args.max_test_points < 1 or args.num_particles < 1:
        raise ConfigError("--max-test-points and --num-particles must be ≥ 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    splits = datamod.load(args.dataset, binarize=args.binarize, seed=args.seed)
    settings = GridSettings(
        latent_dim=args.latent_dim,
        encoder=parse_block(args.encoder),
        decoder=parse_block(args.decoder),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        num_particles=args.num_particles,
        patience=args.patience,
        num_samples=args.num_samples,
        max_test_points=args.max_test_points,
        diagnose={} if args.full_diagnostics else dict(QUICK_DIAGNOSE),
    )
    axes = {
        "priors": [parse_block(p) for p in args.priors],
        "likelihoods": [None if lk == "default" else parse_block(lk) for lk in args.likelihoods],
        "guides": [parse_block(g) for g in args.guides],
        "objectives": args.objectives,
        "seeds": args.seeds,
    }
    check_grid(splits, **axes, settings=settings)  # a typo is one line of error, before anything is made
    models = runs_for_grid(args.runs, splits)
    grid = [len(args.priors), len(args.likelihoods), len(args.guides), len(args.objectives), len(args.seeds)]
    n = grid[0] * grid[1] * grid[2] * grid[3] * grid[4]
    beside = f" and {len(models)} trained run{'s' * (len(models) != 1)} ({', '.join(models)})" if models else ""
    print(f"comparing {n} cells ({' × '.join(map(str, grid))}){beside} on {splits.name}; cache and report in {out}/")
    start = time.perf_counter()
    result = compare(
        splits,
        **axes,
        settings=settings,
        out=out,
        jobs=args.jobs,
        models=models or None,
        retry_failed=args.retry_failed,
        progress=print,  # a line per finished cell on stdout (the library only logs them)
    )
    _report(result, out, start)
    return result
