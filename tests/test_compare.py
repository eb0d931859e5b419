"""``ppvae.compare``: grouping, paired ranking, caching and resume, failing cells, the report files."""

import dataclasses
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

import ppvae
from ppvae.compare import cells as compare_cells
from ppvae.compare.grid import COLUMNS, Cell, GridSettings, combine, compare
from ppvae.compare.table import build_table

TINY = GridSettings(
    latent_dim=2,
    encoder={"name": "mlp", "kwargs": {"hidden": [32]}},
    decoder={"name": "mlp", "kwargs": {"hidden": [32]}},
    epochs=2,
    batch_size=256,
    num_samples=64,
    max_test_points=40,
    diagnose={"gaps": False, "reference": False, "sbc_simulations": 20},
)


@pytest.fixture(scope="module")
def digits():
    return ppvae.data.load("digits", seed=0)


@pytest.fixture(scope="module")
def grid(digits, tmp_path_factory):
    """normal vs mixture prior × categorical vs a likelihood that fails on grey levels (bernoulli)."""
    out = tmp_path_factory.mktemp("grid")
    comp = compare(digits, priors=["normal", "mixture"], likelihoods=["categorical", "bernoulli"], settings=TINY,
                   out=out, progress=None)  # fmt: skip
    return comp, out


def test_table_has_every_documented_column_and_nothing_else(grid):
    comp, _ = grid
    df = comp.table()
    assert list(df.columns) == list(COLUMNS)
    assert all(len(doc) > 10 for doc in COLUMNS.values())
    assert len(df) == 4
    ok = df[df["status"] == "ok"]
    assert ok["warnings"].str.contains("num_samples=64 is too few").all()  # caught per cell, shown in its row


def test_failing_cell_is_a_row_with_its_error_and_the_rest_are_ranked(grid):
    df = grid[0].table()
    failed = df[df["status"] == "failed"]
    assert len(failed) == 2 and failed["error"].str.contains("DataError: likelihood 'bernoulli' needs binary").all()
    assert failed["rank"].isna().all()
    ok = df[df["status"] == "ok"].sort_values("rank")
    assert list(ok["rank"]) == [1, 2]
    # Paired differences: the runner-up's per-datapoint gap to the best, recomputed from the cached arrays.
    lp = {c["label"]: c["arrays"]["log_px"] for c in grid[0].cells if c["status"] == "ok"}
    best, second = ok["cell"].iloc[0], ok["cell"].iloc[1]
    d = lp[second] - lp[best]
    assert ok["delta_per_point"].iloc[1] == pytest.approx(d.mean())
    assert ok["delta_se"].iloc[1] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    assert ok["dse"].iloc[1] == pytest.approx(np.sqrt(len(d)) * d.std(), rel=1e-6)  # ArviZ: population sd
    assert ok["elpd_diff"].iloc[1] == pytest.approx(-d.sum())
    assert ok["estimator"].eq("IWAE_64").all() and ok["split"].eq("test").all()
    assert any("failed" in line for line in grid[0].verdict())


def test_resume_reruns_nothing_finished(digits, grid, monkeypatch):
    comp, out = grid
    calls = []
    real = compare_cells.run_cell
    monkeypatch.setattr("ppvae.compare.grid.run_cell", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    # An interrupted grid: one cell's result.json never got written.
    key = compare_cells.cell_key(Cell("mixture", "categorical"), TINY, compare_cells.data_fingerprint(digits))
    (out / "cells" / key / "result.json").unlink()
    again = compare(digits, priors=["normal", "mixture"], likelihoods=["categorical", "bernoulli"],
                    settings=TINY, out=out, progress=None)  # fmt: skip
    assert calls == [Cell("mixture", "categorical")]
    pd.testing.assert_frame_equal(again.table().drop(columns="seconds"), comp.table().drop(columns="seconds"))
    calls.clear()
    compare(digits, priors=["normal", "mixture"], likelihoods=["categorical", "bernoulli"], settings=TINY, out=out,
            progress=None, retry_failed=True)  # fmt: skip
    assert sorted(c.prior for c in calls) == ["mixture", "normal"]  # the two failed cells, nothing else


def test_progress_is_logged_not_printed_unless_a_printer_is_given(digits, grid, capsys, caplog):
    import logging

    kwargs = dict(priors=["normal", "mixture"], likelihoods=["categorical", "bernoulli"], settings=TINY, out=grid[1])
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="ppvae.compare"):
        compare(digits, **kwargs)
    assert capsys.readouterr().out == ""
    assert [r.getMessage().partition(": ")[0] for r in caplog.records if r.name == "ppvae.compare"] == ["cached"] * 4
    said = []
    compare(digits, progress=said.append, **kwargs)
    assert len(said) == 4 and all(line.startswith("cached: ") for line in said)


