"""One cell of a comparison grid: train a VAE with ``fit``, score it with ``diagnose``, keep the result on disk.

A cell is one choice of prior × likelihood × guide × objective × seed; everything else (networks, latent size,
budget, splits, test rows, diagnostics settings) is shared by the grid. Its directory holds::

    config.json     what the cell is: the cell, the grid's settings, the data's hash, the ppvae version and the
                    cell's two keys (the hash of all of it names the directory)
    checkpoints/    fit's checkpoints: a killed cell resumes where it stopped
    model.pt        the trained VAE (taken from a cell with the same training key when one exists: a grid rerun
                    with other scoring settings rescores the trained models instead of training them again)
    arrays.npz      per-datapoint scores and what the figures need (read with allow_pickle=False)
    diagnosis.nc    ArviZ InferenceData of the cell's diagnosis
    result.json     summary numbers, status and error; written last, atomically: its presence means "finished"

Scores are probabilities of the data as stored: continuous likelihoods on grey levels are scored through
:func:`ppvae.blocks.discretize.scoring_view` (each level's bin), so every cell of a grey-level dataset is a
probability mass over the same levels and ranks in bits/dim.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppvae._fs import write_atomic
from ppvae._json import jsonable
from ppvae._rng import fork_rngs
from ppvae._version import __version__
from ppvae.blocks.specs import block_name, default_likelihood, short_spec, with_levels
from ppvae.data import DataSplits
from ppvae.diagnostics import arviz_io
from ppvae.diagnostics.diagnosis import diagnose
from ppvae.errors import ConfigError
from ppvae.infer.config import FitConfig
from ppvae.infer.observed import name_sites
from ppvae.infer.pair import as_pair
from ppvae.infer.train import fit
from ppvae.io import load, read, save
from ppvae.run_meta import RunMeta
from ppvae.vae import VAE

__all__ = [
    "Cell",
    "GridSettings",
    "cell_key",
    "check_blocks",
    "data_fingerprint",
    "train_key",
    "TRAINING_SETTINGS",
    "adopt_trained",
    "write_config",
    "group_of",
    "load_cell",
    "run_cell",
    "run_meta",
]

_IMAGES = 8  # originals, reconstructions and samples kept per image cell

# A cell trains as `ppvae train` does: the command line's preset is the source of the grid's training defaults.
_FIT = FitConfig.cli()


@dataclass(frozen=True)
class Cell:
    """One grid cell. Blocks are registry names or ``{"name":, "kwargs":}`` specs (``None`` likelihood: the data's
    default, as ``ppvae train`` chooses it)."""

    prior: str | dict = "normal"
    likelihood: str | dict | None = None
    guide: str | dict = "normal"
    objective: str = _FIT.objective
    seed: int = 0

    def label(self, *, objective: bool = False, seed: bool = False) -> str:
        parts = [short_spec(self.prior), short_spec(self.likelihood or "default"), short_spec(self.guide)]
        parts += [self.objective] if objective else []
        parts += [f"seed {self.seed}"] if seed else []
        return " · ".join(parts)


@dataclass(frozen=True)
class GridSettings:
    """What every cell shares: networks, latent size, training budget, test rows and diagnostics settings.

    ``num_samples``: importance samples S per test datapoint (log p̂ is IWAE_S). ``max_test_points``: evenly spaced
    test rows scored (the same rows for every cell, so differences are paired). ``diagnose``: keyword arguments of
    :func:`ppvae.diagnose` (``num_gap_points``, ``reference=False``, ...). The training fields' defaults are
    :meth:`ppvae.FitConfig.cli`'s; every other fit setting of a cell is that preset's too (:meth:`fit_config`).
    """

    latent_dim: int = 16
    encoder: str | dict = "mlp"
    decoder: str | dict = "mlp"
    epochs: int = _FIT.epochs
    batch_size: int = _FIT.batch_size
    lr: float = _FIT.lr
    num_particles: int = _FIT.num_particles
    patience: int | None = _FIT.patience
    num_samples: int = 1000
    max_test_points: int = 2000
    diagnose: dict = field(default_factory=dict)

    def fit_config(self, cell: Cell) -> FitConfig:
        """How ``cell`` is trained: these settings' budget and optimizer, the cell's objective and seed, on the CPU
        (the same numbers whatever the machine has), everything else :meth:`ppvae.FitConfig.cli`'s."""
        return replace(
            _FIT,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            num_particles=self.num_particles,
            patience=self.patience,
            objective=cell.objective,
            seed=cell.seed,
            device="cpu",
        )


