"""The ppvae command end to end, and its one-line errors (exit 2, no traceback)."""

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from ppvae import io
from ppvae.blocks.specs import parse_block
from ppvae.cli import main
from ppvae.diagnostics.arviz_io import load_netcdf


def test_parse_block():
    assert parse_block("normal") == "normal"
    assert parse_block("normal:scale=learned,x=2") == {"name": "normal", "kwargs": {"scale": "learned", "x": 2}}
    assert parse_block("mlp:hidden=[32,16]") == {"name": "mlp", "kwargs": {"hidden": [32, 16]}}


def test_train_info_sample_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--dataset",
            "digits",
            "--epochs",
            "2",
            "--latent-dim",
            "4",
            "--prior",
            "mixture",
            "--guide",
            "lowrank",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "test ELBO" in printed and "bits/dim" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["test_elbo"] < 0
    saved = io.read(out / "model.pt")
    assert saved["config"]["likelihood"] == {"name": "categorical", "kwargs": {"levels": 17}}
    assert len(saved["meta"]["history"]) == 2
    assert main(["info", str(out)]) == 0
    assert "categorical" in capsys.readouterr().out
    assert main(["sample", str(out), "-n", "16"]) == 0
    png = (out / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_with_model_file_and_resume(tmp_path, capsys):
    out = tmp_path / "fa"
    args = [
        "train",
        "--model",
        "models/factor_analysis.py",
        "--dataset",
        "linear-gaussian",
        "--latent-dim",
        "2",
        "--out",
        str(out),
        "--no-progress",
        "--lr",
        "0.01",
    ]
    assert main(args + ["--epochs", "2"]) == 0
    assert main(args + ["--epochs", "3", "--resume"]) == 0
    assert len(io.read(out / "model.pt")["meta"]["history"]) == 3
    assert main(["sample", str(out), "-n", "5"]) == 0
    assert np.load(out / "samples.npy").shape == (5, 8)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--prior", "nope"], "unknown prior 'nope'"),
        (["train", "--likelihood", "bernoulli"], "binar"),
        (["train", "--dataset", "no-such-data"], "no-such-data"),
        (["train", "--model", "models/nope.py"], "does not exist"),
        (["train", "--likelihood", "normal:wrong=1"], "no option"),
        (["train", "--batch-size", "5000"], "batch_size 5000"),
        (["info", "missing-run"], "no such file"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, match):
    argv = argv + (["--out", str(tmp_path / "r"), "--epochs", "1", "--no-progress"] if argv[0] == "train" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert match in err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_foreign_file_to_info(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"garbage")
    assert main(["info", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_info_on_checkpoint_of_functions(tmp_path, capsys):
    """A pair of functions has no module: info counts the Pyro parameters its checkpoint holds (3 + 2 numbers)."""
    import pyro
    import pyro.distributions as dist

    import ppvae

    def model(x):
        loc = pyro.param("loc", torch.zeros(3))
        scale = pyro.param("scale", torch.ones(2), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, scale).to_event(1))
            pyro.sample("x", dist.Normal(loc + z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))

    ppvae.fit(model, torch.rand(6, 3), guide=guide, epochs=1, batch_size=3, checkpoint_dir=tmp_path, progress=False)
    assert main(["info", str(tmp_path / "last.pt")]) == 0
    assert "weights     5 numbers in 2 Pyro parameters" in capsys.readouterr().out


def test_console_script_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ppvae.cli", "train", "--prior", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1


# --- evaluate / diagnose / demo diagnostics ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A small VAE trained for one epoch on digits (17-level Categorical: bits/dim apply)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    tiny = ["--encoder", "mlp:hidden=[32]", "--decoder", "mlp:hidden=[32]", "--latent-dim", "2"]
    assert main(["train", "--epochs", "1", *tiny, "--out", str(out), "--no-progress"]) == 0
    return out


def test_evaluate_prints_report_and_writes_json_and_netcdf(tiny_run, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(tiny_run), "--num-samples", "20"]) == 0
    printed = capsys.readouterr().out
    for text in ("test split: N = 180", "ELBO", "log p̂(x) (IWAE_20)", "inference gap", "KL", "bits/dim", "non-finite"):
        assert text in printed
    out = tiny_run / "evaluation"  # the default
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["split"] == "test" and summary["num_datapoints"] == 180 and summary["num_nonfinite"] == 0
    assert summary["dataset"] == "digits" and summary["num_samples"] == 20
    # IWAE ≥ ELBO datapoint by datapoint (log-mean-exp ≥ mean), so the gap is positive; bits/dim from log p̂.
    assert summary["log_px"] > summary["elbo"] and summary["inference_gap"] > 0
    assert summary["bits_per_dim"] == pytest.approx(-summary["log_px"] / (np.log(2) * 64))
    assert summary["elbo"] == pytest.approx(summary["reconstruction"] - summary["kl"])
    stats = load_netcdf(out / "evaluation.nc").sample_stats
    assert stats["elbo"].shape == (180,) and stats.attrs["split"] == "test" and stats.attrs["dataset"] == "digits"
    assert float(stats["log_px"].mean()) == pytest.approx(summary["log_px"])
    assert f"{summary['elbo']:.3f}" in printed


def test_evaluate_other_split_and_out(tiny_run, tmp_path, capsys):
    assert (
        main(["evaluate", str(tiny_run / "model.pt"), "--split", "train", "--num-samples", "5", "--out", str(tmp_path)])
        == 0
    )
    assert "train split: N = 1437" in capsys.readouterr().out
    assert json.loads((tmp_path / "evaluation.json").read_text())["num_datapoints"] == 1437


def test_diagnose_every_part_on_a_subset(tiny_run, tmp_path, capsys):
    argv = ["diagnose", str(tiny_run), "--num-samples", "100", "--max-points", "30", "--out", str(tmp_path)]
    argv += ["--gap-points", "4", "--gap-steps", "5", "--sbc-simulations", "20"]
    argv += ["--reference-points", "1", "--reference-warmup", "5", "--reference-samples", "10"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for text in ("30 evenly spaced rows of 180", "PSIS k̂", "active units", "amortization gap", "SBC", "NUTS", "wrote"):
        assert text in printed
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"diagnosis.json", "diagnosis.nc", "khat.png", "kl_per_dim.png", "sbc.png", "reference.png"}
    record = json.loads((tmp_path / "diagnosis.json").read_text())
    assert record["source"]["split_size"] == 180 and record["evaluation"]["num_datapoints"] == 30
    assert record["skipped"] == {} and {"gaps", "sbc", "reference", "collapse"} <= set(record)
    khat = load_netcdf(tmp_path / "diagnosis.nc").sample_stats["khat"].values  # (datapoint,)
    assert khat.shape == (30,) and np.isfinite(khat).any()


def test_diagnose_default_out_and_disabled_parts(tiny_run, capsys):
    argv = ["diagnose", str(tiny_run), "--num-samples", "10", "--no-gaps", "--no-sbc", "--no-reference"]
    assert main(argv) == 0
    assert "180 datapoints (all)" in capsys.readouterr().out
    record = json.loads((tiny_run / "diagnosis" / "diagnosis.json").read_text())
    assert not {"gaps", "sbc", "reference"} & set(record) and record["source"]["rows"] == "all"


def test_model_file_run_evaluates_and_diagnoses(tmp_path, capsys):
    run = tmp_path / "fa"
    train = ["train", "--model", "models/factor_analysis.py", "--dataset", "linear-gaussian", "--latent-dim", "2"]
    assert main([*train, "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    assert main(["evaluate", str(run), "--num-samples", "10"]) == 0
    printed = capsys.readouterr().out
    assert "n/a" in printed and "reconstruction" not in printed  # a density, and not a ppvae.VAE
    argv = ["diagnose", str(run), "--num-samples", "10", "--sbc-simulations", "10", "--no-reference"]
    argv += ["--gap-points", "3", "--gap-steps", "5"]
    assert main(argv) == 0
    assert "active units" in capsys.readouterr().out
    record = json.loads((run / "diagnosis" / "diagnosis.json").read_text())
    # A user's pair gets every part (sites found from the trace); a latent site named wrong is skipped, saying so.
    assert record["skipped"] == {} and {"collapse", "gaps", "sbc"} <= set(record)
    assert main([*argv, "--latent-site", "nope", "--no-gaps", "--no-collapse"]) == 0
    record = json.loads((run / "diagnosis" / "diagnosis.json").read_text())
    assert "no continuous local latent sample site 'nope'" in record["skipped"]["sbc"]


def test_demo_runs_the_grid_writes_the_report_and_saves_the_best_run(tmp_path, capsys, monkeypatch):
    from ppvae.cli import compare as cli_compare

    cheap = dataclasses.replace(
        cli_compare.DEMO_SETTINGS,
        latent_dim=2,
        encoder={"name": "mlp", "kwargs": {"hidden": [16]}},
        decoder={"name": "mlp", "kwargs": {"hidden": [16]}},
        num_samples=30,
        max_test_points=30,
        diagnose={"gaps": False, "reference": False, "sbc_simulations": 10},
    )
    monkeypatch.setattr(cli_compare, "DEMO_SETTINGS", cheap)
    assert main(["demo", "--epochs", "1", "--jobs", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("verdict:") < printed.index("Best model") < printed.index("bits_per_dim")
    assert printed.count("\ndone: ") == 8  # a line per finished cell: the CLI passes its printer to compare
    table = pd.read_csv(tmp_path / "table.csv")
    assert len(table) == 8 and set(table["status"]) == {"ok"} and sorted(table["rank"]) == list(range(1, 9))
    assert {c.split(" · ")[0] for c in table["cell"]} == {"normal", "mixture"}
    assert "<img" in (tmp_path / "report.html").read_text()
    # The best cell is a run: ppvae diagnose works on it.
    assert main(["diagnose", str(tmp_path), "--num-samples", "10", "--no-gaps", "--no-reference", "--no-sbc",
                 "--out", str(tmp_path / "d")]) == 0  # fmt: skip
    assert (tmp_path / "samples.png").exists()


@pytest.mark.parametrize("command", ["evaluate", "diagnose"])
@pytest.mark.parametrize(
    "case,extra,match",
    [
        ("missing", [], "no such file"),
        ("corrupt", [], "cannot read"),
        ("no-dataset", [], "records no dataset"),
        ("good", ["--num-samples", "1"], "argument --num-samples: num_samples must be a whole number ≥ 2, got 1"),
    ],
)
def test_scoring_user_errors_exit_2_with_one_line(tiny_run, tmp_path, capsys, command, case, extra, match):
    run = {"missing": tmp_path / "nope", "good": tiny_run}.get(case, tmp_path / "model.pt")
    if case == "corrupt":
        run.write_bytes((tiny_run / "model.pt").read_bytes()[:2000])  # truncated
    if case == "no-dataset":
        io.save(io.load(tiny_run / "model.pt"), run)  # saved from Python: no dataset recorded
    capsys.readouterr()
    try:
        status = main([command, str(run), *extra, "--out", str(tmp_path / "out")])
    except SystemExit as exit_:  # a bad flag is a usage error, refused by the parser before anything is read
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"ppvae {command}: error:") and match in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_scoring_out_must_be_a_directory(tiny_run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["evaluate", str(tiny_run), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_same_seed_trains_the_same_weights(tmp_path):
    """--seed covers the initial weights too (they are drawn before fit seeds its own loop)."""
    for name in ("a", "b"):
        args = ["train", "--dataset", "digits", "--epochs", "1", "--latent-dim", "2", "--no-progress", "--out"]
        assert main([*args, str(tmp_path / name)]) == 0
    a, b = (io.read(tmp_path / name / "model.pt")["state_dict"] for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--priors", "normal", "vampp"], re.escape("unknown prior 'vampp'; choose one of: ")),
        (["--guides", "normal", "lowrank:rnk=2"], re.escape("guide 'lowrank' has no option(s) ['rnk']")),
        (["--likelihoods", "categorical:levels=0"], "levels"),
    ],
)
def test_compare_refuses_a_bad_grid_before_training_anything(tmp_path, capsys, monkeypatch, extra, match):
    from ppvae.compare import cells as compare_cells

    monkeypatch.setattr(compare_cells, "fit", lambda *a, **k: pytest.fail("trained a cell of a bad grid"))
    out = tmp_path / "c"
    assert main(["compare", *extra, "--epochs", "1", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ppvae compare: error: ") and "Traceback" not in err
    assert re.search(match, err)
    assert captured.out == "" and not out.exists()  # nothing said about a run, no run directory
