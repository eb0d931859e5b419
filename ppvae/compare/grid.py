"""Compare posterior approximations across priors × likelihoods × guides (× objectives × seeds) on one dataset.

``compare`` trains every cell of the grid with :func:`ppvae.fit` under the same networks, budget and splits, scores
each with :func:`ppvae.diagnose` on the same test rows, and returns a :class:`Comparison` whose table puts only
comparable numbers side by side:

- **groups**: cells are ranked only within a comparability group (:func:`ppvae.compare.cells.group_of`): binary
  pixels never against grey levels, masses never against densities; continuous likelihoods on grey levels are
  scored as probabilities of each level's bin, so they rank with Categorical and discretized logistic;
- **paired differences**: ``elpd_diff ± dse`` to the group's best cell come from ArviZ ``compare`` on the
  per-datapoint IWAE log p̂ of the same test rows (sums over datapoints, nats; Vehtari, Gelman & Gabry 2017);
  ``delta_per_point ± delta_se`` are the same per datapoint;
- **guides** are ranked within one prior × likelihood by how well they approximate the posterior of their decoder
  (inference gap, then k̂), not by log p̂, which also reflects the decoder each guide trained;
- every score says its estimator (``estimator``: IWAE_S, the ELBO column is the ELBO) and ``split``.

Cells are cached on disk under a hash of their configuration and the data; an interrupted grid resumes from the
finished cells; a rerun that changes only how cells are scored (S, test rows, diagnostics) rescores the trained
models; a failing cell is a row with its error; ``jobs`` runs cells in parallel processes whose torch
threads share the machine's cores.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ppvae._fs import locked_dir
from ppvae._validate import check, check_seed
from ppvae.blocks.specs import default_likelihood, short_spec
from ppvae.compare.cells import (
    Cell,
    GridSettings,
    adopt_trained,
    cell_key,
    check_blocks,
    data_fingerprint,
    load_cell,
    observations,
    run_cell,
    score,
    train_key,
    write_config,
    write_json_atomic,
)
from ppvae.compare.table import COLUMNS, build_table, verdict
from ppvae.data import DataSplits
from ppvae.diagnostics.config import DiagnoseConfig
from ppvae.errors import ConfigError, PPVAEError
from ppvae.infer.config import CONSTRAINTS, FitConfig

__all__ = ["Comparison", "COLUMNS", "check_grid", "combine", "compare", "Cell", "GridSettings"]

# Progress lines go here unless the caller passes its own printer: a library prints nothing by itself, and a user
# sees them with logging.basicConfig(level=logging.INFO) (the CLI passes print).
_log = logging.getLogger("ppvae.compare")  # the package's logger: one name for users to configure


@dataclass
class Comparison:
    """Results of a grid: one dict per cell (see :mod:`ppvae.compare.cells`), and where they live."""

    cells: list[dict[str, Any]]
    settings: GridSettings
    dataset: str
    directory: Path | None = None
    notes: list[str] = field(default_factory=list)

    def table(self) -> Any:
        """A ``pandas.DataFrame``, one row per cell, columns :data:`COLUMNS` (documented there)."""
        return build_table(self.cells, self.settings)

    def to_markdown(self) -> str:
        """The table as GitHub markdown (no extra dependency)."""
        df = self.table()
        cols = [c for c in df.columns if c not in ("error", "warnings")] + ["error"]
        head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        body = "".join("| " + " | ".join(_md(r[c]) for c in cols) + " |\n" for _, r in df.iterrows())
        return head + body

    def verdict(self) -> list[str]:
        """Sentences, most important first: the best cell per group and how sure, the best guides, failures."""
        return verdict(self.table())

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``table.csv``, ``table.md``, the figures (PNG) and ``report.html`` (self-contained) in ``directory``.

        Each cell's InferenceData (``diagnosis.nc``) stays in its cache directory, listed in the report's notes.
        """
        from ppvae.report import compare_figures as compare_plots
        from ppvae.report import html as report

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        df = self.table()
        paths = {"csv": directory / "table.csv", "markdown": directory / "table.md"}
        df.to_csv(paths["csv"], index=False)
        paths["markdown"].write_text(self.to_markdown())
        plot_cells = [_plot_cell(c) for c in self.cells]
        figures = []
        for name, caption, fn in (
            ("log_px", "log p̂ per test datapoint against each group's best cell, ±2 paired se", "log_px_differences"),
            ("khat", "PSIS k̂ per test datapoint: above the threshold, log p̂ of that datapoint is unreliable",
             "khat_distributions"),
            ("learning_curves", "validation ELBO (solid) and training ELBO (dashed) per epoch", "learning_curves"),
            ("active_units", "active latent dimensions (Var_x E_q[z_d] > 0.01) out of D", "active_units_plot"),
            ("latent", "encoder means of test points, first two principal components, coloured by label",
             "latent_projections"),
            ("images", "test images, their reconstructions, and samples from the prior", "reconstructions_and_samples"),
        ):  # fmt: skip
            try:
                paths[name] = getattr(compare_plots, fn)(plot_cells, directory / f"{name}.png")
                figures.append((caption, paths[name]))
            except (ValueError, PPVAEError) as err:  # no cell has what this figure needs: leave it out, say so
                self.notes.append(f"figure {name} left out: {err}")
        s = self.settings
        subtitle = (
            f"{self.dataset}: {len(self.cells)} cells, latent dim {s.latent_dim}, encoder {short_spec(s.encoder)}, "
            f"decoder {short_spec(s.decoder)}, {s.epochs} epochs (batch {s.batch_size}, lr {s.lr}); every score on the "
            f"same {_num_test(self.cells)} test datapoints, log p̂ by IWAE_{s.num_samples}"
        )
        # The page's table holds the numbers; long text (warnings) would make every row tall: listed below it.
        shown = df.drop(columns=["warnings", "estimator", "split", "prior", "likelihood", "guide", "objective", "seed"])
        notes = [f"warnings, {r['cell']}: {r['warnings']}" for _, r in df.iterrows() if r["warnings"]]
        notes += self.notes
        if self.directory is not None:
            notes.append(f"per-cell models, InferenceData (diagnosis.nc) and arrays: {self.directory / 'cells'}/")
        paths["html"] = report.write_html(
            directory / "report.html",
            title="ppvae comparison",
            subtitle=subtitle,
            verdict=verdict(df),
            table=shown,
            column_docs={k: v for k, v in COLUMNS.items() if k in shown.columns},
            figures=figures,
            notes=notes,
        )
        return paths


