"""save/load: round trips, identical ELBO, and refusal of foreign, truncated and malicious files."""

import os
import pickle

import pyro
import pytest
import torch

import ppvae
from ppvae import io
from ppvae.errors import CheckpointError


def _elbo(vae, x, seed=0):
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        return pyro.infer.Trace_ELBO(num_particles=10, vectorize_particles=True).loss(vae.model, vae.guide, x)


@pytest.mark.parametrize(
    "prior,likelihood,guide",
    [
        ("normal", "bernoulli", "normal"),
        ("vamp", "categorical", "iaf"),
        ("mixture", "normal", "lowrank"),
        ("flow", "beta", "fullrank"),
    ],
)
def test_save_load_round_trip_gives_identical_elbo(tmp_path, prior, likelihood, guide):
    vae = ppvae.VAE((1, 4, 4), 3, prior=prior, likelihood=likelihood, guide=guide, encoder="mlp", decoder="mlp")
    x = {
        "bernoulli": (torch.rand(6, 1, 4, 4) > 0.5).float(),
        "categorical": torch.randint(0, 256, (6, 1, 4, 4)) / 255.0,
        "normal": torch.rand(6, 1, 4, 4),
        "beta": torch.rand(6, 1, 4, 4) * 0.9 + 0.05,
    }[likelihood]
    ppvae.fit(vae, x, epochs=1, batch_size=3, progress=False)
    path = ppvae.save(vae, tmp_path / "m.pt", meta={"note": "hi"})
    loaded = ppvae.load(path)
    assert type(loaded) is ppvae.VAE
    assert loaded.config() == vae.config()
    assert _elbo(loaded, x) == _elbo(vae, x)
    assert io.read(path)["meta"] == {"note": "hi"}
    torch.load(path, weights_only=True)  # loadable without unpickling code


def test_custom_module_needs_a_model_to_load_into(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fa", "models/factor_analysis.py")
    fa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa)
    model = fa.build((5,), 2)
    ppvae.save(model, tmp_path / "fa.pt")
    with pytest.raises(CheckpointError, match="model=..."):
        ppvae.load(tmp_path / "fa.pt")
    other = fa.build((5,), 2)
    ppvae.load(tmp_path / "fa.pt", model=other)
    assert torch.equal(other.W, model.W)
    with pytest.raises(CheckpointError, match="do not fit"):
        ppvae.load(tmp_path / "fa.pt", model=fa.build((6,), 2))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"format": "ppvae", "version": 1, "kind": "vae", "payload": evil}, path)
    with pytest.raises(CheckpointError, match="refused"):
        ppvae.load(path)
    assert not marker.exists()
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(evil, f)
    with pytest.raises(CheckpointError):
        ppvae.load(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        ppvae.load(tmp_path / "nope.pt")
    vae = ppvae.VAE((4,), 2, likelihood="normal")
    path = ppvae.save(vae, tmp_path / "m.pt")
    ppvae.save(vae, path)  # second save keeps the first as m.pt.prev
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.*m\.pt\.prev"):
        ppvae.load(path)
    assert isinstance(ppvae.load(tmp_path / "m.pt.prev"), ppvae.VAE)
    (tmp_path / "f.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    with pytest.raises(CheckpointError, match="cannot read"):
        ppvae.load(tmp_path / "f.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ppvae"):
        ppvae.load(tmp_path / "other.pt")


def test_unwritable_checkpoint_dir_is_detected_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoints"):
        ppvae.fit(
            ppvae.VAE((4,), 2, likelihood="normal"),
            torch.randn(8, 4),
            epochs=1,
            batch_size=4,
            checkpoint_dir=blocker / "sub",
            progress=False,
        )


def test_atomic_write_leaves_no_temp_files(tmp_path):
    ppvae.save(ppvae.VAE((4,), 2, likelihood="normal"), tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