def test_groups_are_never_ranked_against_each_other(digits, grid, tmp_path):
    """A Bernoulli cell on binarized digits and the grey-level cells: each group has its own rank 1."""
    binary = ppvae.data.load("digits", binarize="static", seed=0)
    b = compare(binary, likelihoods=["bernoulli"], settings=TINY, out=tmp_path, progress=None)
    both = combine(grid[0], b)
    df = both.table()
    ok = df[df["status"] == "ok"]
    assert ok["group"].nunique() == 2
    for _, g in ok.groupby("group"):
        assert sorted(g["rank"]) == list(range(1, len(g) + 1))
    bern = ok[ok["cell"].str.contains("bernoulli")]
    assert bern["rank"].item() == 1 and bern["delta_per_point"].item() == 0
    assert any("not ranked against each other" in line for line in both.verdict())


def test_report_files(grid, tmp_path):
    comp, _ = grid
    paths = comp.save(tmp_path)
    html = paths["html"].read_text()
    assert not re.search(r"(?:https?:)?//[\w.-]+\.\w", re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html))
    assert html.index("erdict") < html.index("<table") < html.index("<img")
    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns) == list(COLUMNS)
    assert "| cell |" in paths["markdown"].read_text()


def test_users_own_fitted_pair_is_scored_alongside(digits, tmp_path):
    vae = ppvae.VAE(digits.data_shape, 2, likelihood={"name": "categorical", "kwargs": {"levels": 17}},
                    encoder={"name": "mlp", "kwargs": {"hidden": [16]}},
                    decoder={"name": "mlp", "kwargs": {"hidden": [16]}})  # fmt: skip

    class Pair:  # a user's own pair: model/guide methods, not a ppvae.VAE
        def model(self, x):
            return vae.model(x)

        def guide(self, x):
            return vae.guide(x)

    models = {"mine": Pair(), "functions": (vae.model, vae.guide)}
    comp = compare(digits, priors=[], models=models, settings=TINY, out=tmp_path, progress=None)
    df = comp.table()
    assert set(df["cell"]) == {"mine", "functions"} and df["status"].eq("ok").all() and np.isfinite(df["log_px"]).all()
    # The same pair, scored twice with the same seed: the same numbers; ranked together (a probability mass).
    assert df["log_px"].iloc[0] == pytest.approx(df["log_px"].iloc[1]) and sorted(df["rank"]) == [1, 2]


def test_a_grid_leaves_the_callers_rng_state(digits, tmp_path):
    """Cells seed their training and scores on copies of the global RNGs: the caller's state is as it was."""
    import random

    torch.manual_seed(11)
    np.random.seed(11)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    comp = compare(digits, likelihoods=["categorical"], settings=TINY, out=tmp_path, progress=None)
    assert comp.table()["status"].item() == "ok"
    assert torch.equal(before[0], torch.get_rng_state())
    np.testing.assert_array_equal(before[1], np.random.get_state()[1])
    assert before[2] == random.getstate()


def test_bad_arguments(digits):
    with pytest.raises(ppvae.ConfigError, match="jobs"):
        compare(digits, jobs=0)
    with pytest.raises(ppvae.ConfigError, match="repeats a cell"):
        compare(digits, priors=["normal", "normal"])


def test_continuous_likelihood_ranks_with_masses_and_jobs_change_nothing(digits, tmp_path):
    """A Normal on 17 grey levels is scored by its bins' probabilities: same group as the Categorical, in bits/dim.
    Two worker processes, each taking a second cell after its first, give the same numbers as one process (each
    cell seeds its own RNG)."""
    kwargs = dict(likelihoods=["categorical", "normal"], guides=["normal", "fullrank"], settings=TINY, progress=None)
    serial = compare(digits, out=tmp_path / "serial", **kwargs).table()
    parallel = compare(digits, out=tmp_path / "parallel", jobs=2, **kwargs).table()
    assert serial["group"].nunique() == 1 and serial["bits_per_dim"].notna().all()
    assert set(serial["scored_as"]) == {"as trained", "cdf"}
    assert (serial["log_px"] < 0).all()  # probabilities of the data, not densities
    cols = ["cell", "rank", "elbo", "log_px", "khat_median", "active_units"]
    pd.testing.assert_frame_equal(serial[cols], parallel[cols])


