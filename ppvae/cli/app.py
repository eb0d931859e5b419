"""The ``ppvae`` command: a thin layer over the Python API (``ppvae.data.load``, ``ppvae.VAE``, ``ppvae.fit``,
``ppvae.save``/``ppvae.load``, ``ppvae.evaluate``, ``ppvae.diagnose``).

User errors print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyro
import torch

from ppvae import data as datamod
from ppvae import io
from ppvae._version import __version__
from ppvae.blocks.guides import GUIDES
from ppvae.blocks.likelihoods import LIKELIHOODS
from ppvae.blocks.priors import PRIORS
from ppvae.blocks.specs import default_likelihood, parse_block, with_levels
from ppvae.cli.args import count_arg, fit_arg, model_option_arg, seed_arg
from ppvae.cli.compare import add_compare_args, add_demo_args, compare_command, demo_command
from ppvae.cli.runs import build_from_file, load_run, run_path
from ppvae.cli.scoring import add_diagnose_args, add_evaluate_args, diagnose_command, evaluate_command
from ppvae.errors import ConfigError, PPVAEError, describe_out_of_memory, is_out_of_memory, without_trace_shapes
from ppvae.infer.config import ON_NONFINITE, FitConfig
from ppvae.infer.objectives import OBJECTIVES
from ppvae.infer.observed import name_sites, observed_kind
from ppvae.infer.train import fit
from ppvae.run_meta import RunMeta
from ppvae.vae import VAE

__all__ = ["main"]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="digits",
        help="digits (embedded), fashion-mnist, mnist, linear-gaussian, or a .npy/.npz/.csv file",
    )
    p.add_argument(
        "--model",
        default=None,
        help="a model file (e.g. models/factor_analysis.py) defining build(data_shape, latent_dim, **options) "
        "(with a parameter named splits, it also gets the data splits: shapes, levels, labels, sizes); its folder "
        "is importable; replaces --prior/--likelihood/--guide/--encoder/--decoder",
    )
    p.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=model_option_arg,
        help="a keyword option for the model file's build (repeat for more; VALUE read as JSON, else as text), "
        "recorded in the run so evaluate/diagnose/sample rebuild the same model",
    )
    p.add_argument(
        "--data-plate",
        default=None,
        metavar="NAME",
        help="the model's plate holding local latents and observations, when not 'data' (recorded in the run)",
    )
    # The block flags default to None so that one given with --model (which it cannot affect) is refused.
    p.add_argument(
        "--prior", default=None, help=f"one of {', '.join(PRIORS.names())} (default normal); options as name:key=value"
    )
    p.add_argument(
        "--likelihood",
        default=None,
        help=f"one of {', '.join(LIKELIHOODS.names())} (default: bernoulli for binarized data, "
        "categorical for grey levels, normal otherwise)",
    )
    p.add_argument("--guide", default=None, help=f"one of {', '.join(GUIDES.names())} (default normal)")
    p.add_argument("--encoder", default=None, help="mlp (default) or conv (options: mlp:hidden=[256,128])")
    p.add_argument("--decoder", default=None, help="mlp (default) or conv")
    p.add_argument("--latent-dim", type=count_arg("latent_dim"), default=16)
    p.add_argument("--binarize", choices=["static", "dynamic"], default=None)
    # Training flags: the names, checks and defaults of FitConfig.cli() (fit's, but 20 epochs where fit does 10).
    defaults = FitConfig.cli()
    p.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective)
    p.add_argument("--num-particles", type=fit_arg("num_particles"), default=defaults.num_particles)
    p.add_argument("--beta", type=fit_arg("beta"), default=defaults.beta, help="weight of the KL term, β·KL")
    p.add_argument(
        "--kl-warmup", type=fit_arg("kl_warmup"), default=defaults.kl_warmup, help="epochs of linear KL warm-up"
    )
    p.add_argument("--patience", type=fit_arg("patience"), default=defaults.patience)
    p.add_argument("--clip-norm", type=fit_arg("clip_norm"), default=defaults.clip_norm)
    p.add_argument("--device", default=defaults.device)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoints/last.pt (a killed run resumes from its last finished epoch and ends "
        "with the same weights as an uninterrupted one)",
    )
    p.add_argument(
        "--on-nonfinite",
        choices=ON_NONFINITE,
        default=defaults.on_nonfinite,
        help="a NaN/Inf loss or gradient stops training with the weights from before that batch, saved in "
        "OUT/checkpoints/nonfinite.pt (raise, the default), or skips the batch, counted in the history (skip)",
    )
    p.add_argument("--epochs", type=fit_arg("epochs"), default=defaults.epochs, help="(default %(default)s)")
    p.add_argument("--batch-size", type=fit_arg("batch_size"), default=defaults.batch_size)
    p.add_argument("--lr", type=fit_arg("lr"), default=defaults.lr, help="Adam learning rate (default %(default)s)")
    p.add_argument("--seed", type=seed_arg, default=defaults.seed)
    p.add_argument("--out", default="runs/train", help="run directory to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (exit status 2), like every other ppvae error: the usage
    block is what ``--help`` is for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: --epoch is a typo to report, not --epochs (a later flag could make it ambiguous).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ppvae", description="Train and inspect Pyro variational autoencoders.")
    parser.add_argument("--version", action="version", version=f"ppvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_args(sub.add_parser("train", help="train a VAE (or a model file) on a dataset and save the run"))
    add_demo_args(
        sub.add_parser(
            "demo",
            help="compare 2 priors × 2 likelihoods × 2 guides on the embedded digits data: verdict, table and an "
            "HTML report in OUT; the best cell is saved as a run (OUT/model.pt)",
        )
    )
    add_evaluate_args(
        sub.add_parser(
            "evaluate",
            help="ELBO, IWAE log p(x), inference gap and bits/dim of a saved run on a split of its own dataset; "
            "writes evaluation.json and evaluation.nc (per-datapoint values)",
        )
    )
    add_diagnose_args(
        sub.add_parser(
            "diagnose",
            help="how good is the guide: PSIS k-hat, IS ESS, posterior collapse, amortization/approximation gaps, "
            "SBC and NUTS reference posteriors; writes diagnosis.json, diagnosis.nc and PNG plots",
        )
    )
    add_compare_args(
        sub.add_parser(
            "compare",
            help="train and score a grid of priors × likelihoods × guides on one dataset; a ranked table "
            "(CSV, markdown), figures and a self-contained HTML report; finished cells are cached in OUT",
        )
    )
    p = sub.add_parser("sample", help="draw new data from a saved run; a PNG grid for images")
    p.add_argument("run", help="run directory or model.pt")
    p.add_argument("-n", "--num", type=count_arg("num"), default=64)
    p.add_argument("--out", default=None, help="PNG path (default RUN/samples.png)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p = sub.add_parser("info", help="what a saved run holds")
    p.add_argument("run", help="run directory or model.pt")
    return parser


def _fit_config(args: argparse.Namespace) -> FitConfig:
    """The training flags as a :class:`FitConfig` (the flags' names are its fields')."""
    return FitConfig(**{name: getattr(args, name) for name in FitConfig.names() if name != "vectorize_particles"})


def _train(args: argparse.Namespace) -> tuple[dict, torch.nn.Module, datamod.DataSplits]:
    config = _fit_config(args)
    splits = datamod.load(args.dataset, binarize=args.binarize, seed=args.seed)
    out = Path(args.out)  # created by fit once the data and model are known to be good: nothing half-written
    meta = RunMeta.of_data(splits, latent_dim=args.latent_dim, seed=args.seed)
    # The initial weights come from torch's global RNG: seed it first, so one --seed reproduces the whole run.
    pyro.set_rng_seed(args.seed)
    blocks = {"prior": args.prior, "likelihood": args.likelihood, "guide": args.guide, "encoder": args.encoder}
    blocks["decoder"] = args.decoder
    if args.model and any(v is not None for v in blocks.values()):
        given = ", ".join(f"--{k}" for k, v in blocks.items() if v is not None)
        raise ConfigError(f"{given} has no effect with --model FILE (the file builds the whole model); leave it out")
    if args.model_option and not args.model:
        raise ConfigError("--model-option is for a model file's build; give --model FILE too")
    meta = dataclasses.replace(meta, data_plate=args.data_plate)
    if args.model:
        options = dict(args.model_option)
        model = build_from_file(args.model, splits.data_shape, args.latent_dim, splits=splits, options=options)
        meta = dataclasses.replace(meta, model_file=str(Path(args.model).resolve()), model_options=options or None)
    else:
        likelihood = args.likelihood or default_likelihood(splits)
        model = VAE(
            splits.data_shape,
            args.latent_dim,
            prior=parse_block(args.prior or "normal"),
            likelihood=with_levels(parse_block(likelihood), splits.levels),
            guide=parse_block(args.guide or "normal"),
            encoder=parse_block(args.encoder or "mlp"),
            decoder=parse_block(args.decoder or "mlp"),
        )
    t0 = time.perf_counter()
    result = fit(
        model,
        splits.train,
        val_data=splits.val,
        checkpoint_dir=out / "checkpoints",
        resume=args.resume,
        progress=not args.no_progress,
        config=config,
    )
    seconds = time.perf_counter() - t0
    model.to("cpu")
    summary = _summary(model, splits, result, seconds)
    meta = dataclasses.replace(meta, history=result.history, summary=summary)
    io.save(model, out / "model.pt", meta=meta.to_dict(), optimizer=result.optimizer)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary, model, splits


@torch.no_grad()
def _summary(model: torch.nn.Module, splits: datamod.DataSplits, result: Any, seconds: float) -> dict:
    from ppvae.infer.objectives import make_objective

    loss = make_objective("elbo")
    summary: dict[str, Any] = {
        "dataset": splits.name,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "train_seconds": round(seconds, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    for split in ("val", "test"):
        x = getattr(splits, split)
        if x is not None:
            no_bits = _no_bits_because(model, x)  # per split: a mask may depend on the rows
            if no_bits:
                summary["no_bits_per_dim"] = no_bits
            torch.manual_seed(0)
            with _eval_mode(model):  # dropout off, BatchNorm on its running statistics: the model as it is scored
                elbo = -loss(model.model, model.guide, x).item() / len(x)  # type: ignore[union-attr]
            summary[f"{split}_elbo"] = round(elbo, 4)
            if no_bits is None:  # bits/dim of a density would depend on the units of x: not a number to compare
                summary[f"{split}_elbo_bits_per_dim"] = round(-elbo / (math.log(2) * math.prod(splits.data_shape)), 4)
    summary["final_train_loss"] = round(result.history[-1]["train_loss"], 4)
    return summary


def _no_bits_because(model: Any, x: torch.Tensor) -> str | None:
    """Why the model's log-likelihood on the split ``x`` does not divide by D into bits/dim, or None when it is a
    probability of each whole datapoint: its observed sites are discrete (its likelihood says, or their supports)
    and none masks an element, both read from one run of the pair on all of ``x`` (a mask may depend on the rows)."""
    with _eval_mode(model):
        traced, masked = observed_kind(model.model, model.guide, x)
    if masked:
        return f"{name_sites(masked)} masked, a probability of the elements kept"
    known = getattr(getattr(model, "likelihood", None), "discrete", None)
    kind = known if isinstance(known, bool) else traced
    if kind is None:
        return "observed sites of mixed or unknown kinds"
    return None if kind else "a density"


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was = model.training if isinstance(model, torch.nn.Module) else None
    if was is not None:
        model.eval()
    try:
        yield
    finally:
        if was is not None:
            model.train(was)


def _print_summary(summary: dict, out: str) -> None:
    print(
        f"trained on {summary['dataset']} for {summary['epochs']} epochs in {summary['train_seconds']:.1f} s "
        f"({summary['parameters']:,} parameters)"
    )
    for split in ("val", "test"):
        if f"{split}_elbo" in summary:
            bits = summary.get(f"{split}_elbo_bits_per_dim")
            why = summary.get("no_bits_per_dim", "a density")
            shown = f"   {bits:.4f} bits/dim (upper bound)" if bits is not None else f"   ({why}: no bits/dim)"
            print(f"  {split:4s} ELBO  {summary[f'{split}_elbo']:9.3f} nats/datapoint{shown}")
    print(f"saved run: {out}/model.pt   summary: {out}/summary.json")
    if "samples" in summary:
        print(f"samples: {summary['samples']}")


@torch.no_grad()
def write_samples(model: torch.nn.Module, data_shape: Sequence[int], out: Path, num: int, seed: int = 0) -> Path:
    """Draw ``num`` new datapoints; images go to a PNG grid at ``out``, other data to ``out`` as ``.npy``."""
    torch.manual_seed(seed)
    if hasattr(model, "generate"):
        x = model.generate(num)  # E[x | z] for z ~ p(z): smoother pictures than one draw of x
    else:
        x = _predict(model, num)
    shape = tuple(data_shape)
    if len(shape) == 3 and shape[0] in (1, 3):
        from ppvae.report.figures import image_grid

        return image_grid(x.reshape(-1, *shape).float(), out)

    out = out.with_suffix(".npy")
    np.save(out, x.numpy())
    return out


def _predict(model: Any, num: int) -> torch.Tensor:
    """``num`` datapoints from a model file's module by its generation path: ``model(None, batch_size=num)``
    returning them or sampling them at its one observed site (the convention every ppvae diagnostic reads)."""
    from pyro import poutine

    try:
        trace = poutine.trace(model.model).get_trace(None, batch_size=num)
    except Exception as err:  # a user's model: say what the convention is, in one line
        raise ConfigError(
            f"cannot generate from this run's model: model(None, batch_size={num}) raised {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}; to sample, give the model a generation path: "
            "model(x=None, batch_size=1) samples the latents inside its data plate and the data at its observed site"
        ) from None
    value = trace.nodes["_RETURN"]["value"]
    if torch.is_tensor(value) and value.shape[:1] == (num,):
        return value
    sites = [n for n, site in trace.nodes.items() if site["type"] == "sample" and site["name"] == "x"]
    if sites:
        return trace.nodes["x"]["value"]
    raise ConfigError(
        f"cannot generate from this run's model: model(None, batch_size={num}) neither returned {num} datapoints nor "
        "sampled a site named 'x'; return the generated data from model"
    )


def _sample(args: argparse.Namespace) -> None:
    if args.num < 1:
        raise ConfigError(f"--num must be ≥ 1, got {args.num}")
    model, meta = load_run(args.run)
    out = Path(args.out) if args.out else run_path(args.run).parent / "samples.png"
    written = write_samples(model, RunMeta.from_dict(meta).data_shape or [], out, args.num, args.seed)
    print(f"wrote {args.num} samples to {written}")


def _info(args: argparse.Namespace) -> None:
    obj = io.read(run_path(args.run))
    meta = RunMeta.from_dict(obj.get("meta"))
    print(f"{run_path(args.run)}: ppvae file v{obj['version']}, {obj.get('kind')} ({obj.get('class')})")
    if obj.get("config"):
        cfg = obj["config"]
        for key in ("data_shape", "latent_dim", "prior", "likelihood", "guide", "encoder", "decoder"):
            print(f"  {key:11s} {json.dumps(cfg[key])}")
    # A checkpoint of a pair of functions has no module: its weights are the Pyro parameters it optimized.
    weights = obj.get("state_dict", obj.get("params", {}))
    n = sum(t.numel() for t in weights.values() if torch.is_tensor(t))  # a state_dict may hold extra state
    kind = " (parameters and buffers)" if "state_dict" in obj else ""
    if "state_dict" not in obj and weights:
        kind = f" in {len(weights)} Pyro parameters"
    print(f"  weights     {n:,} numbers{kind}")
    for key in ("dataset", "binarize", "levels", "model_file"):
        if getattr(meta, key) is not None:
            print(f"  {key:11s} {getattr(meta, key)}")
    history = meta.history or []
    if history:
        last = history[-1]
        val = f", last epoch's val ELBO {last['val_elbo']:.3f}" if last.get("val_elbo") is not None else ""
        print(f"  trained     {len(history)} epochs, last train loss {last['train_loss']:.3f}{val}")
    for key, value in (meta.summary or {}).items():
        if key.endswith("elbo"):  # the summary's: the saved (best) weights, scored after training in eval mode
            print(f"  {key:11s} {value} (saved weights)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def one_line_warning(message: Any, category: type, *_: Any, **__: Any) -> None:
        print(f"ppvae {args.command}: {category.__name__}: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = one_line_warning  # a warning is advice to a user: no source line
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "train":
            summary, _, _ = _train(args)
            _print_summary(summary, args.out)
        elif args.command == "demo":
            demo_command(args)
        elif args.command == "compare":
            compare_command(args)
        elif args.command == "evaluate":
            evaluate_command(args)
        elif args.command == "diagnose":
            diagnose_command(args)
        elif args.command == "sample":
            _sample(args)
        elif args.command == "info":
            _info(args)
    except PPVAEError as err:
        print(f"ppvae {args.command}: error: {without_trace_shapes(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment, not a bug: a full disk, a read-only or vanished directory
        print(f"ppvae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:  # out of memory is the environment too; anything else is a bug
        if not is_out_of_memory(err):
            raise
        print(
            f"ppvae {args.command}: error: out of memory ({describe_out_of_memory(err)}); lower --batch-size "
            "(or --num-particles, --num-samples)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"ppvae {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
