"""``ppvae train --model FILE`` and the commands on its runs, for model files written as Pyro's tutorials write them."""

import json
import re
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppvae import io
from ppvae.cli import main
from ppvae.infer.observed import observed_discrete, observed_sites

NETS = '''
import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, z_dim, hidden, inp):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(inp, hidden), nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def forward(self, x):
        h = torch.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc21(h), torch.exp(self.fc22(h))


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden, out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(z_dim, hidden), nn.Linear(hidden, out)

    def forward(self, z):
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(z))))
'''

# The Pyro VAE tutorial's pair: pyro.module, sites "latent"/"obs", a model that needs x, a sibling import, and a build
# that reads the splits and an option. PLATE is the data plate's name.
TUTORIAL = '''
import math

import pyro
import pyro.distributions as dist
from torch import nn

from nets import Decoder, Encoder

PLATE = {plate!r}


class TutorialVAE(nn.Module):
    def __init__(self, data_dim, z_dim, hidden):
        super().__init__()
        self.encoder, self.decoder = Encoder(z_dim, hidden, data_dim), Decoder(z_dim, hidden, data_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate(PLATE, x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            probs = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(probs).to_event(1), obs=x.reshape(-1, probs.shape[-1]))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate(PLATE, x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


def build(data_shape, latent_dim, splits, hidden=16):
    assert splits.binarize == "static" and len(splits.train) > 0  # the splits arrive
    return TutorialVAE(math.prod(data_shape), latent_dim, hidden)
'''


def _write(folder, plate="data"):
    (folder / "nets.py").write_text(NETS)
    (folder / "tutorial_vae.py").write_text(TUTORIAL.format(plate=plate))
    return folder / "tutorial_vae.py"


def _train(tmp_path, extra=()):
    argv = ["train", "--model", str(_write(tmp_path)), "--dataset", "digits", "--binarize", "static"]
    argv += ["--latent-dim", "2", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run"), *extra]
    return main(argv)


def test_a_tutorial_model_file_with_a_sibling_import_trains_and_scores(tmp_path, capsys):
    path_before = list(sys.path)
    assert _train(tmp_path, ["--model-option", "hidden=8"]) == 0
    assert sys.path == path_before  # the file's folder was importable while it was imported and built, not after
    out = capsys.readouterr().out
    assert "bits/dim (upper bound)" in out  # Bernoulli observations: a probability of the data
    meta = io.read(tmp_path / "run" / "model.pt")["meta"]
    assert meta["model_options"] == {"hidden": 8}
    assert main(["evaluate", str(tmp_path / "run"), "--num-samples", "20", "--out", str(tmp_path / "ev")]) == 0
    record = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert abs(record["elbo"] - summary["test_elbo"]) < 3.0  # the same model rebuilt (hidden=8), not a fresh one
    assert record["bits_per_dim"] is not None  # discrete observations found from the pair's own trace


def test_sample_without_a_generation_path_is_one_line_exit_2(tmp_path, capsys):
    assert _train(tmp_path) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "run"), "-n", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "generation path" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--model-option", "hiden=3"], r"takes no option\(s\) \['hiden'\]"),
        (["--model-option", "=3"], "is not KEY=VALUE"),
    ],
)
def test_bad_model_options_are_refused_in_one_line(tmp_path, capsys, extra, match):
    try:
        status = _train(tmp_path, extra)
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_data_plate_is_recorded_and_used_by_evaluate(tmp_path, capsys):
    _write(tmp_path, plate="batch")
    argv = ["train", "--model", str(tmp_path / "tutorial_vae.py"), "--dataset", "digits", "--binarize", "static"]
    argv += ["--latent-dim", "2", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert main([*argv, "--data-plate", "batch"]) == 0
    assert main(["evaluate", str(tmp_path / "run"), "--num-samples", "10", "--out", str(tmp_path / "ev")]) == 0
    record = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert record["num_datapoints"] > 0 and record["elbo"] < 0


def test_a_density_model_file_prints_no_bits_per_dim(tmp_path, capsys):
    argv = ["train", "--model", "models/factor_analysis.py", "--dataset", "linear-gaussian", "--latent-dim", "2"]
    assert main([*argv, "--epochs", "1", "--no-progress", "--out", str(tmp_path / "fa")]) == 0
    assert "no bits/dim" in capsys.readouterr().out
    summary = json.loads((tmp_path / "fa" / "summary.json").read_text())
    assert "test_elbo" in summary and "test_elbo_bits_per_dim" not in summary


def test_observed_kind_from_the_trace():
    def model(x, kind):
        pyro.factor("aux", torch.tensor(1.0))  # not an observation
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            if kind == "mass":
                pyro.sample("x", dist.Bernoulli(logits=z).mask(True), obs=x)
            elif kind == "density":
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)
            else:
                pyro.sample("x", dist.Bernoulli(logits=z), obs=x)
                pyro.sample("y", dist.Normal(z, 1.0), obs=x)

    def guide(x, kind):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    x = torch.tensor([0.0, 1.0, 1.0])
    assert observed_discrete(model, guide, x, "mass") is True
    assert observed_discrete(model, guide, x, "density") is False
    assert observed_discrete(model, guide, x, "mixed") is None
    assert list(observed_sites(model, guide, x, "mass")) == ["x"]
    state = torch.get_rng_state()
    observed_sites(model, guide, x, "mass")
    assert torch.equal(state, torch.get_rng_state())  # run on copies of the RNGs



@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--model", "models/factor_analysis.py", "--prior", "vamp"], "--prior has no effect with --model"),
        (["train", "--epoch", "3"], "unrecognized arguments: --epoch 3"),  # no abbreviations: a typo is a typo
    ],
)
def test_flags_that_would_be_ignored_are_refused(argv, match, tmp_path, capsys):
    try:
        status = main([*argv, "--out", str(tmp_path / "run"), "--no-progress"])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and match in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_compare_refuses_a_run_on_another_data_plate_in_one_line(tmp_path, capsys):
    _write(tmp_path, plate="batch")
    argv = ["train", "--model", str(tmp_path / "tutorial_vae.py"), "--dataset", "digits", "--binarize", "static"]
    argv += ["--latent-dim", "2", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert main([*argv, "--data-plate", "batch"]) == 0
    capsys.readouterr()
    grid = ["compare", "--dataset", "digits", "--binarize", "static", "--epochs", "1", "--runs", str(tmp_path / "run")]
    assert main([*grid, "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data-plate batch" in err and not (tmp_path / "cmp").exists()