def compare(
    data: DataSplits,
    *,
    priors: Sequence[str | dict] = ("normal",),
    likelihoods: Sequence[str | dict | None] = (None,),
    guides: Sequence[str | dict] = ("normal",),
    objectives: Sequence[str] = (FitConfig().objective,),
    seeds: Sequence[int] = (0,),
    models: dict[str, Any] | None = None,
    groups: dict[str, str] | None = None,
    settings: GridSettings | None = None,
    out: str | Path | None = None,
    jobs: int = 1,
    retry_failed: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Train and score every cell of priors × likelihoods × guides × objectives × seeds on ``data``.

    Args:
        data: the dataset's splits (:func:`ppvae.data.load`); cells train on ``train``, early-stop on ``val`` when
            ``settings.patience`` is set, and are scored on the same rows of ``test``.
        priors, likelihoods, guides, objectives, seeds: the grid axes; blocks as registry names or
            ``{"name":, "kwargs":}`` specs (likelihood ``None``: the data's default).
        models: already-fitted models to score alongside, ``name → model``: a ppvae.VAE, an object with
            ``model``/``guide`` methods, or a ``(model_fn, guide_fn)`` tuple (a user's own pair); scored each call,
            not cached. Its comparability group comes from its observed sites (a discrete support is a probability
            of the data, ranked with the built-in cells on the same preprocessing; a continuous one a density).
            A tuple split ``(x, *inputs)`` (data plus conditioning inputs, the same first dim) is given whole to
            these models and as ``x`` to the grid's cells, on the same rows.
        groups: ``name → group`` for fitted models whose group you set yourself (their rank is then among the
            cells of that group name only).
        settings: what every cell shares (networks, budget, S, test rows, diagnostics); default
            :class:`GridSettings`.
        out: cache directory (``out/cells/<hash>/``); a rerun with the same directory reuses every finished cell,
            and one with other scoring settings (``num_samples``, ``max_test_points``, ``diagnose``) reuses the
            trained models and only scores them again. One grid at a time: a second on the same directory is
            refused while the first holds ``out/.lock``. Default: a temporary directory removed afterwards.
        jobs: cells trained in parallel in as many worker processes, each taking one cell at a time; each gets
            ``cores // jobs`` torch threads (cores this process may use). A cell whose process dies is a failed row,
            and a fresh process takes the cells after it.
        retry_failed: rerun cells whose cached result is a failure (default: report the cached failure).
        progress: called with one line per cell as it finishes (``print``, say). Default: each line is logged at
            INFO level to the ``ppvae.compare`` logger, which says nothing unless logging is configured.

    Returns:
        :class:`Comparison`.
    """
    settings = settings or GridSettings()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be an integer ≥ 1, got {jobs!r}")
    # Everything is checked before the cache directory is made or a cell starts: a typo costs no training.
    cells = check_grid(
        data, priors=priors, likelihoods=likelihoods, guides=guides, objectives=objectives, seeds=seeds,
        models=models, groups=groups, settings=settings,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() if out is None else locked_dir(Path(out)) as root:
        root = Path(root)
        fingerprint = data_fingerprint(data)
        dirs = [root / "cells" / cell_key(c, settings, fingerprint) for c in cells]
        results: dict[int, dict] = {}
        todo = []
        for i, d in enumerate(dirs):
            write_config(d, cells[i], settings, fingerprint)  # its keys: a later grid finds the model trained here
            done = load_cell(d)
            if done is not None and (done["status"] == "ok" or not retry_failed):
                results[i] = done
                _say(progress, done, "cached")
                continue
            if done is not None:  # a failed cell retried: from scratch, not from the state that failed
                for name in ("checkpoints", "model.pt", "result.json"):
                    path = d / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            # Only the scoring settings changed since a model was trained: score that model, do not train again.
            adopt_trained(d, train_key(cells[i], settings, fingerprint))
            todo.append(i)
        for i, result in _run(todo, cells, dirs, settings, data, jobs):
            results[i] = load_cell(dirs[i]) or result
            _say(progress, results[i], "rescored" if results[i].get("rescored") else "done")
        ordered = [results[i] for i in range(len(cells))]
        if out is not None:  # where each cell's model, arrays and InferenceData live
            for result, d in zip(ordered, dirs, strict=True):
                result["directory"] = str(d)
        for name, model in (models or {}).items():
            ordered.append(_score_fitted(name, model, data, settings, root / "fitted", (groups or {}).get(name)))
            _say(progress, ordered[-1], "scored")
    varying = {k: len({getattr(c, k) for c in cells}) > 1 for k in ("objective", "seed")}
    for cell, result in zip(cells, ordered, strict=False):
        result["label"] = cell.label(objective=varying["objective"], seed=varying["seed"])
    _unique_labels(ordered)
    return Comparison(ordered, settings, data.name, directory=None if out is None else Path(out))


def check_grid(
    data: DataSplits,
    *,
    priors: Sequence[str | dict] = ("normal",),
    likelihoods: Sequence[str | dict | None] = (None,),
    guides: Sequence[str | dict] = ("normal",),
    objectives: Sequence[str] = (FitConfig().objective,),
    seeds: Sequence[int] = (0,),
    models: dict[str, Any] | None = None,
    groups: dict[str, str] | None = None,
    settings: GridSettings | None = None,
) -> list[Cell]:
    """The cells of a grid (arguments as for :func:`compare`), once every name, block spec and setting is checked.

    Raises :class:`ConfigError` naming the first bad value and what it may be: an axis given as one string, an
    unknown block, objective or option (with the registry's names), a value a block's constructor refuses (each
    distinct block is built once on the data's shape, cheaply: :func:`ppvae.compare.cells.check_blocks`), a seed
    outside NumPy's range, a setting fit or diagnose would refuse, a repeated cell. Nothing is trained or written:
    :func:`compare` calls it first, and ``ppvae compare`` before it prints anything.
    """
    settings = settings or GridSettings()
    if not isinstance(settings, GridSettings):
        raise ConfigError(f"settings must be a GridSettings, got {type(settings).__name__}")
    axes = {"priors": priors, "likelihoods": likelihoods, "guides": guides, "objectives": objectives, "seeds": seeds}
    for name, axis in axes.items():
        if isinstance(axis, (str, dict)) or not isinstance(axis, Iterable):
            raise ConfigError(f"{name} must be a list of values (one per grid row), got {axis!r}; write [{axis!r}]")
    if models is not None and not (isinstance(models, dict) and all(isinstance(k, str) for k in models)):
        raise ConfigError(f"models must be a dict of name → fitted model, got {type(models).__name__}")
    if groups is not None:
        if not isinstance(groups, dict) or not all(isinstance(v, str) and v for v in groups.values()):
            raise ConfigError(f"groups must be a dict of fitted model name → group name, got {groups!r}")
        unknown = sorted(set(groups) - set(models or {}))
        if unknown:
            raise ConfigError(f"groups names {unknown}, which are not among the fitted models {sorted(models or {})}")
    if data.test is None or len(observations(data.test)) == 0:
        raise ConfigError(f"dataset {data.name!r} has no test split to score the cells on")
    _check_tuple_splits(data)
    _check_settings(settings, data)
    from ppvae.infer.objectives import make_objective

    for objective in objectives:
        make_objective(objective, settings.num_particles)  # an unknown name, or iwae with one particle
    seeds = [check_seed(s, "each of seeds") for s in seeds]
    # None is the data's default likelihood: named here, so it is one cell with the explicit name, not two.
    likelihoods = [default_likelihood(data) if lk is None else lk for lk in likelihoods]
    cells = [
        Cell(p, lk, g, o, s) for p, lk, g, o, s in itertools.product(priors, likelihoods, guides, objectives, seeds)
    ]
    if not cells and not models:
        raise ConfigError("compare needs at least one grid cell or one fitted model")
    if len({_identity(c) for c in cells}) != len(cells):
        raise ConfigError("the grid repeats a cell: give each axis distinct values")
    if cells:
        check_blocks(cells, settings, data)
    return cells


def _check_tuple_splits(data: DataSplits) -> None:
    """A tuple split ``(x, *inputs)`` must be tensors with one first dim: the same rows of each are scored."""
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        if not isinstance(split, tuple):
            continue
        if not split or not all(isinstance(p, torch.Tensor) for p in split):
            raise ConfigError(f"the {name} split is a tuple; each of its parts must be a tensor (x, *inputs)")
        sizes = {len(p) for p in split}
        if len(sizes) != 1:
            raise ConfigError(f"the {name} split's parts have different numbers of rows {sorted(sizes)}: give each "
                              "part one row per datapoint")  # fmt: skip


def _check_settings(settings: GridSettings, data: DataSplits) -> None:
    """Refuse a GridSettings value that fit, evaluate or diagnose would refuse in every cell, before any trains."""
    for name in ("epochs", "batch_size", "lr", "num_particles", "patience"):  # fit's settings: FitConfig's checks
        check(f"GridSettings.{name}", getattr(settings, name), *CONSTRAINTS[name])
    for name, low in {"latent_dim": 1, "num_samples": 2, "max_test_points": 1}.items():
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"GridSettings.{name} must be a whole number ≥ {low}, got {value!r}")
    if settings.patience is not None and data.val is None:
        raise ConfigError(f"GridSettings.patience needs a validation split; dataset {data.name!r} has none")
    if not isinstance(settings.diagnose, dict):
        raise ConfigError(f"GridSettings.diagnose must be a dict of diagnose options, got {settings.diagnose!r}")
    _check_diagnose_options(settings.diagnose)


def _unique_labels(cells: list[dict]) -> None:
    """Make labels unique (a suffix ``#2``, ``#3``): rows are found by label in tables, plots and reports."""
    seen: dict[str, int] = {}
    for c in cells:
        n = seen[c["label"]] = seen.get(c["label"], 0) + 1
        if n > 1:
            c["label"] = f"{c['label']} #{n}"


def _check_diagnose_options(options: dict) -> None:
    """Refuse GridSettings.diagnose keys that diagnose does not take, and values its parts would refuse, before any
    cell trains (the parts and their settings are declared in :mod:`ppvae.diagnostics.config`)."""
    reserved = sorted(set(options) & {"num_samples", "seed", "split", "config", "guide"})
    if reserved:
        raise ConfigError(
            f"GridSettings.diagnose sets {reserved}, which the grid sets itself (num_samples from "
            "GridSettings.num_samples, the seed from the cell, split 'test'); leave them out"
        )
    passthrough = {"data_plate", "device"}  # diagnose's own arguments, not a part's settings
    DiagnoseConfig.from_mapping(
        {k: v for k, v in options.items() if k not in passthrough}, label=lambda o: f"GridSettings.diagnose[{o!r}]"
    )


def combine(*comparisons: Comparison) -> Comparison:
    """One comparison of several grids (e.g. binarized and grey-level runs of one dataset) for one report.

    Their cells keep their comparability groups, so nothing from different groups is ranked together; the grids
    must share their settings (the same S and test rows make the columns mean the same thing).
    """
    if not comparisons:
        raise ConfigError("combine needs at least one comparison")
    settings = comparisons[0].settings
    if any(c.settings != settings for c in comparisons[1:]):
        raise ConfigError("combine needs comparisons made with the same GridSettings")
    cells = [dict(cell) for c in comparisons for cell in c.cells]
    _unique_labels(cells)
    names = " + ".join(dict.fromkeys(c.dataset for c in comparisons))
    return Comparison(cells, settings, names, notes=[n for c in comparisons for n in c.notes])


def _identity(cell: Cell) -> str:
    import json

    parts = [cell.prior, cell.likelihood, cell.guide, cell.objective, cell.seed]
    return json.dumps(parts, sort_keys=True, default=lambda o: f"{type(o).__name__}@{id(o)}")  # module blocks


def _say(progress: Callable[[str], None] | None, result: dict, how: str) -> None:
    """One line about a finished cell, to ``progress`` or, without one, to this module's logger."""
    if progress is None:
        if not _log.isEnabledFor(logging.INFO):
            return
        progress = _log.info
    if result["status"] == "ok":
        ev = result["diagnosis"]["evaluation"]
        progress(f"{how}: {result['label']}: log p̂ {_fmt(ev.get('log_px'))} ± {_fmt(ev.get('log_px_se'))} nats")
    else:
        progress(f"{how}: {result['label']}: FAILED {result['error']}")


def _fmt(value: Any) -> str:
    """A number from result.json (null, "inf" and "-inf" included) with 3 decimals."""
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return "—"


def _run(
    todo: list[int], cells: list[Cell], dirs: list[Path], settings: GridSettings, data: DataSplits, jobs: int
) -> Iterable[tuple[int, dict]]:
    """Run the unfinished cells, in this process (jobs = 1) or in ``jobs`` worker processes."""
    if jobs == 1 or len(todo) <= 1:
        for i in todo:
            yield i, run_cell(cells[i], settings, data, dirs[i])
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(jobs, len(todo), cores)
    threads = max(1, cores // workers)  # no oversubscription: workers × threads ≤ the cores this process may use
    ctx = multiprocessing.get_context("spawn")  # fork after torch started its thread pools can deadlock
    # Each worker process runs one cell at a time and, when the cell returns, takes the next (spawning a process and
    # importing torch and Pyro costs seconds per cell); a cell that kills its worker (out of memory, a crash in
    # native code) fails alone, as no other cell is queued in that process, and a fresh process takes its place. A
    # cell whose reused worker dies runs once more in a fresh process (the worker may have died idle, before the
    # cell reached it), so a cell that kills its worker fails after at most two tries.
    queue, running, idle, again = list(todo), {}, [], set()
    try:
        while queue or running:
            while queue and len(running) < workers:
                i, task, reused = queue.pop(0), None, False
                while idle and task is None and i not in again:  # a second try goes to a fresh process
                    pool = idle.pop()
                    try:
                        task, reused = pool.submit(_worker_cell, cells[i], settings, dirs[i]), True
                    except BrokenProcessPool:  # its process died between cells (killed while idle): drop it
                        pool.shutdown(wait=False)
                if task is None:
                    pool = _worker_pool(ctx, data, threads)
                    task = pool.submit(_worker_cell, cells[i], settings, dirs[i])
                running[task] = (i, pool, reused)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                i, pool, reused = running.pop(future)
                try:
                    result = future.result()
                    idle.append(pool)
                except Exception as err:  # noqa: BLE001 - the worker died: this cell failed, the grid goes on
                    pool.shutdown(wait=False)
                    if reused and isinstance(err, BrokenProcessPool) and i not in again:
                        # A reused worker may have died idle, before this cell reached it: the cell goes once more,
                        # to a fresh process, and fails only if that one dies too.
                        again.add(i)
                        queue.insert(0, i)
                        continue
                    result = {"label": cells[i].label(), "status": "failed", "cell": _cell_record(cells[i])}
                    result["error"] = f"worker process died ({type(err).__name__}: {err}); rerun with jobs=1 to see why"
                    write_json_atomic(dirs[i] / "result.json", result)
                yield i, result
    finally:
        for pool in idle:
            pool.shutdown(wait=False)
        for _, pool, _ in running.values():
            pool.shutdown(wait=False, cancel_futures=True)


def _worker_pool(ctx: Any, data: DataSplits, threads: int) -> ProcessPoolExecutor:
    """A one-process pool holding the grid's data, for one cell at a time."""
    return ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker, initargs=(data, threads))


def _cell_record(cell: Cell) -> dict:
    from dataclasses import asdict

    return asdict(cell)


_WORKER_DATA: DataSplits | None = None


def _init_worker(data: DataSplits, threads: int) -> None:
    global _WORKER_DATA
    _WORKER_DATA = data
    _exit_with_parent()
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")  # the parent reports each cell's findings; worker warnings would interleave


def _exit_with_parent() -> None:
    """End this worker when the grid's process is gone (killed): a rerun must not race an orphan on the same cell."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker_cell(cell: Cell, settings: GridSettings, directory: Path) -> dict:
    assert _WORKER_DATA is not None
    return run_cell(cell, settings, _WORKER_DATA, directory)


def _score_fitted(
    name: str, model: Any, data: DataSplits, settings: GridSettings, root: Path, group: str | None = None
) -> dict:
    """Score an already-fitted model (a VAE or a user's pair) like a grid cell; failures become rows."""
    directory = root / "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    directory.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"label": name, "cell": {"fitted": name}, "status": "ok", "error": None, "history": []}
    try:
        model, guide = model if isinstance(model, tuple) else (model, None)  # a (model_fn, guide_fn) pair
        result.update(score(model, data, settings, seed=0, directory=directory, guide=guide, group=group, label=name))
    except Exception as err:  # noqa: BLE001 - reported in the table
        result.update(status="failed", error=f"{type(err).__name__}: {err}")
    write_json_atomic(directory / "result.json", result)
    return load_cell(directory) or result


def _plot_cell(c: dict[str, Any]) -> dict[str, Any]:
    """The dict :mod:`ppvae.report.compare_figures` reads, from a cell's result and arrays."""
    a = c.get("arrays", {})
    d = c.get("diagnosis") or {}
    collapse = d.get("collapse") or {}
    return {
        "label": c["label"],
        "group": c.get("group", ""),
        "status": c["status"] if a else "failed",
        "history": c.get("history") or [],
        "log_px": a.get("log_px"),
        "khat": a.get("khat"),
        "khat_threshold": (d.get("psis") or {}).get("khat_threshold", 0.7),
        "active_units": collapse.get("active_units"),
        "latent_dim": collapse.get("latent_dim"),
        "z_mean": a.get("z_mean"),
        "labels": a.get("labels"),
        "originals": a.get("originals"),
        "reconstructions": a.get("reconstructions"),
        "samples": a.get("samples"),
    }


def _num_test(cells: list[dict]) -> int | str:
    sizes = {c.get("num_test") for c in cells if c["status"] == "ok"}
    return sizes.pop() if len(sizes) == 1 else "the same"


def _md(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")
