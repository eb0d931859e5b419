"""``ppvae evaluate`` and ``ppvae diagnose``: the command-line side of
:func:`ppvae.evaluate` and :func:`ppvae.diagnose` (reports printed, JSON, NetCDF and PNGs written)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ppvae._json import jsonable
from ppvae._validate import COUNT, Interval, arg_type
from ppvae.cli.args import seed_arg
from ppvae.cli.runs import load_run, run_path, split_data
from ppvae.diagnostics import arviz_io
from ppvae.diagnostics.config import DiagnoseConfig, part_configs, part_settings
from ppvae.diagnostics.diagnosis import Diagnosis, diagnose
from ppvae.diagnostics.evaluation import evaluate
from ppvae.errors import ConfigError
from ppvae.infer.observed import name_sites
from ppvae.report.text import format_table

__all__ = ["add_evaluate_args", "add_diagnose_args", "diagnose_config", "evaluate_command", "diagnose_command"]


def _add_scoring_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("run", help="run directory or model.pt (trained by ppvae train or ppvae demo)")
    p.add_argument(
        "--split",
        choices=["test", "val", "train"],
        default="test",
        help="split of the run's dataset, loaded and preprocessed as in training (default test)",
    )
    p.add_argument(
        "--num-samples",
        type=arg_type("num_samples", Interval(whole=True, low=2)),
        default=DiagnoseConfig.num_importance_samples,
        help="importance samples S per datapoint (≥ 2; default %(default)s); log p̂ is IWAE_S",
    )
    p.add_argument("--out", default=None, help=f"directory to write (default RUN/{what})")
    p.add_argument("--seed", type=seed_arg, default=0, help="seeds the importance samples and every diagnostic")
    p.add_argument(
        "--data-plate",
        default=None,
        metavar="NAME",
        help="the model's plate holding local latents and observations (default: as recorded by ppvae train "
        "--data-plate, else 'data')",
    )


def _data_plate(args: argparse.Namespace, meta: dict) -> str:
    return args.data_plate or meta.get("data_plate") or "data"


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``ppvae evaluate``."""
    _add_scoring_args(p, "evaluation")
    p.add_argument(
        "--batch-size",
        type=arg_type("batch_size", COUNT),
        default=256,
        help="datapoints per chunk; memory only (default %(default)s)",
    )


