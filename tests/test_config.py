"""One source of defaults: FitConfig for fit, the ppvae train/compare flags and a grid's cells; RunMeta for what a
run directory's model.pt says about its run, old files included."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

import ppvae
from ppvae import io
from ppvae.cli import main
from ppvae.cli.app import build_parser
from ppvae.cli.runs import load_run, split_data
from ppvae.compare.cells import Cell, GridSettings, run_meta
from ppvae.data import LinearGaussian
from ppvae.errors import ConfigError
from ppvae.infer.config import CONSTRAINTS, FitConfig
from ppvae.run_meta import RunMeta

# --- FitConfig: the defaults exist once --------------------------------------------------------------------------


def test_fits_signature_defaults_are_fitconfigs():
    params = inspect.signature(ppvae.fit).parameters
    for name, value in FitConfig().fit_kwargs().items():
        assert name in params, f"FitConfig.{name} is not an argument of fit"
        assert params[name].default == value, f"fit's default {name}={params[name].default!r}, FitConfig's {value!r}"
    assert params["config"].default is None


def test_the_cli_preset_differs_from_fit_in_epochs_only():
    library, cli = FitConfig().fit_kwargs(), FitConfig.cli().fit_kwargs()
    assert {k for k in library if library[k] != cli[k]} == {"epochs"}
    assert (library["epochs"], cli["epochs"]) == (10, 20)  # the two budgets each has always had


def test_train_flags_default_to_the_cli_preset():
    args = build_parser().parse_args(["train"])
    for name, value in FitConfig.cli().fit_kwargs().items():
        if name != "vectorize_particles":  # not a flag: fit decides by the pair
            assert getattr(args, name) == value, f"--{name.replace('_', '-')} defaults to {getattr(args, name)!r}"


def test_compare_flags_and_grid_cells_default_to_the_cli_preset():
    args = build_parser().parse_args(["compare"])
    cli = FitConfig.cli()
    for name in ("epochs", "batch_size", "lr", "num_particles", "patience"):
        assert getattr(args, name) == getattr(GridSettings(), name) == getattr(cli, name), name
    assert args.objectives == [Cell().objective] == [cli.objective]
    config = GridSettings().fit_config(Cell(objective="iwae", seed=3))
    expected = dataclasses.replace(cli, objective="iwae", seed=3, device="cpu")
    assert config == expected  # every other fit setting of a cell is the preset's


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--lr", "0"], "argument --lr: lr must be a number > 0, got 0.0"),
        (["train", "--lr", "nan"], "argument --lr: lr must be a number > 0, got nan"),
        (["train", "--beta", "-1"], "argument --beta: beta must be a number ≥ 0, got -1.0"),
        (["train", "--kl-warmup", "-0.5"], "argument --kl-warmup: kl_warmup must be a number ≥ 0, got -0.5"),
        (["train", "--clip-norm", "0"], "argument --clip-norm: clip_norm must be a number > 0, got 0.0"),
        (["train", "--lr", "fast"], "argument --lr: 'fast' is not a number > 0"),
        (["compare", "--lr=-1e-3"], "argument --lr: lr must be a number > 0, got -0.001"),
        (["demo", "--epochs", "0"], "argument --epochs: epochs must be a whole number ≥ 1, got 0"),
    ],
)
def test_a_bad_training_flag_is_refused_at_parse_time_in_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name,value",
    [("epochs", 0), ("batch_size", 2.5), ("lr", 0.0), ("lr", float("inf")), ("num_particles", True), ("beta", -1.0),
     ("kl_warmup", -1.0), ("patience", 0), ("clip_norm", 0.0), ("on_nonfinite", "ignore")],
)  # fmt: skip
def test_fitconfig_fit_and_the_flag_refuse_alike(name, value):
    """The same value is refused by FitConfig and fit, with the same sentence (the flag's is tested above)."""
    with pytest.raises(ConfigError) as by_config:
        FitConfig(**{name: value})
    with pytest.raises(ConfigError) as by_fit:
        ppvae.fit(ppvae.VAE((3,), 2, likelihood="normal"), torch.zeros(4, 3), progress=False, **{name: value})
    assert str(by_config.value) == str(by_fit.value)
    assert str(by_config.value).startswith(f"{name} must be ")
    assert set(CONSTRAINTS) <= set(FitConfig.names())


def _pair_and_data():
    x, _ = LinearGaussian(data_dim=4, latent_dim=2, noise=0.5, seed=1).sample(64, seed=2)
    vae = ppvae.VAE((4,), 2, likelihood="normal", encoder={"name": "mlp", "kwargs": {"hidden": [8]}},
                    decoder={"name": "mlp", "kwargs": {"hidden": [8]}})  # fmt: skip
    return vae, x


def test_fit_with_a_config_trains_as_with_its_arguments():
    config = FitConfig(epochs=2, batch_size=16, lr=1e-2, beta=0.5, seed=4, device="cpu")
    vae, x = _pair_and_data()
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    by_args = ppvae.fit(vae, x, progress=False, **config.fit_kwargs())
    vae.load_state_dict(state)
    by_config = ppvae.fit(vae, x, progress=False, config=config)
    assert [h["train_loss"] for h in by_args.history] == [h["train_loss"] for h in by_config.history]
    assert len(by_config.history) == 2 and by_config.history[0]["beta"] == 0.5


def test_fit_refuses_a_config_that_an_argument_contradicts():
    vae, x = _pair_and_data()
    config = FitConfig(epochs=1, batch_size=32, device="cpu")
    # An argument equal to the config's value agrees with it; one at fit's default leaves the config's.
    assert len(ppvae.fit(vae, x, progress=False, config=config, batch_size=32, epochs=10).history) == 1
    with pytest.raises(ConfigError, match=r"fit got batch_size=16 and a config with batch_size=32; set batch_size"):
        ppvae.fit(vae, x, progress=False, config=config, batch_size=16)
    with pytest.raises(ConfigError, match="config must be a ppvae.FitConfig, got dict"):
        ppvae.fit(vae, x, progress=False, config={"epochs": 1})


def test_fitconfig_converts_like_fit_and_is_frozen():
    config = FitConfig(lr=1, epochs=torch.tensor(3).item())
    assert isinstance(config.lr, float) and config.epochs == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.1  # type: ignore[misc]
    assert ppvae.FitConfig is FitConfig


# --- RunMeta: what a run directory says about its run ------------------------------------------------------------

# model.pt's meta as ppvae train wrote it before RunMeta (keys and order), and a file from before levels,
# preprocessing and the seed were recorded.
TRAIN_META = {
    "dataset": "digits",
    "data_shape": [1, 8, 8],
    "levels": 17,
    "binarize": None,
    "preprocessing": {"scale": "x / 16", "seed": 0},
    "latent_dim": 4,
    "seed": 0,
    "model_file": "/abs/models/factor_analysis.py",
    "history": [{"epoch": 1, "train_loss": 80.0, "val_elbo": -81.0}],
    "summary": {"test_elbo": -81.5},
}
OLD_META = {"dataset": "digits", "data_shape": [1, 8, 8], "latent_dim": 4, "history": [], "written_by": "ppvae 0.1"}


def test_runmeta_round_trips_the_stored_dict_key_for_key():
    meta = RunMeta.from_dict(TRAIN_META)
    assert meta.model_file == TRAIN_META["model_file"] and meta.levels == 17 and meta.extra == {}
    assert json.dumps(meta.to_dict()) == json.dumps(TRAIN_META)  # same keys, same order: the same bytes on disk
    assert RunMeta.from_dict(meta.to_dict()) == meta


def test_an_old_format_meta_reads_with_none_and_keeps_unknown_keys():
    meta = RunMeta.from_dict(OLD_META)
    assert (meta.dataset, meta.data_shape, meta.latent_dim) == ("digits", [1, 8, 8], 4)
    assert meta.levels is meta.binarize is meta.preprocessing is meta.seed is meta.summary is None
    assert meta.extra == {"written_by": "ppvae 0.1"}
    assert meta.to_dict()["written_by"] == "ppvae 0.1"  # written back, not lost
    assert RunMeta.from_dict(None) == RunMeta.from_dict({}) == RunMeta()
    with pytest.raises(ConfigError, match="must be a JSON object"):
        RunMeta.from_dict([1, 2])
    with pytest.raises(ConfigError, match="repeats the fields"):
        RunMeta(extra={"dataset": "x"})


def test_an_old_run_directory_still_loads_and_scores(tmp_path, capsys):
    """A model.pt whose meta lacks levels, preprocessing and the split seed: its split is the seed-0 one."""
    splits = ppvae.data.load("digits", seed=0)
    vae = ppvae.VAE(splits.data_shape, 2, likelihood={"name": "categorical", "kwargs": {"levels": 17}},
                    encoder={"name": "mlp", "kwargs": {"hidden": [8]}},
                    decoder={"name": "mlp", "kwargs": {"hidden": [8]}})  # fmt: skip
    io.save(vae, tmp_path / "model.pt", meta=OLD_META)
    model, meta = load_run(str(tmp_path))
    assert meta == OLD_META  # handed back as stored
    x = split_data(meta, "test", tmp_path / "model.pt", seed=0)
    assert torch.equal(x, splits.test)
    assert torch.equal(split_data(RunMeta.from_dict(meta), "test", tmp_path, seed=0), x)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dataset     digits" in out and "trained" not in out  # an empty history says nothing


def test_a_model_file_run_without_its_shape_is_refused_in_one_sentence(tmp_path):
    io.save(torch.nn.Linear(2, 2), tmp_path / "model.pt", meta={"model_file": "/x/model.py"})
    with pytest.raises(ConfigError, match="records no data_shape or latent_dim"):
        load_run(str(tmp_path))


def test_a_grid_cells_meta_is_the_format_it_was():
    splits = ppvae.data.load("digits", seed=0)
    cell, history = Cell("normal", "categorical"), [{"epoch": 1, "train_loss": 1.0}]
    old = {
        "dataset": splits.name,
        "data_shape": list(splits.data_shape),
        "levels": splits.levels,
        "binarize": splits.binarize,
        "preprocessing": splits.preprocessing,
        "latent_dim": GridSettings().latent_dim,
        "seed": splits.preprocessing.get("seed", 0),
        "cell": dataclasses.asdict(cell),
        "history": history,
    }
    assert json.dumps(run_meta(splits, GridSettings(), cell, history)) == json.dumps(old)


def test_ppvae_train_writes_the_meta_it_wrote_before(tmp_path):
    out = tmp_path / "run"
    tiny = ["--encoder", "mlp:hidden=[8]", "--decoder", "mlp:hidden=[8]", "--latent-dim", "2", "--epochs", "1"]
    assert main(["train", *tiny, "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    meta = io.read(out / "model.pt")["meta"]
    assert list(meta) == ["dataset", "data_shape", "levels", "binarize", "preprocessing", "latent_dim", "seed",
                          "history", "summary"]  # fmt: skip
    assert (meta["dataset"], meta["levels"], meta["latent_dim"], meta["seed"]) == ("digits", 17, 2, 3)
    assert len(meta["history"]) == 1 and meta["summary"]["epochs"] == 1
