"""The ppvae command end to end, and its one-line errors (exit 2, no traceback)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ppvae import io
from ppvae.cli import main, parse_block


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


def test_console_script_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ppvae.cli", "train", "--prior", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