def data_fingerprint(splits: DataSplits) -> str:
    """sha256 over the dataset's name, preprocessing and every split's values (every part of a tuple split): a cache
    never outlives its data."""
    h = hashlib.sha256(json.dumps([splits.name, splits.preprocessing, splits.levels], sort_keys=True).encode())
    for split in (splits.train, splits.val, splits.test):
        for part in split if isinstance(split, tuple) else (split,):
            t = getattr(part, "grey", part)  # DynamicBinarized keeps the grey levels in .grey
            if isinstance(t, torch.Tensor):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def observations(split: Any) -> Any:
    """The data ``x`` of a split: the split itself, or the first part of a tuple ``(x, *inputs)``. Built-in VAE cells
    model ``x`` alone; a user's pair is given the whole tuple."""
    return split[0] if isinstance(split, tuple) else split


def split_rows(split: Any, rows: np.ndarray) -> Any:
    """The same rows of every part of a split (a tensor or a tuple of tensors with one first dim)."""
    index = torch.as_tensor(rows)
    return tuple(part[index] for part in split) if isinstance(split, tuple) else split[index]


# The GridSettings fields that decide a cell's trained model; the others (num_samples, max_test_points, diagnose)
# only decide how it is scored. tests/test_compare.py checks that every field is in one list or the other.
TRAINING_SETTINGS = ("latent_dim", "encoder", "decoder", "epochs", "batch_size", "lr", "num_particles", "patience")
SCORING_SETTINGS = ("num_samples", "max_test_points", "diagnose")


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(jsonable(record), sort_keys=True, default=_key_part).encode()).hexdigest()[:20]


#: The layout of result.json; a change makes every cached result stale (its model is rescored, not retrained).
#: 2: findings as {code, severity, text} objects, failed parts.
RESULT_FORMAT = 2


def cell_key(cell: Cell, settings: GridSettings, fingerprint: str) -> str:
    """A cell's cache key: its configuration, the shared settings, the data, the ppvae version and the result
    format."""
    record = {"cell": asdict(cell), "settings": asdict(settings), "data": fingerprint, "ppvae": __version__}
    return _digest({**record, "result": RESULT_FORMAT})


def train_key(cell: Cell, settings: GridSettings, fingerprint: str) -> str:
    """The part of :func:`cell_key` that decides the trained model: the cell, the training settings
    (:data:`TRAINING_SETTINGS`), the data and the ppvae version. Cells with equal training keys differ only in how
    they are scored, so one's model serves the other."""
    training = {name: getattr(settings, name) for name in TRAINING_SETTINGS}
    return _digest({"cell": asdict(cell), "training": training, "data": fingerprint, "ppvae": __version__})


def write_config(directory: Path, cell: Cell, settings: GridSettings, fingerprint: str) -> None:
    """Record what the cell in ``directory`` is, with its keys, in ``config.json`` (once; atomically)."""
    path = directory / "config.json"
    if path.exists():
        return
    record = {
        "cell": asdict(cell),
        "settings": asdict(settings),
        "data": fingerprint,
        "ppvae": __version__,
        "cell_key": cell_key(cell, settings, fingerprint),
        "train_key": train_key(cell, settings, fingerprint),
    }
    try:
        write_json_atomic(path, record)
    except OSError:  # a read-only cache of finished cells still reads; it only cannot lend its models
        pass


def adopt_trained(directory: Path, key: str) -> Path | None:
    """Copy into ``directory`` the ``model.pt`` of another cell of the same cache whose training key is ``key``.

    Returns the cell directory it came from, or None (``directory`` has a model already, or no other cell trained
    this model). The copy is written under a temporary name and renamed, so a kill leaves no half model.pt.
    """
    if (directory / "model.pt").exists():
        return None
    for config in sorted(directory.parent.glob("*/config.json")):
        donor = config.parent
        if donor == directory or not (donor / "model.pt").exists():
            continue
        try:
            if json.loads(config.read_text()).get("train_key") != key:
                continue
        except (OSError, ValueError):
            continue
        tmp = directory / f"model.pt.{os.getpid()}.tmp"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            try:  # a hard link costs no space; model.pt is only ever replaced (new inode), never written in place
                os.link(donor / "model.pt", tmp)
            except OSError:
                shutil.copyfile(donor / "model.pt", tmp)
            os.replace(tmp, directory / "model.pt")
        except OSError:  # a full disk, a read-only cache: the cell trains instead
            tmp.unlink(missing_ok=True)
            return None
        return donor
    return None