class _KillsItsWorker(torch.nn.Module):
    """A prior (a module, as a user may give one) whose unpickling ends the process: the worker dies as in an
    out-of-memory kill."""

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (os._exit, (3,))


def test_a_dead_worker_fails_its_cell_only(digits, tmp_path):
    # Workers take cell after cell; the one that dies is replaced, and the cells queued after it run.
    priors = ["normal", _KillsItsWorker(), "mixture", "vamp"]
    comp = compare(digits, priors=priors, settings=TINY, out=tmp_path, jobs=2, progress=None)
    df = comp.table().set_index("prior")
    assert df["status"].to_dict() == {"normal": "ok", "_KillsItsWorker": "failed", "mixture": "ok", "vamp": "ok"}
    assert df.loc["_KillsItsWorker", "error"].startswith("worker process died")


def test_labels_stay_unique_and_ranks_follow_the_numbers(digits, grid, tmp_path):
    """A fitted model named like a grid cell gets its own label; the ranking follows each row's own scores."""
    untrained = compare_cells.build_vae(Cell("normal", "categorical"), TINY, digits)
    comp = compare(digits, likelihoods=["categorical"], models={"normal · categorical · normal": untrained},
                   settings=TINY, out=tmp_path, progress=None)  # fmt: skip
    df = comp.table()
    assert sorted(df["cell"]) == ["normal · categorical · normal", "normal · categorical · normal #2"]
    best = df[df["rank"] == 1]
    assert best["log_px"].item() == df["log_px"].max() and best["cell"].item() == "normal · categorical · normal"