def add_diagnose_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``ppvae diagnose``: the scoring flags, ``--max-points``, and for every part declared in
    :mod:`ppvae.diagnostics.config` a ``--no-<part>`` switch and a flag per setting that names one."""
    _add_scoring_args(p, "diagnosis")
    p.add_argument(
        "--max-points",
        type=arg_type("max_points", COUNT),
        default=2000,
        help="use at most this many datapoints of the split (default %(default)s): evenly spaced rows (the split "
        "is already a seeded shuffle); all when the split is smaller",
    )
    p.add_argument(
        "--latent-site",
        dest="latent_sites",
        action="append",
        default=None,
        metavar="NAME",
        help="a local latent site the diagnostics work on (repeatable; default every continuous latent in the data "
        "plate, found from one run of the model)",
    )
    settings = list(part_settings())
    for config_class in part_configs():
        p.add_argument(f"--no-{config_class.part}", action="store_true", help=f"skip {config_class.about}")
        for owner, f, s in settings:
            if owner is config_class and s.flag is not None:
                p.add_argument(
                    s.flag,
                    dest=s.option,
                    type=arg_type(s.option, s.constraint, parse=int if s.constraint.whole else float),
                    metavar="N" if s.constraint.whole else "X",
                    default=f.default,
                    help=f"{s.help} (default %(default)s)",
                )


def diagnose_config(args: argparse.Namespace) -> DiagnoseConfig:
    """The :class:`DiagnoseConfig` that ``ppvae diagnose``'s flags ask for."""
    options: dict[str, object] = {c.part: not getattr(args, f"no_{c.part}") for c in part_configs()}
    options.update({s.option: getattr(args, s.option) for _, _, s in part_settings() if s.flag is not None})
    return DiagnoseConfig.from_options(num_samples=args.num_samples, **options)


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an --out that is a file before anything is loaded or written."""
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory to write into")


def evaluate_command(args: argparse.Namespace) -> None:
    _check_out(args)
    model, meta = load_run(args.run)
    path = run_path(args.run)
    x = split_data(meta, args.split, path, args.seed)
    t0 = time.perf_counter()
    ev = evaluate(
        model,
        x,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        split=args.split,
        data_plate=_data_plate(args, meta),
    )
    summary = {"run": str(path), "dataset": meta["dataset"], **ev.summary(), "seed": args.seed}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(args.out) if args.out else path.parent / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(jsonable(summary), indent=2))  # strict JSON: NaN → null
    idata = ev.to_inference_data()
    idata.sample_stats.attrs["dataset"] = meta["dataset"]
    netcdf = arviz_io.save_netcdf(idata, out / "evaluation.nc")
    print(
        f"evaluated {path} on {meta['dataset']}, {args.split} split: N = {len(ev.elbo)} datapoints, "
        f"S = {ev.num_samples} importance samples each ({summary['seconds']:.1f} s)"
    )
    print(format_table(_evaluation_rows(summary)))
    print(f"wrote {out / 'evaluation.json'} (summary) and {netcdf} (per datapoint, ArviZ NetCDF)")


def _evaluation_rows(ev: dict) -> list[tuple[str, str, str]]:
    s = ev["num_samples"]

    def pm(key: str, digits: int = 3, unit: str = " nats") -> str:
        return f"{ev[key]:.{digits}f} ± {ev[key + '_se']:.{digits}f}{unit}"

    rows = [
        ("ELBO", pm("elbo"), f"per datapoint, mean of {s} log-weights ± standard error"),
        (f"log p̂(x) (IWAE_{s})", pm("log_px"), "importance-sampled, a stochastic lower bound on log p(x)"),
        ("inference gap", pm("inference_gap"), "log p̂ − ELBO ≈ KL(q(z|x) ‖ p(z|x))"),
    ]
    if "reconstruction" in ev:
        rows.append(("reconstruction", pm("reconstruction"), "E_q log p(x|z)"))
        rows.append(("KL", pm("kl"), "E_q[log q(z|x) − log p(z)]; ELBO = reconstruction − KL"))
    if "bits_per_dim" in ev:
        rows.append(("bits/dim", pm("bits_per_dim", 4, ""), f"−log₂ p̂(x) / D, from IWAE_{s}"))
    elif ev.get("masked_sites"):
        masked = name_sites(ev["masked_sites"])
        rows.append(("bits/dim", "n/a", f"site {masked} masks some elements: log p̂ is of the ones it keeps"))
    else:
        rows.append(("bits/dim", "n/a", "the likelihood is a density: bits/dim would not be comparable"))
    bad = ev["num_nonfinite"]
    rows.append(("non-finite", f"{bad} of {ev['num_datapoints']} datapoints", "NaN/inf log-weights; left out of means"))
    return rows


def diagnose_command(args: argparse.Namespace) -> None:
    _check_out(args)
    config = diagnose_config(args)
    model, meta = load_run(args.run)
    path = run_path(args.run)
    x = split_data(meta, args.split, path, args.seed)
    n = len(x)
    if args.max_points < n:  # evenly spaced rows: the split is already a seeded permutation of the dataset
        rows = np.unique(np.linspace(0, n - 1, args.max_points).round().astype(np.int64))
        x = x[torch.as_tensor(rows)]
    diagnosis = diagnose(
        model,
        x,
        config=config,
        seed=args.seed,
        split=args.split,
        data_plate=_data_plate(args, meta),
        latent_sites=args.latent_sites,
    )
    source = {"run": str(path), "dataset": meta["dataset"], "split": args.split, "split_size": n}
    source["rows"] = "all" if len(x) == n else f"{len(x)} evenly spaced rows of {n}"
    _report_diagnosis(diagnosis, Path(args.out) if args.out else path.parent / "diagnosis", source)


def _report_diagnosis(diagnosis: Diagnosis, out: Path, source: dict) -> None:
    """Save (JSON with where the data came from, NetCDF, PNGs) and print the table and where files went."""
    paths = diagnosis.save(out)
    record = json.loads(paths["json"].read_text())
    paths["json"].write_text(json.dumps({"source": source, **record}, indent=2))
    total = sum(diagnosis.seconds.values())
    print(
        f"diagnosed {source['run']} on {source['dataset']}, {source['split']} split: {len(diagnosis.khat)} "
        f"datapoints ({source['rows']}), S = {diagnosis.evaluation.num_samples} importance samples ({total:.1f} s)"
    )
    findings = diagnosis.findings()
    if findings:
        print("findings:")
        print("\n".join(f"- {f}" for f in findings))
    print(format_table([("diagnostic", "value", "how to read it"), *diagnosis.table()]))
    times = ", ".join(f"{k} {v:.1f} s" for k, v in diagnosis.seconds.items())
    print(f"time: {times}")
    print(f"wrote {out}/: " + ", ".join(p.name for p in paths.values()))