def _key_part(obj: Any) -> str:
    """A block given as an object: its type and, for a module, a hash of its weights (its repr otherwise)."""
    if isinstance(obj, torch.nn.Module):
        h = hashlib.sha256()
        for name, t in obj.state_dict().items():
            h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
        return f"{type(obj).__qualname__}:{h.hexdigest()}"
    return f"{type(obj).__qualname__}:{obj!r}"


def group_of(
    splits: DataSplits,
    discrete: bool | None,
    *,
    masked: Sequence[str] = (),
    mask_key: str | None = None,
    label: str | None = None,
) -> str:
    """Comparability group: cells are ranked only against cells scored as the same kind of number.

    Binarized data (Bernoulli) never rank against grey levels, a static binarization never against a dynamic one,
    probability masses never against densities (a user's pair with a density likelihood on grey levels included).
    A pair that masks elements of its observations out of the density (``masked``: a conditional model scoring the
    pixels it predicts, missing entries) scores a probability of fewer elements than the others: it ranks only
    against pairs whose masks on the first scored batch are the same (``mask_key``, e.g. a CVAE and its baseline on
    the same hidden quadrants), or, without a key, is a group of its own (named by ``label``).
    """
    if masked:
        sites = name_sites(masked)
        kind = "probability" if discrete else "density" if discrete is False else "score of unknown kind"
        if mask_key:
            return f"{splits.name}: {kind} of the elements its masks keep ({sites} masked; masks {mask_key})"
        return f"{splits.name}: {label or 'a model'}'s {kind} of the elements it keeps ({sites} masked)"
    if discrete is None:
        return f"{splits.name}: a score of unknown kind (the model does not say whether it is a mass or a density)"
    if not discrete:  # a density is never ranked against probabilities, whatever the data
        return f"{splits.name}: density (not a probability of the data)"
    if splits.binarize:
        return f"{splits.name}, binarized ({splits.binarize}): probability of binary pixels"
    if splits.levels:
        return f"{splits.name}, {splits.levels} grey levels: probability mass"
    return f"{splits.name}: probability mass"


def test_rows(n: int, max_points: int) -> np.ndarray:
    """Evenly spaced rows of the test split (already a seeded shuffle), the same for every cell."""
    return np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(np.int64))


def build_vae(cell: Cell, settings: GridSettings, splits: DataSplits) -> VAE:
    likelihood = cell.likelihood or default_likelihood(splits)
    # The initial weights come from torch's global RNG: seeded by the cell, on a copy (the caller's stays as it was).
    with fork_rngs(cell.seed):
        return VAE(
            splits.data_shape,
            settings.latent_dim,
            prior=cell.prior,
            likelihood=with_levels(likelihood, splits.levels),
            guide=cell.guide,
            encoder=settings.encoder,
            decoder=settings.decoder,
        )


def check_blocks(cells: Sequence[Cell], settings: GridSettings, splits: DataSplits) -> None:
    """Build every distinct block of the grid once on the data's shape, as :func:`build_vae` would, and raise
    :class:`ConfigError` for the first that cannot be built: an unknown name (the message lists the registry's
    names), an option its class does not take, or a value its constructor refuses.

    Blocks are built alone (the encoder and decoder once, with the first likelihood's outputs), not as whole VAEs:
    a grid costs one set of networks to check, whatever its size. Modules given as blocks are the user's own and
    are not touched. Runs on copies of the global RNGs, without gradients.
    """
    from ppvae.blocks.guides import GUIDES
    from ppvae.blocks.likelihoods import LIKELIHOODS
    from ppvae.blocks.nets import build_decoder, build_encoder
    from ppvae.blocks.priors import PRIORS

    shape, latent_dim = splits.data_shape, settings.latent_dim

    def likelihood(spec: Any) -> Any:
        return LIKELIHOODS.build(with_levels(spec, splits.levels), data_shape=shape)

    with fork_rngs(), torch.no_grad():
        encoder = _build_once("encoder", settings.encoder, lambda spec: build_encoder(spec, shape))
        built = [
            _build_once("likelihood", lk, likelihood)
            for lk in _distinct(c.likelihood or default_likelihood(splits) for c in cells)
        ]
        num_params = next((lk.num_params for lk in built if isinstance(getattr(lk, "num_params", None), int)), 1)
        _build_once("decoder", settings.decoder, lambda spec: build_decoder(spec, latent_dim, (num_params, *shape)))
        for guide in _distinct(c.guide for c in cells):
            _build_once(
                "guide", guide, lambda spec: GUIDES.build(spec, in_features=encoder.out_features, latent_dim=latent_dim)
            )
        for prior in _distinct(c.prior for c in cells):
            _build_once("prior", prior, lambda spec: PRIORS.build(spec, latent_dim=latent_dim, data_shape=shape))


