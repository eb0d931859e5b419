"""Tests of ppvae.data (datasets and idx): built-in datasets, IDX files and downloads, user files, validation."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import pickle
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ppvae import data
from ppvae.data import DataSplits, DynamicBinarized, LinearGaussian, as_tensor, check_finite, load
from ppvae.data import idx as datasets_idx
from ppvae.errors import ConfigError, DataError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the real user cache or a user's PPVAE_DATA settings."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PPVAE_DATA", raising=False)
    monkeypatch.delenv("PPVAE_DATA_URL", raising=False)


def _rows(*parts: torch.Tensor) -> Counter:
    return Counter(tuple(r.tolist()) for p in parts for r in p.reshape(len(p), -1))


# ---------------------------------------------------------------- digits, splitting, binarization


def test_digits_shapes_levels_and_reproducible_disjoint_splits():
    s = load("digits", seed=3)
    assert isinstance(s, DataSplits) and s.name == "digits"
    assert s.data_shape == (1, 8, 8) and s.levels == 17 and s.binarize is None
    assert (len(s.train), len(s.val), len(s.test)) == (1437, 180, 180)
    assert s.train.dtype == torch.float32 and float(s.train.max()) == 1.0 and float(s.train.min()) == 0.0
    assert torch.equal(s.train * 16, torch.round(s.train * 16))  # on the 17-level grid
    assert s.train_labels.dtype == torch.int64 and len(s.test_labels) == 180
    # The three parts partition the dataset exactly (disjoint, nothing lost).
    full = load("digits", split=(1.0, 0.0, 0.0))
    assert full.val is None and full.test is None and len(full.train) == 1797
    assert _rows(s.train, s.val, s.test) == _rows(full.train)
    again, other = load("digits", seed=3), load("digits", seed=4)
    assert torch.equal(again.train, s.train) and torch.equal(again.test_labels, s.test_labels)
    assert not torch.equal(other.train, s.train)
    json.dumps(s.preprocessing)
    assert s.preprocessing["sizes"] == {"train": 1437, "val": 180, "test": 180}


def test_digits_raw_counts_and_flatten():
    s = load("digits", scale=False, flatten=True)
    assert s.levels is None and s.data_shape == (64,) and s.train.shape[1:] == (64,)
    assert float(s.train.max()) == 16.0 and torch.equal(s.train, torch.round(s.train))


def test_static_binarization_is_binary_and_reproducible():
    a, b = load("digits", binarize="static", seed=1), load("digits", binarize="static", seed=1)
    for part in (a.train, a.val, a.test):
        assert set(torch.unique(part).tolist()) <= {0.0, 1.0}
    assert a.levels == 2 and a.binarize == "static" and a.preprocessing["binarize"] == "static"
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    c = load("digits", binarize="static", seed=2)
    assert not torch.equal(a.test, c.test)


def test_dynamic_binarization_draws_fresh_batches():
    s = load("digits", binarize="dynamic")
    assert isinstance(s.train, DynamicBinarized) and len(s.train) == 1437
    assert torch.equal(s.train.grey, load("digits").train)  # grey levels kept, same split
    idx = torch.tensor([0, 5, 7, 100])
    b1, b2 = s.train.get_batch(idx), s.train.get_batch(idx)
    assert b1.shape == (4, 1, 8, 8) and set(torch.unique(b1).tolist()) <= {0.0, 1.0}
    assert not torch.equal(b1, b2)
    assert s.train[3].shape == (1, 8, 8)
    # Static val/test, reproducible with the seed.
    assert set(torch.unique(s.val).tolist()) <= {0.0, 1.0}
    assert torch.equal(s.test, load("digits", binarize="dynamic").test)
    # A dynamic draw averages to the grey levels.
    torch.manual_seed(0)
    mean = torch.stack([s.train.get_batch(idx) for _ in range(2000)]).mean(0)
    assert torch.allclose(mean, s.train.grey[idx], atol=0.05)


def test_binarization_needs_unit_interval():
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        load("digits", scale=False, binarize="static")
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        DynamicBinarized(torch.tensor([[2.0]]))


@pytest.mark.parametrize("split", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (0.0, 0.5, 0.5), (0.5, 0.5), "abc"])
def test_bad_split_is_config_error(split):
    with pytest.raises(ConfigError, match="split"):
        load("digits", split=split)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="binarize"):
        load("digits", binarize="yes")
    with pytest.raises(ConfigError, match="unexpected"):
        load("digits", n=3)


# ---------------------------------------------------------------- IDX files: local, env, download


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx_set(folder: Path, gz: bool, n_train: int = 18, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for role, arr in arrays.items():
        raw = _idx_bytes(arr)
        name = datasets_idx.FILES[role] + (".gz" if gz else "")
        (folder / name).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_from_root(tmp_path, gz):
    arrays = _write_idx_set(tmp_path / "idx", gz)
    s = load("mnist", root=str(tmp_path / "idx"), download=False)
    assert s.data_shape == (1, 28, 28) and s.levels == 256
    assert (len(s.train), len(s.val), len(s.test)) == (16, 2, 5)  # val = 18 · 0.1 / 0.9
    assert torch.allclose(s.test * 255, torch.from_numpy(arrays["test_images"]).float().unsqueeze(1))
    assert s.test_labels.tolist() == arrays["test_labels"].tolist()
    assert _rows(s.train, s.val) == _rows(torch.from_numpy(arrays["train_images"]).float() / 255)
    assert s.preprocessing["source"] == str(tmp_path / "idx")


@pytest.mark.parametrize("sub", [True, False])
def test_idx_from_ppvae_data_env(tmp_path, monkeypatch, sub):
    _write_idx_set(tmp_path / "store" / ("mnist" if sub else ""), gz=True)
    monkeypatch.setenv("PPVAE_DATA", str(tmp_path / "store"))
    s = load("mnist", download=False, split=(0.9, 0.1, 0.0))
    assert len(s.test) == 5 and len(s.train) + len(s.val) == 18


def test_idx_missing_without_download_lists_places(tmp_path):
    with pytest.raises(DataError, match="not found") as err:
        load("mnist", root=str(tmp_path / "nowhere"), download=False)
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and str(tmp_path / "cache" / "ppvae" / "mnist") in msg
    assert "PPVAE_DATA" in msg and "download=True" in msg


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/served; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/data"
    server.shutdown()
    server.server_close()


def _checksums(folder: Path, algo: str = "sha256") -> dict[str, tuple[str, ...]]:
    return {f.name: (f"{algo}:{hashlib.new(algo, f.read_bytes()).hexdigest()}",) for f in folder.glob("*.gz")}


@pytest.mark.parametrize("via_env", [False, True])
def test_download_with_checksums(tmp_path, http_dir, monkeypatch, via_env):
    served, base = http_dir
    arrays = _write_idx_set(served / "data", gz=True)
    monkeypatch.setitem(datasets_idx.CHECKSUMS, "mnist", _checksums(served / "data", "md5" if via_env else "sha256"))
    if via_env:
        monkeypatch.setenv("PPVAE_DATA_URL", base + "/")
    s = load("mnist", url=None if via_env else base)
    cache = tmp_path / "cache" / "ppvae" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f + ".gz" for f in datasets_idx.FILES.values())
    assert s.test_labels.tolist() == arrays["test_labels"].tolist()
    # Next time the cache is used: no server needed.
    for f in (served / "data").iterdir():
        f.unlink()
    assert torch.equal(load("mnist", download=False).test, s.test)


def test_download_checksum_mismatch_leaves_no_file(tmp_path, http_dir, monkeypatch):
    served, base = http_dir
    _write_idx_set(served / "data", gz=True)
    table = _checksums(served / "data")
    table["train-labels-idx1-ubyte.gz"] = ("sha256:" + "0" * 64,)
    monkeypatch.setitem(datasets_idx.CHECKSUMS, "mnist", table)
    with pytest.raises(DataError, match="checksum mismatch for train-labels-idx1-ubyte.gz") as err:
        load("mnist", url=base)
    seen = hashlib.sha256((served / "data" / "train-labels-idx1-ubyte.gz").read_bytes()).hexdigest()
    assert "0" * 64 in str(err.value) and seen in str(err.value)
    cache = tmp_path / "cache" / "ppvae" / "mnist"
    assert not any("labels" in p.name and "train" in p.name for p in cache.iterdir())
    assert not list(cache.glob("*.part"))


def test_download_unreachable_is_data_error(tmp_path, http_dir, monkeypatch):
    _, base = http_dir
    monkeypatch.setitem(
        datasets_idx.CHECKSUMS, "mnist", {f + ".gz": ("md5:" + "0" * 32,) for f in datasets_idx.FILES.values()}
    )
    with pytest.raises(DataError, match="could not download"):
        load("mnist", url=base + "/missing")
    assert not list((tmp_path / "cache" / "ppvae" / "mnist").iterdir())


def test_truncated_and_foreign_idx(tmp_path):
    arrays = _write_idx_set(tmp_path / "idx", gz=False)
    path = tmp_path / "idx" / "train-images-idx3-ubyte"
    path.write_bytes(_idx_bytes(arrays["train_images"])[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load("mnist", root=str(tmp_path / "idx"), download=False)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DataError, match="not an IDX file"):
        datasets_idx.read_idx(path)
    path.write_bytes(gzip.compress(_idx_bytes(arrays["train_images"]))[:50])  # truncated gzip stream
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        datasets_idx.read_idx(path)
    path.write_bytes(_idx_bytes(arrays["train_labels"]))  # labels where images belong
    with pytest.raises(DataError, match="expected 3 dimensions"):
        load("mnist", root=str(tmp_path / "idx"), download=False)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    s = load("fashion-mnist", download=False, split=(0.9, 0.1, 0.0))
    assert len(s.train) + len(s.val) == 60000 and len(s.test) == 10000
    assert s.data_shape == (1, 28, 28) and s.levels == 256
    assert s.preprocessing["source"] == FASHION_DIR
    x = s.test[:500]
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0 and torch.equal(x * 255, torch.round(x * 255))
    assert sorted(torch.unique(s.test_labels).tolist()) == list(range(10))


# ---------------------------------------------------------------- user files and arrays


def test_npy_npz_csv_round_trips(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    y = np.arange(20) % 4
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", x=x, y=y)
    np.savez(tmp_path / "c.npz", only=x)
    with open(tmp_path / "d.csv", "w") as fh:
        fh.write("f1,f2,f3\n")
        np.savetxt(fh, x, delimiter=",", fmt="%.9g")
    np.savetxt(tmp_path / "e.csv", x, delimiter=",", fmt="%.9g")
    for name in ("a.npy", "b.npz", "c.npz", "d.csv", "e.csv"):
        s = load(tmp_path / name, split=(1.0, 0.0, 0.0))
        assert s.data_shape == (3,) and s.levels is None and s.name == str(tmp_path / name)
        assert _rows(s.train) == _rows(torch.from_numpy(x)), name
    s = load(str(tmp_path / "b.npz"), split=(1.0, 0.0, 0.0))
    got = sorted(zip(s.train[:, 0].tolist(), s.train_labels.tolist(), strict=True))
    assert got == sorted(zip(x[:, 0].tolist(), y.tolist(), strict=True))


def test_array_scaling_and_levels():
    img = np.random.default_rng(0).integers(0, 256, (10, 2, 3), dtype=np.uint8)
    s = load(img)
    assert s.levels == 256 and s.data_shape == (2, 3) and float(s.train.max()) <= 1.0
    counts = torch.tensor([[0.0, 3.0], [4.0, 1.0], [2.0, 2.0]])
    raw = load(counts)
    assert raw.levels is None and raw.preprocessing["scale"] is None
    scaled = load(counts, scale=True)
    assert scaled.levels == 5 and scaled.preprocessing["scale"] == "divide by max 4"
    assert load(counts + 0.5, scale=True).levels is None
    with pytest.raises(DataError, match="nonnegative"):
        load(counts - 1, scale=True)
    labelled = load(counts, labels=[0, 1, 2], split=(1.0, 0.0, 0.0))
    assert labelled.train_labels.dtype == torch.int64
    with pytest.raises(DataError, match="labels"):
        load(counts, labels=[0, 1])


def _mark_unpickled():
    _UNPICKLED.append(True)
    return "boom"


_UNPICKLED: list = []


class _Evil:
    def __reduce__(self):
        return (_mark_unpickled, ())


def test_bad_inputs(tmp_path):
    bad = torch.zeros(5, 2)
    bad[3, 1], bad[4, 0] = float("nan"), float("inf")
    with pytest.raises(DataError, match=r"2 NaN/Inf.*\(3, 1\)"):
        load(bad)
    with pytest.raises(DataError, match=r"2 NaN/Inf.*\(3, 1\)"):
        load(bad, scale=True)  # counted before scaling
    with pytest.raises(DataError, match="empty"):
        load(np.zeros((0, 4)))
    with pytest.raises(DataError, match="list"):
        load([[1.0, 2.0]])
    with pytest.raises(DataError, match="1-D|reshape"):
        load(np.arange(10.0))
    with pytest.raises(DataError, match="numeric"):
        load(np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(DataError, match="cannot fill"):
        load(np.zeros((2, 3)))
    with pytest.raises(DataError, match="not found") as err:
        load(tmp_path / "missing.npy")
    assert "missing.npy" in str(err.value)
    png = tmp_path / "image.npy"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(DataError, match="image.npy.*expected a NumPy .npy"):
        load(png)
    evil = tmp_path / "evil.npy"
    np.save(evil, np.array([_Evil(), 1], dtype=object), allow_pickle=True)
    _UNPICKLED.clear()
    with pytest.raises(DataError, match="evil.npy"):
        load(evil)
    assert not _UNPICKLED
    (tmp_path / "bad.csv").write_text("1,2\n3,x\n")
    with pytest.raises(DataError, match="bad.csv"):
        load(tmp_path / "bad.csv")
    (tmp_path / "data.txt").write_text("1,2\n")
    with pytest.raises(DataError, match="unknown file type"):
        load(tmp_path / "data.txt")
    with pytest.raises(DataError, match="digits.*fashion-mnist.*npz"):
        load("imagenet")


def test_helpers():
    with pytest.raises(DataError, match=r"1 NaN/Inf.*\(0, 2\)"):
        check_finite(torch.tensor([[0.0, 1.0, float("nan")]]), "x")
    check_finite(torch.tensor([1, 2]), "ints")
    t = torch.ones(2, dtype=torch.float32)
    assert as_tensor(t) is t
    assert as_tensor([[1, 2], [3, 4]]).dtype == torch.float32
    assert as_tensor(np.array([True, False])).tolist() == [1.0, 0.0]
    with pytest.raises(DataError, match="numeric"):
        as_tensor(np.array([{}, 1], dtype=object))
    with pytest.raises(DataError):
        as_tensor([[1, 2], [3]])


# ---------------------------------------------------------------- linear-Gaussian model


def test_linear_gaussian_load():
    s = load("linear-gaussian", n=500, data_dim=6, latent_dim=3, noise=0.3, seed=1)
    assert isinstance(s.generator, LinearGaussian) and s.data_shape == (6,) and s.levels is None
    assert (len(s.train), len(s.val), len(s.test)) == (400, 50, 50)
    assert s.generator.W.shape == (6, 3) and s.generator.sigma == 0.3
    assert torch.equal(load("linear-gaussian", n=500, data_dim=6, latent_dim=3, noise=0.3, seed=1).train, s.train)
    # The sample matches the model: empirical covariance ≈ W Wᵀ + σ² I.
    g = LinearGaussian(data_dim=4, latent_dim=2, noise=0.5, seed=0)
    x, z = g.sample(20000, seed=0)
    assert x.shape == (20000, 4) and z.shape == (20000, 2)
    cov = g.W @ g.W.T + 0.25 * torch.eye(4)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.08)
    with pytest.raises(ConfigError, match="latent_dim"):
        LinearGaussian(data_dim=2, latent_dim=3)


@pytest.mark.parametrize("orthogonal", [True, False])
def test_linear_gaussian_exact_quantities(orthogonal):
    g = LinearGaussian(data_dim=5, latent_dim=2, noise=0.7, orthogonal=orthogonal, seed=2)
    x, _ = g.sample(7, seed=3)
    w, b, s2 = g.W.double(), g.b.double(), 0.49
    cov_x = w @ w.T + s2 * torch.eye(5, dtype=torch.float64)
    direct = torch.distributions.MultivariateNormal(b, cov_x).log_prob(x.double())
    assert torch.allclose(g.log_px(x), direct, atol=1e-10)
    mean, cov = g.posterior(x)
    # Gaussian conditioning of the joint (z, x): E[z|x] = Wᵀ Σx⁻¹ (x − b), Cov = I − Wᵀ Σx⁻¹ W.
    gain = torch.linalg.solve(cov_x, w).T
    assert torch.allclose(mean, (x.double() - b) @ gain.T, atol=1e-10)
    assert torch.allclose(cov, torch.eye(2, dtype=torch.float64) - gain @ w, atol=1e-10)
    # Bayes: log p(x, z) − log p(z | x) = log p(x) for every z.
    zs = torch.randn(11, 2, dtype=torch.float64) * 2
    for i in range(len(x)):
        post = torch.distributions.MultivariateNormal(mean[i], cov)
        diff = g.log_joint(x[i].expand(11, 5), zs) - post.log_prob(zs)
        assert torch.allclose(diff, g.log_px(x[i : i + 1]).expand(11), atol=1e-9)
    off_diag = cov - torch.diag(torch.diagonal(cov))
    if orthogonal:
        assert float(off_diag.abs().max()) < 1e-6 * float(cov.diagonal().min())  # W is stored in float32
        assert not torch.allclose(cov[0, 0], cov[1, 1])  # distinct column norms: not rotation-symmetric
    else:
        assert float(off_diag.abs().max()) > 1e-3


def test_module_surface():
    assert set(data.__all__) >= {
        "DataSplits",
        "DynamicBinarized",
        "LinearGaussian",
        "load",
        "check_finite",
        "as_tensor",
    }
    assert pickle.loads(pickle.dumps(load("digits", binarize="dynamic").train)).grey.shape[1:] == (1, 8, 8)