@pytest.mark.parametrize(
    "grid,settings,match",
    [
        (dict(priors=["normal", "vampp"]), {}, r"unknown prior 'vampp'; choose one of: .*\bvamp\b"),
        (dict(likelihoods=["categorical", "categorial"]), {}, "unknown likelihood 'categorial'"),
        (dict(guides=["normal", "ful-rank"]), {}, "unknown guide 'ful-rank'"),
        (dict(priors=[{"name": "mixture", "kwargs": {"componets": 3}}]), {}, r"no option\(s\) \['componets'\]"),
        (dict(priors=[{"name": "mixture", "kwargs": {"components": 0}}]), {}, "components must be a positive"),
        (dict(guides=["normal", {"name": "lowrank", "kwargs": {"rank": -1}}]), {}, "rank must be a positive"),
        (dict(objectives=["elbo", "iwea"]), {}, "unknown objective 'iwea'; choose one of: elbo"),
        (dict(objectives=["iwae"]), {}, "num_particles ≥ 2"),
        (dict(seeds=[0, -1]), {}, "each of seeds must be a whole number"),
        (dict(priors="normal"), {}, "priors must be a list"),
        ({}, dict(epochs=0), "GridSettings.epochs must be a whole number ≥ 1"),
        ({}, dict(lr=float("nan")), "GridSettings.lr"),
        ({}, dict(encoder={"name": "mlp", "kwargs": {"hiden": [8]}}), r"no option\(s\) \['hiden'\]"),
        ({}, dict(decoder="mlpp"), "unknown network 'mlpp-decoder'|unknown network 'mlpp'"),
        ({}, dict(diagnose={"sbc_simulations": 3}), r"diagnose\['sbc_simulations'\] must be a whole number ≥ 10"),
    ],
)
def test_a_bad_grid_is_refused_before_any_cell_trains(digits, tmp_path, monkeypatch, grid, settings, match):
    """Every name, block spec (with its options) and setting is checked first: nothing trains, no directory."""
    monkeypatch.setattr(compare_cells, "fit", lambda *a, **k: pytest.fail("trained a cell of a bad grid"))
    monkeypatch.setattr("ppvae.compare.grid.run_cell", lambda *a, **k: pytest.fail("ran a cell of a bad grid"))
    grid = {"likelihoods": ["categorical"], **grid}
    with pytest.raises(ppvae.ConfigError, match=match):
        compare(digits, **grid, settings=dataclasses.replace(TINY, **settings), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_default_likelihood_is_named_so_it_is_not_a_second_cell(digits):
    with pytest.raises(ppvae.ConfigError, match="repeats a cell"):
        compare(digits, likelihoods=[None, "categorical"])


def test_unknown_diagnose_options_are_refused_before_training(digits, tmp_path):
    bad = dataclasses.replace(TINY, diagnose={"num_gap_point": 3})
    with pytest.raises(ppvae.ConfigError, match="num_gap_point"):
        compare(digits, settings=bad, out=tmp_path)
    assert not (tmp_path / "cells").exists()


def test_a_finished_fit_is_rescored_not_retrained(digits, grid, monkeypatch):
    """Killed between saving model.pt and result.json: the rerun scores the saved model; fit is not called."""
    comp, out = grid
    key = compare_cells.cell_key(Cell("normal", "categorical"), TINY, compare_cells.data_fingerprint(digits))
    (out / "cells" / key / "result.json").unlink()
    monkeypatch.setattr(compare_cells, "fit", lambda *a, **k: pytest.fail("retrained a finished cell"))
    again = compare(digits, priors=["normal", "mixture"], likelihoods=["categorical", "bernoulli"], settings=TINY,
                    out=out, progress=None)  # fmt: skip
    cols = ["cell", "rank", "log_px", "elbo"]
    pd.testing.assert_frame_equal(again.table()[cols], comp.table()[cols])


def test_new_scoring_settings_rescore_the_trained_models(digits, grid, tmp_path, monkeypatch):
    """Only S changed: the cell gets a new directory, its model is the one trained before (bitwise), fit is not
    called, and the scores are IWAE_32. A training setting changed: the cell trains."""
    import shutil

    import torch

    out = tmp_path / "grid"
    shutil.copytree(grid[1], out)
    fingerprint = compare_cells.data_fingerprint(digits)
    cell = Cell("normal", "categorical")
    fewer = dataclasses.replace(TINY, num_samples=32)
    assert compare_cells.train_key(cell, fewer, fingerprint) == compare_cells.train_key(cell, TINY, fingerprint)
    assert compare_cells.cell_key(cell, fewer, fingerprint) != compare_cells.cell_key(cell, TINY, fingerprint)
    monkeypatch.setattr(compare_cells, "fit", lambda *a, **k: pytest.fail("retrained a trained model"))
    said = []
    again = compare(
        digits, priors=["normal"], likelihoods=["categorical"], settings=fewer, out=out, progress=said.append
    )
    assert said[0].startswith("rescored: normal · categorical · normal")
    assert again.table()["estimator"].item() == "IWAE_32" and again.table()["status"].item() == "ok"
    old_dir = out / "cells" / compare_cells.cell_key(cell, TINY, fingerprint)
    new_dir = out / "cells" / compare_cells.cell_key(cell, fewer, fingerprint)
    before, after = ppvae.load(old_dir / "model.pt").state_dict(), ppvae.load(new_dir / "model.pt").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    longer = dataclasses.replace(TINY, epochs=3)
    assert compare_cells.train_key(cell, longer, fingerprint) != compare_cells.train_key(cell, TINY, fingerprint)
    with pytest.raises(BaseException, match="retrained a trained model"):
        compare(digits, priors=["normal"], likelihoods=["categorical"], settings=longer, out=out, progress=None)


def test_a_failed_model_copy_trains_the_cell_instead(tmp_path, monkeypatch):
    """A full disk while taking another cell's model: no temporary file is left, and adopt_trained says None."""
    import json

    donor, cell = tmp_path / "cells" / "a", tmp_path / "cells" / "b"
    donor.mkdir(parents=True)
    (donor / "model.pt").write_bytes(b"weights")
    (donor / "config.json").write_text(json.dumps({"train_key": "k"}))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    monkeypatch.setattr(compare_cells.shutil, "copyfile", full)
    assert compare_cells.adopt_trained(cell, "k") is None
    assert list(cell.iterdir()) == []
    monkeypatch.undo()
    assert compare_cells.adopt_trained(cell, "k") == donor and (cell / "model.pt").read_bytes() == b"weights"
    assert compare_cells.adopt_trained(tmp_path / "cells" / "c", "other key") is None


def test_a_second_grid_on_the_same_directory_is_refused(digits, tmp_path):
    """While one grid holds out/.lock, another compare on that directory stops with a one-line error naming the
    holder; the lock goes with its holder."""
    import subprocess
    import sys

    from ppvae._fs import locked_dir
    from ppvae.errors import ConfigError

    code = (
        "import sys, time, pathlib; from ppvae._fs import locked_dir\n"
        "with locked_dir(pathlib.Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"is in use by another compare \(pid {holder.pid} on "):
            compare(digits, likelihoods=["categorical"], settings=TINY, out=tmp_path, progress=None)
    finally:
        holder.kill()
        holder.wait()
    with locked_dir(tmp_path):  # released with the killed process
        pass


def test_every_grid_setting_is_either_training_or_scoring():
    fields = {f.name for f in dataclasses.fields(GridSettings)}
    training, scoring = set(compare_cells.TRAINING_SETTINGS), set(compare_cells.SCORING_SETTINGS)
    assert training | scoring == fields and not training & scoring


def test_rows_with_zero_probability_rank_last_and_nan_rows_are_not_ranked():
    rng = np.random.default_rng(0)
    base = rng.normal(-100, 5, size=50)
    arrays = {"good": base + 1, "worse": base, "zero": base + 5, "nan": base + 3}
    arrays["zero"][3] = -np.inf  # best on average, but a test datapoint has probability 0
    arrays["nan"][:10] = np.nan  # 20% NaN rows
    cells = [
        {"label": k, "status": "ok", "group": "g", "arrays": {"log_px": v},
         "diagnosis": {"evaluation": {}, "psis": {"khat_median": 0.1, "khat_p90": 0.2, "share_above_threshold": 0.0,
                                                  "ess_per_sample_median": 0.5}}}
        for k, v in arrays.items()
    ]  # fmt: skip
    df = build_table(cells, TINY).set_index("cell")
    assert df.loc["good", "rank"] == 1 and df.loc["worse", "rank"] == 2 and df.loc["zero", "rank"] == 3
    assert np.isnan(df.loc["nan", "rank"]) and "not ranked" in df.loc["nan", "warnings"]
    assert "zero probability" in df.loc["zero", "warnings"] and df.loc["good", "num_compared"] == 50
    assert df.loc["worse", "delta_per_point"] == pytest.approx(-1.0)


def test_only_the_builtin_vae_is_scored_through_a_view_by_levels(digits, tmp_path):
    """The pair adapter decides: a ppvae.VAE's Normal is scored by its bins (a mass, with latent means and images);
    a subclass with its own model may not read x through its likelihood, so it is scored as it is (a density)."""

    class OwnModel(ppvae.VAE):
        def model(self, x=None, batch_size=None):
            return super().model(x, batch_size)

    nets = dict(encoder={"name": "mlp", "kwargs": {"hidden": [8]}}, decoder={"name": "mlp", "kwargs": {"hidden": [8]}})
    builtin = compare_cells.score(ppvae.VAE(digits.data_shape, 2, likelihood="normal", **nets), digits, TINY, seed=0,
                                  directory=tmp_path)  # fmt: skip
    assert builtin["scored_as"] == "cdf" and "probability mass" in builtin["group"]
    assert {"z_mean", "reconstructions", "samples"} <= set(np.load(tmp_path / "arrays.npz").files)
    own = compare_cells.score(OwnModel(digits.data_shape, 2, likelihood="normal", **nets), digits, TINY, seed=0,
                              directory=tmp_path)  # fmt: skip
    assert own["scored_as"] is None and "density" in own["group"]
    assert "z_mean" not in np.load(tmp_path / "arrays.npz").files


def test_a_users_bernoulli_pair_ranks_with_the_builtin_bernoulli_cells(tmp_path):
    """The group comes from the observed site's support: a hand-written Bernoulli pair on the same binarized pixels
    is a probability of the same data, ranked with the built-in Bernoulli VAE, not put apart as a density."""
    import pyro
    import pyro.distributions as dist
    from torch import nn

    binary = ppvae.data.load("digits", binarize="static", seed=0)

    class TutorialPair(nn.Module):  # written as Pyro's VAE tutorial writes it: sites "latent" and "obs"
        def __init__(self):
            super().__init__()
            self.dec, self.enc = nn.Linear(2, 64), nn.Linear(64, 4)

        def model(self, x):
            pyro.module("dec", self.dec)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
                logits = self.dec(z)
                pyro.sample("obs", dist.Bernoulli(logits=logits).to_event(1), obs=x.reshape(-1, 64))

        def guide(self, x):
            pyro.module("enc", self.enc)
            with pyro.plate("data", x.shape[0]):
                h = self.enc(x.reshape(-1, 64))
                pyro.sample("latent", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))

    mine = TutorialPair()
    ppvae.fit(mine, binary.train, epochs=2, progress=False, seed=0)
    settings = dataclasses.replace(TINY, diagnose={"gaps": False, "reference": False, "sbc": False})
    comp = compare(binary, likelihoods=["bernoulli"], models={"mine": mine}, settings=settings, out=tmp_path,
                   progress=None)  # fmt: skip
    df = comp.table()
    assert df["status"].eq("ok").all() and df["group"].nunique() == 1
    assert "probability of binary pixels" in df["group"].iloc[0] and sorted(df["rank"]) == [1, 2]


def test_tuple_splits_give_a_conditional_pair_its_inputs_on_the_same_rows(tmp_path):
    """A split (x, labels): the grid's cells model x, a conditional user pair gets both, on the same test rows; a
    group given by name replaces the one read from the observed sites."""
    import pyro
    import pyro.distributions as dist
    from torch import nn

    binary = ppvae.data.load("digits", binarize="static", seed=0)
    splits = dataclasses.replace(
        binary,
        train=(binary.train, binary.train_labels),
        val=(binary.val, binary.val_labels),
        test=(binary.test, binary.test_labels),
    )
    seen = []

    class Conditional(nn.Module):  # p(x | z, y): the label is an input, not an observation
        def __init__(self):
            super().__init__()
            self.dec, self.emb, self.enc = nn.Linear(2, 64), nn.Embedding(10, 64), nn.Linear(64, 4)

        def model(self, x, y):
            seen.append(y)
            pyro.module("cond", self)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
                logits = self.dec(z) + self.emb(y)
                pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x.reshape(-1, 64))

        def guide(self, x, y):
            pyro.module("cond", self)
            with pyro.plate("data", x.shape[0]):
                h = self.enc(x.reshape(-1, 64))
                pyro.sample("z", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))

    mine = Conditional()
    settings = dataclasses.replace(TINY, diagnose={"gaps": False, "reference": False, "sbc": False})
    comp = compare(splits, likelihoods=["bernoulli"], models={"mine": mine, "mine again": mine},
                   groups={"mine again": "my own group"}, settings=settings, out=tmp_path, progress=None)  # fmt: skip
    df = comp.table().set_index("cell")
    assert df["status"].eq("ok").all()
    rows = compare_cells.test_rows(len(binary.test), settings.max_test_points)
    assert any(torch.equal(y, binary.test_labels[torch.as_tensor(rows)]) for y in seen)  # the labels of those rows
    (cell,) = [c for c in df.index if not c.startswith("mine")]
    assert df.loc["mine", "group"] == df.loc[cell, "group"]  # a probability of the same binary pixels
    assert df.loc["mine again", "group"] == "my own group" and df.loc["mine again", "rank"] == 1
    with pytest.raises(ppvae.ConfigError, match="not among the fitted models"):
        compare(splits, models={"mine": mine}, groups={"other": "g"}, settings=settings)
    bad = dataclasses.replace(splits, test=(binary.test, binary.test_labels[:5]))
    with pytest.raises(ppvae.ConfigError, match="different numbers of rows"):
        compare(bad, models={"mine": mine}, settings=settings)


def test_a_worker_killed_between_cells_is_replaced(digits, tmp_path, monkeypatch):
    # A worker that dies while idle (the OOM killer picks large processes, and a reused worker keeps its memory)
    # must not take the grid down, nor fail the next cell: that cell goes to a fresh process, whether the dead pool
    # refuses it at submit or (its death not yet noticed) takes it and breaks.
    from ppvae.compare import grid as grid_module

    pools, killed = [], []
    make = grid_module._worker_pool
    monkeypatch.setattr(grid_module, "_worker_pool", lambda *a: pools.append(make(*a)) or pools[-1])

    def kill_idle_workers(line):
        if killed:
            return
        for pool in [p for p in pools if not p._pending_work_items]:  # every idle one, so the next cell meets one
            for pid, proc in pool._processes.items():
                os.kill(pid, 9)
                proc.join()
            killed.append(pool)

    comp = compare(digits, priors=["normal", "mixture", "vamp"], settings=TINY, out=tmp_path, jobs=2,
                   progress=kill_idle_workers)  # fmt: skip
    assert list(comp.table()["status"]) == ["ok", "ok", "ok"] and killed
    assert len(pools) == 3  # two first workers, and the fresh one that took the third cell