def _distinct(specs: Iterable[Any]) -> list[Any]:
    """Each spec once, in order (specs are dicts: unhashable, compared by their JSON)."""
    seen: dict[str, Any] = {}
    for spec in specs:
        seen.setdefault(json.dumps(jsonable(spec), sort_keys=True, default=_key_part), spec)
    return list(seen.values())


def _build_once(kind: str, spec: Any, build: Callable[[Any], Any]) -> Any:
    """``build(spec)``; a failure as a one-line :class:`ConfigError` that names the block."""
    try:
        return build(spec)
    except Exception as err:  # noqa: BLE001 - a constructor refusing a value: the grid is wrong, not ppvae
        try:
            label = short_spec(spec)
        except Exception:  # noqa: BLE001 - a malformed spec (kwargs not a dict): show it as it was given
            label = repr(spec)
        first = (str(err).splitlines() or [""])[0][:300]
        if isinstance(err, ConfigError):
            name = _block_name_or_none(spec)
            if name and name in first:  # the registry's message names the value and the valid choices
                raise
            raise ConfigError(f"the grid's {kind} {label}: {first}") from None  # "levels must be …": say whose
        raise ConfigError(f"cannot build the grid's {kind} {label}: {type(err).__name__}: {first}") from None


def _block_name_or_none(spec: Any) -> str | None:
    """A spec's registry name, or None for a malformed one."""
    try:
        return block_name(spec)
    except Exception:  # noqa: BLE001 - a dict without a name
        return None


def run_cell(cell: Cell, settings: GridSettings, splits: DataSplits, directory: Path) -> dict[str, Any]:
    """Train, score and save one cell in ``directory``; a failure is recorded as the result, never raised.

    fit and the scores seed the global RNGs themselves; they run on copies, so a caller's seeded state is as it was.
    """
    with fork_rngs():
        return _run_cell(cell, settings, splits, directory)


def _run_cell(cell: Cell, settings: GridSettings, splits: DataSplits, directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict[str, Any] = {"label": cell.label(), "cell": jsonable(asdict(cell)), "status": "ok", "error": None}
    try:
        trained = _trained(directory)
        if trained is not None:  # fit finished before (an interruption, other scoring settings): score its model
            model, history = trained
            result["rescored"] = True
        else:
            model = build_vae(cell, settings, splits)
            history = fit(
                model,
                observations(splits.train),
                val_data=observations(splits.val),
                checkpoint_dir=directory / "checkpoints",
                resume=True,
                progress=False,
                config=settings.fit_config(cell),
            ).history
            save(model, directory / "model.pt", meta=run_meta(splits, settings, cell, history))
        result.update(history=history, train_seconds=sum(h.get("seconds", 0.0) for h in history))
        result.update(score(model, splits, settings, seed=cell.seed, directory=directory, label=cell.label()))
    except Exception as err:  # noqa: BLE001 - a failing cell is reported in the table, the grid goes on
        result.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    result["seconds"] = time.perf_counter() - start
    write_json_atomic(directory / "result.json", result)
    return result


def _trained(directory: Path) -> tuple[VAE, list] | None:
    """The model (and its history) a finished fit saved in ``directory``, or None if there is none to trust."""
    path = directory / "model.pt"
    if not path.exists():
        return None
    try:
        obj = read(path)
        return load(path), RunMeta.from_dict(obj.get("meta")).history or []
    except Exception:  # noqa: BLE001 - a half-written or foreign file: train again
        return None


def run_meta(splits: DataSplits, settings: GridSettings, cell: Cell, history: list) -> dict[str, Any]:
    """What ``ppvae evaluate/diagnose/sample`` need to reload the cell's data: it is a run like ``ppvae train``'s."""
    meta = RunMeta.of_data(
        splits, latent_dim=settings.latent_dim, seed=splits.preprocessing.get("seed", 0), cell=asdict(cell),
        history=history,
    )  # fmt: skip
    return jsonable(meta.to_dict())


def score(
    model: Any,
    splits: DataSplits,
    settings: GridSettings,
    *,
    seed: int,
    directory: Path,
    guide: Any = None,
    group: str | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Diagnose ``model`` (with ``guide`` for a pair of functions) on the grid's test rows; write arrays.npz and
    diagnosis.nc; return summary numbers.

    The comparability group comes from what the scores are (:func:`group_of`: the observed sites' support, read by
    :func:`ppvae.evaluate`, and the preprocessing; ``label`` names a masked pair's own group); ``group`` names it
    instead. A tuple test split ``(x, *inputs)`` is given whole to a user's pair and as ``x`` to a built-in VAE, on
    the same rows.
    """
    from ppvae.blocks.discretize import scoring_view

    rows = test_rows(len(observations(splits.test)), settings.max_test_points)
    # Only an unmodified ppvae.VAE is known to score x through its own likelihood, so only its view by levels (and
    # its encoder, reconstructions and samples below) can be trusted; any other pair is scored as it is.
    vae = model if as_pair(model, guide, what="compare").is_builtin_vae else None
    inputs = split_rows(splits.test, rows)
    x = observations(inputs) if vae is not None else inputs
    scored = scoring_view(vae, levels=splits.levels) if vae is not None and splits.levels else model
    with warnings.catch_warnings(record=True) as caught:  # kept with the cell, shown in its row of the table
        warnings.simplefilter("always")
        d = diagnose(
            scored, x, guide=guide, num_samples=settings.num_samples, seed=seed, split="test", **settings.diagnose
        )
    ev = d.evaluation
    if not np.isfinite(ev.log_px).any():
        raise FloatingPointError("every test datapoint has non-finite log-weights: the model is broken (NaN weights?)")
    group = group or group_of(splits, ev.discrete, masked=ev.masked, mask_key=ev.mask_key, label=label)
    out = {"diagnosis": d.to_dict(), "group": group, "num_test": len(rows)}
    out["warnings"] = list(dict.fromkeys(str(w.message) for w in caught))
    out["scored_as"] = getattr(getattr(scored, "likelihood", None), "method", None)
    arrays: dict[str, np.ndarray] = {"rows": rows, "log_px": ev.log_px, "elbo": ev.elbo, "khat": d.khat}
    if vae is not None:
        with torch.no_grad():
            arrays["z_mean"] = vae.encode(x).mean.reshape(len(x), -1).double().numpy()
            if len(splits.data_shape) == 3:  # images (C, H, W): a few originals, reconstructions, samples
                with fork_rngs(seed):
                    arrays["originals"] = x[:_IMAGES].numpy()
                    arrays["reconstructions"] = vae.reconstruct(x[:_IMAGES]).numpy()
                    arrays["samples"] = vae.generate(_IMAGES).numpy()
    if splits.test_labels is not None:
        arrays["labels"] = splits.test_labels[torch.as_tensor(rows)].numpy()
    np.savez(directory / "arrays.npz", **arrays)
    arviz_io.save_netcdf(d.to_inference_data(), directory / "diagnosis.nc")
    return out


def load_cell(directory: Path) -> dict[str, Any] | None:
    """A finished cell's result and arrays, or None when it has not finished (no result.json)."""
    path = directory / "result.json"
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
        arrays = directory / "arrays.npz"
        if result.get("status") == "ok":
            with np.load(arrays, allow_pickle=False) as f:  # never unpickle: caches may come from someone else
                result["arrays"] = {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError):  # unreadable or incomplete: the cell is not finished, run it again
        return None
    return result


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`ppvae._fs.write_atomic`): readers see all or nothing."""
    # block objects are recorded by type (_key_part)
    text = json.dumps(jsonable(obj), indent=1, default=_key_part)
    write_atomic(path, lambda f: f.write(text.encode()))
