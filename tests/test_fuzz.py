"""Property-based fuzzing of the public entry points: ``ppvae.data.load`` (arrays and files), ``ppvae.fit``,
``ppvae.evaluate`` and the CLI (``ppvae.cli.main``).

Each must give a result or a clear ppvae error (a :class:`ppvae.PPVAEError` subclass, one line; on the command line
exit status 2 and one ``error:`` line on stderr, no traceback), never an exception from deep inside torch, pyro or
numpy, and never silent garbage: no result from NaN/Inf data, from data outside the likelihood's support, or from
values that overflow float32; no file is ever unpickled. Examples are few, derandomized and the models tiny
(latent_dim 2, hidden [8]), so the file runs in well under a minute on two busy cores.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ppvae
from ppvae import data as datamod
from ppvae.cli import main
from ppvae.data import datasets
from ppvae.errors import ConfigError, DataError, PPVAEError, TrainingError

FAST = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
FEW = settings(FAST, max_examples=20)
TINY = {"encoder": {"name": "mlp", "kwargs": {"hidden": [8]}}, "decoder": {"name": "mlp", "kwargs": {"hidden": [8]}}}
TINY_FLAGS = ["--encoder", "mlp:hidden=[8]", "--decoder", "mlp:hidden=[8]", "--latent-dim", "2", "--no-progress"]
F32_MAX = float(np.finfo(np.float32).max)


def outcome(fn, *args, **kwargs):
    """``fn``'s result, or the PPVAEError it raised (checked to be one non-empty line); anything else propagates."""
    try:
        return fn(*args, **kwargs)
    except PPVAEError as err:
        text = str(err)
        assert text and "\n" not in text, f"a ppvae error must be one line: {text!r}"
        assert "Traceback" not in text
        return err


def vae(data_shape=(3,), likelihood="normal"):
    return ppvae.VAE(data_shape, 2, likelihood=likelihood, **TINY)


# ---------------------------------------------------------------- ppvae.data.load: arrays

TORCH_DTYPES = ["float16", "float32", "float32", "float64", "float64", "int8", "int32", "int64", "uint8", "bool"]
TORCH_DTYPES += ["complex64"]
SPECIAL = [math.nan, math.inf, -math.inf, 1e300, -1e300, 3e38, -0.0, 1e-320, 2.0**60]


@st.composite
def numeric_arrays(draw):
    """Mostly loadable arrays (2-4 dims, a few rows), some with a wrong rank, no rows, NaN/Inf or huge values."""
    dtype = np.dtype(draw(st.sampled_from(TORCH_DTYPES)))
    ndim = draw(st.sampled_from([2, 2, 2, 3, 4, 1, 0]))
    shape = tuple(draw(st.integers(3, 12)) if i == 0 else draw(st.integers(1, 4)) for i in range(ndim))
    if ndim and draw(st.integers(0, 9)) == 0:
        shape = (*shape[:-1], 0)  # no features (or no rows)
    elements = (
        None if dtype.kind in "biuc" else st.floats(width=8 * dtype.itemsize, allow_nan=False, allow_infinity=False)
    )
    arr = draw(hnp.arrays(dtype, shape, elements=elements))
    if arr.size and dtype.kind in "fc" and draw(st.integers(0, 2)) == 0:  # plant NaN/Inf/huge/denormal values
        flat = arr.reshape(-1)
        for i in draw(st.lists(st.integers(0, arr.size - 1), min_size=1, max_size=3)):
            value = draw(st.sampled_from(SPECIAL))
            with np.errstate(over="ignore", invalid="ignore"):
                flat[i] = value
    return arr


JUNK = [
    None,
    "",
    3,
    2.5,
    [],
    [[1.0, 2.0], [3.0]],
    [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
    {"x": [1, 2]},
    b"\x00\x01",
    np.array([{}, 1], dtype=object),
    np.array([["a", "b"], ["c", "d"]]),
    np.zeros(4, dtype=[("a", "f4"), ("b", "i4")]),
    np.array([[np.datetime64("2020-01-01")]] * 4),
    np.ones((4, 2), dtype=">f8"),
    np.asfortranarray(np.random.default_rng(0).random((6, 3))),
    torch.zeros(4, 2, dtype=torch.complex64),
    object(),
]


def _check_splits(splits: datamod.DataSplits, source: np.ndarray | None, scale, binarize) -> None:
    train = splits.train.grey if isinstance(splits.train, datamod.DynamicBinarized) else splits.train
    parts = [t for t in (train, splits.val, splits.test) if t is not None]
    for t in parts:
        assert t.dtype == torch.float32 and t.shape[1:] == splits.data_shape and len(t) >= 1
        assert bool(torch.isfinite(t).all()), "load returned non-finite values"
    if binarize is not None:
        for t in (splits.val, splits.test):
            assert t is None or bool(((t == 0) | (t == 1)).all())
    if scale is True or splits.levels is not None:
        for t in parts:
            assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert splits.levels is None or (isinstance(splits.levels, int) and 2 <= splits.levels <= 2**24 + 1)
    if source is not None:
        values = np.asarray(source)
        assert values.ndim >= 2 and values.size and len(values) == sum(len(t) for t in parts)
        if values.dtype.kind == "f":
            assert np.isfinite(values).all(), "a result from data holding NaN/Inf"
            assert np.abs(values).max() <= F32_MAX, "a result from values that overflow float32"


@FAST
@given(
    arr=numeric_arrays(),
    as_torch=st.booleans(),
    scale=st.sampled_from([None, True, False]),
    binarize=st.sampled_from([None, "static", "dynamic"]),
    split=st.sampled_from([(0.8, 0.1, 0.1), (1.0, 0.0, 0.0), (0.5, 0.5, 0.0)]),
)
def test_load_random_arrays(arr, as_torch, scale, binarize, split):
    data = torch.from_numpy(arr) if as_torch else arr
    result = outcome(datamod.load, data, scale=scale, binarize=binarize, split=split, seed=1)
    if isinstance(result, PPVAEError):
        assert isinstance(result, (DataError, ConfigError))
        if arr.dtype.kind == "c":
            assert "real" in str(result) or "numeric" in str(result)
        return
    assert arr.dtype.kind != "c", "complex data must be refused, not cast"
    _check_splits(result, arr, scale, binarize)


@FEW
@given(
    junk=st.sampled_from(JUNK) | st.text(max_size=30),
    scale=st.sampled_from([None, True, False, "yes", 1]),
    seed=st.sampled_from([0, 7, -1, 2**32, 2**70, 1.5, "a", None]),
    split=st.sampled_from([(0.8, 0.1, 0.1), (0.5, 0.6, 0.1), (0.0, 0.5, 0.5), "abc", None, (1.0,), (math.nan, 0, 1)]),
)
def test_load_junk_names_and_options(junk, scale, seed, split):
    assume(not (isinstance(junk, str) and datasets._known(junk)))  # a real dataset name: loads (or downloads)
    result = outcome(datamod.load, junk, scale=scale, seed=seed, split=split, download=False)
    if not isinstance(result, PPVAEError):
        _check_splits(result, None, scale, None)
        assert scale in (None, True, False) and isinstance(seed, int) and 0 <= seed < 2**32


def test_load_edge_cases():
    with pytest.raises(DataError, match=r"beyond float32's range"):
        datamod.load(np.full((10, 3), 1e300))
    with pytest.raises(DataError, match=r"beyond float32's range"):
        datamod.load(torch.full((10, 3), 1e300, dtype=torch.float64))
    with pytest.raises(DataError, match=r"shape \(\)"):  # a 0-d array is reported as such, not as shape (1,)
        datamod.load(np.array(3.0))
    with pytest.raises(ConfigError, match="seed"):
        datamod.load("digits", seed=-1)
    with pytest.raises(ConfigError, match="scale"):
        datamod.load("digits", scale="yes")
    with pytest.raises(ConfigError, match="n .*whole number"):
        datamod.load("linear-gaussian", n=-5)
    with pytest.raises(ConfigError, match="data_dim"):
        datamod.load("linear-gaussian", data_dim=2.5)
    with pytest.raises(DataError, match="unknown dataset"):
        datamod.load("x" * 5000)  # longer than a file name may be
    with pytest.raises(DataError, match="unknown dataset"):
        datamod.load("a\x00b")
    # Huge integer counts scaled to [0, 1]: no absurd number of grey levels that float32 cannot represent.
    s = datamod.load(np.array([[0.0, 3e30], [1e30, 2e30], [5.0, 1e29]] * 4), scale=True)
    assert s.levels is None and float(s.train.max()) <= 1
    s = datamod.load(np.arange(30, dtype=np.int64).reshape(10, 3), scale=True)
    assert s.levels == 30
    # The fewest examples a split can take; one example without held-out parts.
    assert len(datamod.load(np.ones((3, 2)), seed=0).train) == 1
    assert len(datamod.load(np.ones((1, 2)), split=(1.0, 0.0, 0.0)).train) == 1
    with pytest.raises(DataError, match="cannot fill"):
        datamod.load(np.ones((2, 2)))


@pytest.mark.parametrize("labels", [[1e30, 2, 3], [math.inf, 2, 3], [math.nan, 2, 3], [0.5, 1, 2], ["a", "b", "c"]])
def test_load_refuses_labels_that_are_not_integers(labels):
    with pytest.raises(DataError, match="labels"):
        datamod.load(np.ones((3, 2)), labels=np.array(labels), split=(1.0, 0.0, 0.0))


# ---------------------------------------------------------------- ppvae.data.load: files

_UNPICKLED: list[str] = []


def _mark_unpickled(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class _Evil:
    """Unpickling this calls _mark_unpickled: a stand-in for code a malicious file would run."""

    def __reduce__(self):
        return (_mark_unpickled, ("evil",))


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


GOOD = np.random.default_rng(0).random((12, 3))
EVIL = np.array([_Evil(), 1.0], dtype=object)
FILE_BYTES = {
    "good npy": _npy(GOOD),
    "good npz": _npz(x=GOOD, y=np.arange(12)),
    "npz one array": _npz(a=GOOD),
    "npz two arrays": _npz(a=GOOD, b=GOOD),
    "npz empty": _npz(),
    "npz bad labels": _npz(x=GOOD, y=np.full(12, 1e30)),
    "npz string labels": _npz(x=GOOD, y=np.array(list("abcdefghijkl"))),
    "object npy": _npy(EVIL, allow_pickle=True),
    "object npz": _npz(x=EVIL),
    "object labels npz": _npz(x=GOOD, y=EVIL),
    "raw pickle": pickle.dumps(_Evil()),
    "pickled array": pickle.dumps(GOOD),
    "text": b"1,2,3\n4,5,6\n7,8,9\n1,1,1\n",
    "text header": b"a,b\n1,2\n3,4\n5,6\n",
    "ragged text": b"1,2\n3\n4,5\n",
    "text nan": b"1,2\nnan,3\n4,5\n",
    "text huge": b"1e300,2\n3,4\n5,6\n",
    "latin-1": "é,1\n2,3\n4,5\n".encode("latin-1"),
    "empty": b"",
    "png": b"\x89PNG\r\n\x1a\n" + bytes(64),
    "zip not npz": b"",  # filled below
    "structured npy": _npy(np.zeros(4, dtype=[("a", "f4"), ("b", "i4")])),
    "complex npy": _npy(np.ones((4, 2), dtype=complex)),
    "0-d npy": _npy(np.array(1.0)),
    "nan npy": _npy(np.full((4, 2), np.nan)),
}
_zip = io.BytesIO()
with zipfile.ZipFile(_zip, "w") as zf:
    zf.writestr("readme.txt", "not an array")
FILE_BYTES["zip not npz"] = _zip.getvalue()


NATURAL_SUFFIX = {
    "good npz": ".npz",
    "npz": ".npz",
    "text": ".csv",
    "latin": ".csv",
    "zip": ".npz",
    "object npz": ".npz",
}


@FAST
@given(
    kind=st.sampled_from(sorted(FILE_BYTES)) | st.binary(max_size=200),
    damage=st.sampled_from([None, None, None, "cut", "flip"]),
    where=st.integers(0, 400),
    suffix=st.sampled_from(["natural", "natural", "natural", ".npy", ".npz", ".csv", ".NPY", ".txt", ""]),
)
def test_load_random_files(tmp_path_factory, kind, damage, where, suffix):
    content = FILE_BYTES[kind] if isinstance(kind, str) else kind
    if damage == "cut":  # truncated
        content = content[:where]
    elif damage == "flip" and where < len(content):  # one corrupted byte
        content = content[:where] + bytes([content[where] ^ 0xFF]) + content[where + 1 :]
    if suffix == "natural":
        name = kind if isinstance(kind, str) else ""
        suffix = next((v for k, v in NATURAL_SUFFIX.items() if name.startswith(k)), ".npy")
    path = tmp_path_factory.mktemp("files") / f"data{suffix}"
    path.write_bytes(content)
    _UNPICKLED.clear()
    result = outcome(datamod.load, path, split=(1.0, 0.0, 0.0))
    assert not _UNPICKLED, "a data file was unpickled"
    if isinstance(result, PPVAEError):
        assert isinstance(result, DataError) and path.name in str(result)
        if kind in ("object npy", "raw pickle") and damage is None and suffix in (".npy", ".NPY"):
            assert "pickle" in str(result)
        return
    assert suffix.lower() in datamod.FILE_TYPES
    _check_splits(result, None, None, None)


def test_pickles_are_refused_with_a_clear_reason(tmp_path):
    _UNPICKLED.clear()
    for name, kind in (("a.npy", "object npy"), ("b.npy", "raw pickle"), ("c.npz", "object npz")):
        (tmp_path / name).write_bytes(FILE_BYTES[kind])
        with pytest.raises(DataError, match="pickle"):
            datamod.load(tmp_path / name)
    (tmp_path / "t.npy").write_bytes(FILE_BYTES["text"])
    with pytest.raises(DataError, match="text.*csv"):
        datamod.load(tmp_path / "t.npy")
    assert not _UNPICKLED


# ---------------------------------------------------------------- ppvae.fit

LIKELIHOODS = {
    "normal": "normal",
    "bernoulli": "bernoulli",
    "continuous-bernoulli": "continuous-bernoulli",
    "poisson": "poisson",
    "categorical": {"name": "categorical", "kwargs": {"levels": 3}},
}


def _in_support(x: np.ndarray, likelihood: str) -> bool:
    if not np.isfinite(x).all():
        return False
    if likelihood == "bernoulli":
        return bool(np.isin(x, (0.0, 1.0)).all())
    if likelihood == "continuous-bernoulli":
        return bool(((x >= 0) & (x <= 1)).all())
    if likelihood == "poisson":
        return bool(((x >= 0) & (x == np.round(x))).all())
    if likelihood == "categorical":
        return bool(((x >= 0) & (x <= 1) & (np.abs(x * 2 - np.round(x * 2)) <= 1e-4)).all())
    return True


FAULTS = [None, None, None, None, "nan", "inf", "huge", "support", "empty", "wrong rank", "wrong width", "option"]


@st.composite
def training_data(draw):
    """(data to pass, their float64 values, likelihood name, the model's data_shape, fault): valid data for the
    likelihood in one of several forms, or (``fault``) data with one thing wrong, or valid data with a bad option."""
    name = draw(st.sampled_from(sorted(LIKELIHOODS)))
    fault = draw(st.sampled_from(FAULTS))
    n = 0 if fault == "empty" else draw(st.integers(1, 9))
    d = draw(st.integers(1, 3))
    values = {
        "normal": st.floats(-3, 3),
        "bernoulli": st.sampled_from([0.0, 1.0]),
        "continuous-bernoulli": st.floats(0, 1),
        "poisson": st.integers(0, 5).map(float),
        "categorical": st.sampled_from([0.0, 0.5, 1.0]),
    }[name]
    x = np.array(draw(st.lists(values, min_size=n * d, max_size=n * d)), dtype=np.float64).reshape(n, d)
    bad = {"nan": math.nan, "inf": -math.inf, "huge": 1e30, "support": draw(st.sampled_from([-1.0, 0.25, 7.0]))}
    if fault in bad:
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] = bad[fault]
    shape = (d + 1,) if fault == "wrong width" else (d,)
    form = draw(st.sampled_from(["numpy", "float32", "float64", "float16", "list"]))
    if form in ("float32", "float64", "float16"):
        with np.errstate(over="ignore"):
            data = torch.from_numpy(x.astype(form))
    else:
        data = x.tolist() if form == "list" else x
    if fault == "wrong rank":
        data = data.reshape(-1) if hasattr(data, "reshape") else [v for row in data for v in row]
        x = x.reshape(-1)
    return data, x, name, shape, fault


def _acceptable(x: np.ndarray, name: str, shape: tuple[int, ...]) -> bool:
    """Data a model may be trained on or scored with: (N ≥ 1, *shape), finite, inside the likelihood's support."""
    return x.ndim == 2 and len(x) >= 1 and x.shape[1:] == shape and _in_support(x, name)


def _valid(x: np.ndarray, name: str, shape: tuple[int, ...]) -> bool:
    """Acceptable data of moderate size, which must never be refused."""
    return _acceptable(x, name, shape) and np.abs(x).max(initial=0) < 1e20


@FEW
@given(sample=training_data(), data=st.data())
def test_fit_random_data_and_options(sample, data):
    arg, x, name, shape, fault = sample
    n = len(x)
    batch_size = data.draw(st.integers(1, max(n, 1)))
    epochs, objective = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from(["elbo", "meanfield", "iwae"]))
    if fault == "option":
        option = data.draw(st.sampled_from(["batch_size", "epochs", "objective", "lr", "beta"]))
        bad = {"batch_size": [n + 1, 0, -3, 2.5, 2**62], "epochs": [0, -1, 1.5], "objective": ["bogus", None]}
        bad.update(lr=[0.0, -1.0, math.nan, math.inf], beta=[-1.0, math.nan, math.inf])
        value = data.draw(st.sampled_from(bad[option]))
    else:
        option, value = None, None
    kwargs = {"batch_size": batch_size, "epochs": epochs, "objective": objective, "lr": 1e-3, "beta": 1.0}
    if option:
        kwargs[option] = value
    model = vae(shape, LIKELIHOODS[name])
    particles = 2 if objective == "iwae" else 1
    result = outcome(ppvae.fit, model, arg, **kwargs, num_particles=particles, progress=False, device="cpu", seed=0)
    if isinstance(result, PPVAEError):
        assert fault is not None or not _valid(x, name, shape), f"fit refused valid data: {result}"
        return
    # Huge finite values (1e30) are data, not an error: training may go on as long as the loss stays finite.
    assert _acceptable(x, name, shape), f"fit trained on invalid data {x!r} ({name}, model shape {shape})"
    assert option is None, f"fit accepted {option}={value!r}"
    assert len(result.history) == epochs and all(math.isfinite(h["train_loss"]) for h in result.history)


@pytest.mark.parametrize("junk", JUNK + [(), (torch.rand(4, 2),), torch.utils.data.TensorDataset(torch.rand(0, 2))])
def test_fit_and_evaluate_junk_data(junk):
    model = vae((2,))
    empty_tuple = isinstance(junk, tuple) and not junk  # fit: see test_fit_empty_tuple
    fitted = None if empty_tuple else outcome(ppvae.fit, model, junk, epochs=1, batch_size=2, progress=False)
    scored = outcome(ppvae.evaluate, model, junk, num_samples=3)
    for result in (fitted, scored):
        if isinstance(result, PPVAEError):
            assert isinstance(result, (DataError, ConfigError))
    if not isinstance(scored, PPVAEError):
        assert np.isfinite(scored.log_px).all()


def test_fit_edge_sizes():
    one = torch.rand(1, 3)
    r = ppvae.fit(vae(), one, epochs=2, batch_size=1, progress=False, device="cpu")
    assert len(r.history) == 2 and all(math.isfinite(h["train_loss"]) for h in r.history)
    r = ppvae.fit(vae(), torch.rand(5, 3), val_data=one, epochs=1, batch_size=5, progress=False, device="cpu")
    assert math.isfinite(r.history[0]["val_elbo"])
    with pytest.raises(DataError, match=r"batch_size 6 is larger than the 5 examples"):
        ppvae.fit(vae(), torch.rand(5, 3), epochs=1, batch_size=6, progress=False, device="cpu")
    with pytest.raises(DataError, match="empty"):
        ppvae.fit(vae(), torch.rand(0, 3), epochs=1, batch_size=1, progress=False, device="cpu")
    with pytest.raises(DataError, match="expects"):
        ppvae.fit(vae(), torch.rand(4), epochs=1, batch_size=1, progress=False, device="cpu")


# fit's own validation: integer data, seeds, an empty tuple, an allocation that cannot succeed.
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_fit_integer_tensor(dtype):
    """Integer/bool data tensors train as float32, like integer arrays do."""
    result = ppvae.fit(vae((3,), "bernoulli"), torch.ones(4, 3, dtype=dtype), epochs=1, batch_size=2, progress=False)
    assert math.isfinite(result.history[-1]["train_loss"])


@pytest.mark.parametrize(
    "labels, dtype",
    [
        (np.arange(4) % 2, torch.int64),
        ((np.arange(4) % 2).astype(">i4"), torch.int32),  # big-endian: native order, same values
        ([0, 1, 0, 1], torch.int64),  # a list like an array
        ((np.arange(4) % 2).astype(np.uint16), torch.int64),  # unsigned wider than 8 bits: int64
        (np.array([True, False, True, False]), torch.bool),
    ],
)
def test_fit_tuple_keeps_label_dtype(labels, dtype):
    """In a tuple, only the first part (the data the model scores) becomes float; labels keep an integer dtype."""
    seen = []

    def model(x, y):
        seen.append((x.dtype, y.dtype))
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x, y):
        pass

    ppvae.fit(model, (torch.ones(4, 3, dtype=torch.int32), labels), guide=guide, epochs=1, batch_size=2, progress=False)
    assert set(seen) == {(torch.float32, dtype)}
    assert all(y.tolist() == [0, 1] or y.tolist() == [1, 0] for y in _labels_seen(model, labels))


def _labels_seen(model, labels):
    """The label batches fit hands the model, in storage order (values survive the conversion)."""
    from ppvae.data.batches import make_batches

    batches = make_batches((torch.ones(4, 3), labels), 2, torch.device("cpu"), shuffle=False, what="data")
    return [b[1].long() for b in batches]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int64])
def test_fit_integer_data_from_a_dataloader(dtype):
    """uint8 images from a DataLoader (torchvision's way) train as float32, like in-memory integer data."""
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.ones(4, 3, dtype=dtype)), batch_size=2)
    result = ppvae.fit(vae((3,), "bernoulli"), loader, epochs=1, progress=False)
    assert math.isfinite(result.history[-1]["train_loss"])


def _oom_pair(limit_rows: int | None):
    """A pair whose model runs out of memory (the CPU allocator's error) when scoring more than ``limit_rows``
    rows without gradients (validation); ``None``: always, without gradients."""

    def model(x):
        if not torch.is_grad_enabled() and (limit_rows is None or len(x) > limit_rows):
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                f"you tried to allocate {len(x) * 10**12} bytes. Error code 12 (Cannot allocate memory)"
            )
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    return model, guide


def test_validation_out_of_memory_retries_in_smaller_batches():
    """Validation runs without gradients; out of memory at 20 rows, it scores again in 10, then 5, and goes on."""
    model, guide = _oom_pair(limit_rows=6)
    result = ppvae.fit(model, torch.rand(8, 3), guide=guide, val_data=torch.rand(20, 3), epochs=2, batch_size=4,
                       progress=False)  # fmt: skip
    assert all(math.isfinite(h["val_elbo"]) for h in result.history)


def test_validation_out_of_memory_at_one_row_is_a_training_error():
    model, guide = _oom_pair(limit_rows=None)
    with pytest.raises(TrainingError, match=r"out of memory scoring val_data in batches of 1 rows \(DefaultCPU"):
        ppvae.fit(model, torch.rand(8, 3), guide=guide, val_data=torch.rand(20, 3), epochs=1, batch_size=4,
                  progress=False)  # fmt: skip


def test_out_of_memory_message_keeps_the_size_and_drops_the_noise():
    from ppvae.errors import describe_out_of_memory

    err = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 10240000000000 bytes. Error code 12 (Cannot allocate memory)\nTrace Shapes:\n Param Sites:"
    )
    said = describe_out_of_memory(err)
    assert said.startswith("DefaultCPUAllocator") and "10240000000000 bytes" in said and "Trace" not in said
    assert describe_out_of_memory(RuntimeError("CUDA out of memory. " + "x" * 300)).endswith("…")


@pytest.mark.parametrize("seed", [-1, 2**70, 1.5, "0"])
def test_fit_bad_seed(seed):
    with pytest.raises(ConfigError, match="seed must be a whole number"):
        ppvae.fit(vae(), torch.rand(4, 3), epochs=1, batch_size=2, seed=seed, progress=False)


def test_fit_empty_tuple():
    with pytest.raises(DataError, match="empty tuple"):
        ppvae.fit(vae(), (), epochs=1, batch_size=2, progress=False)


def test_fit_out_of_memory_is_a_training_error():
    """2^44 particles × 8 rows × 2 latents need 2^50 bytes, beyond any machine's address space: the allocator
    refuses at once, and fit says what to lower."""
    with pytest.raises(TrainingError, match="out of memory at epoch 1, batch 1 .* lower batch_size or num_particles"):
        ppvae.fit(vae(), torch.rand(16, 3), epochs=1, batch_size=8, num_particles=2**44, progress=False)


# ---------------------------------------------------------------- ppvae.evaluate


@FAST
@given(sample=training_data(), data=st.data(), keep=st.booleans())
def test_evaluate_random_data_and_options(sample, data, keep):
    arg, x, name, shape, fault = sample
    options = {"num_samples": 3, "batch_size": None, "seed": 0}
    options["num_samples"] = data.draw(st.sampled_from([2, 3, 5, np.int64(3)]))
    options["batch_size"] = data.draw(st.sampled_from([None, 1, 3, 2**62]))
    options["seed"] = data.draw(st.sampled_from([0, None, 2**32 - 1]))
    option = None
    if fault == "option":
        option = data.draw(st.sampled_from(sorted(options)))
        bad = {"num_samples": [1, 0, -2, 2.0, 10**13], "batch_size": [0, -1, 2.5], "seed": [-1, 2**70, "a"]}
        options[option] = data.draw(st.sampled_from(bad[option]))
    model = vae(shape, LIKELIHOODS[name])
    result = outcome(ppvae.evaluate, model, arg, **options, keep_log_weights=keep)
    if isinstance(result, PPVAEError):
        assert fault is not None or not _valid(x, name, shape), f"evaluate refused valid data: {result}"
        return
    assert option is None, f"evaluate accepted {option}={options[option]!r}"
    assert _acceptable(x, name, shape), f"evaluate scored invalid data {x!r} ({name}, model shape {shape})"
    n = len(x)
    assert result.elbo.shape == result.log_px.shape == (n,)
    assert (result.bits_per_dim is not None) == (name not in ("normal", "continuous-bernoulli"))
    if keep:
        assert result.log_weights.shape == (n, int(options["num_samples"]))
    if np.abs(x).max() < 1e3:  # moderate data under a fresh tiny model: every log-weight finite
        assert np.isfinite(result.elbo).all() and np.isfinite(result.log_px).all()
        assert (result.log_px >= result.elbo - 1e-4).all()  # IWAE_S ≥ ELBO (Jensen), per datapoint


def test_evaluate_refuses_data_outside_the_support():
    for likelihood, x in (
        ("bernoulli", torch.full((4, 3), 0.5)),  # would give finite "bits/dim" of nothing
        ({"name": "categorical", "kwargs": {"levels": 3}}, torch.full((4, 3), 0.1)),
        ({"name": "categorical", "kwargs": {"levels": 3}}, torch.full((4, 3), 7.0)),
        ("poisson", torch.full((4, 3), -1.0)),
    ):
        with pytest.raises(DataError, match="needs"):
            ppvae.evaluate(vae((3,), likelihood), x, num_samples=4)
    with pytest.raises(DataError, match="expects"):
        ppvae.evaluate(vae(), torch.rand(3), num_samples=4)  # (3,) is 3 datapoints of shape (), not one of (3,)
    with pytest.raises(ConfigError, match="GiB"):
        ppvae.evaluate(vae(), torch.rand(2, 3), num_samples=10**13)
    with pytest.raises(ConfigError, match="density"):
        ppvae.evaluate(vae(), torch.rand(2, 3), num_samples=4, discrete=True)
    ev = ppvae.evaluate(vae((3,), "poisson"), torch.ones(2, 3, dtype=torch.int64), num_samples=4)
    assert np.isfinite(ev.log_px).all() and ev.bits_per_dim is not None


# ---------------------------------------------------------------- the CLI


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` → (exit status, stdout, stderr); an exception other than SystemExit propagates."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_clean_exit(argv: list[str], code: int, err: str) -> None:
    assert "Traceback" not in err, f"{argv}: traceback on stderr:\n{err}"
    assert code in (0, 2), f"{argv}: exit status {code}, stderr {err!r}"
    if code == 2:
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].startswith("ppvae"), f"{argv}: want one error line, got {err!r}"


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    np.save(root / "grey.npy", rng.integers(0, 3, (20, 4)).astype(np.float32) / 2)
    np.save(root / "counts.npy", rng.poisson(2.0, (20, 4)))
    np.save(root / "nan.npy", np.full((20, 4), np.nan))
    (root / "junk.npy").write_bytes(bytes(range(256)))
    (root / "text.npy").write_text("1,2\n3,4\n")
    (root / "model.py").write_text("x = 1\n")  # no build()
    code, _, err = run_cli(
        ["train", "--dataset", str(root / "grey.npy"), "--epochs", "1", "--batch-size", "8"]
        + [
            "--out",
            str(root / "run"),
            *TINY_FLAGS,
        ]
    )
    assert code == 0, err
    return root


# Values each train flag takes: (valid ones, bad ones). A drawn command line has valid values, except (sometimes)
# one flag with a bad value, so that every layer, down to a trained and saved run, is reached.
TRAIN_FLAGS = {
    "--dataset": (["grey.npy", "grey.npy", "counts.npy"], ["nan.npy", "junk.npy", "text.npy", "missing.npy", "nope"]),
    "--epochs": (["1", "2"], ["0", "-1", "x"]),  # never huge: that is a legitimate (long) run
    "--batch-size": (["4", "8", "16"], ["0", "-2", "100", str(2**62)]),
    "--lr": (["1e-3", "0.01"], ["-1", "0", "nan", "inf", "abc"]),
    "--latent-dim": (["1", "2"], ["0", "-4", str(2**40), "x"]),
    "--beta": (["1", "0.5", "0"], ["-1", "nan", "inf"]),
    "--kl-warmup": (["0", "1"], ["-2", "inf"]),
    "--clip-norm": (["1", "100"], ["0", "-1", "nan"]),
    "--seed": (["0", "3", str(2**32 - 1)], ["-1", str(2**32), str(2**70)]),
    "--prior": (["normal", "laplace", "mixture:components=2"], ["mixture:components=-1", "bogus", "normal:x=1"]),
    "--likelihood": (
        ["normal", "normal:scale=learned", "laplace", "continuous-bernoulli", "categorical:levels=3"],
        ["bernoulli", "categorical:levels=-3", "normal:scale=-1", "normal:scale=inf", "normal:min_scale=-1", "beta"],
    ),
    "--guide": (["normal", "lowrank:rank=1", "fullrank"], ["lowrank:rank=-1", "bogus"]),
    "--objective": (["elbo", "meanfield"], ["bogus"]),
    "--num-particles": (["1", "2"], ["0", "-1"]),
    "--device": (["cpu"], ["tpu"]),
    "--binarize": (["static", "dynamic"], ["bogus"]),
    "--encoder": (["mlp:hidden=[8]"], ["mlp:hidden=[-1]", "mlp:hidden=[0]", "conv", "bogus", "mlp:=3"]),
}


@st.composite
def train_argv(draw, root: Path):
    flags = ["--dataset", "--epochs", "--batch-size", "--encoder"]
    flags += draw(st.lists(st.sampled_from(sorted(set(TRAIN_FLAGS) - set(flags))), max_size=3, unique=True))
    broken = draw(st.sampled_from([None, None, *flags]))
    argv = ["train", "--out", str(root / "t"), "--decoder", "mlp:hidden=[8]", "--no-progress"]
    for flag in flags:
        good, bad = TRAIN_FLAGS[flag]
        value = draw(st.sampled_from(bad if flag == broken else good))
        argv += [flag, str(root / value) if flag == "--dataset" and "." in value else value]
    if "--latent-dim" not in flags:
        argv += ["--latent-dim", "2"]
    return argv


@FEW
@given(data=st.data())
def test_cli_train_random_flags(cli_files, data):
    argv = data.draw(train_argv(cli_files))
    code, _, err = run_cli(argv)
    assert_clean_exit(argv, code, err)


SCORING_FLAGS = {
    "evaluate": {
        "--num-samples": (["2", "5"], ["1", "0", "-3", str(2**40), "x"]),
        "--batch-size": (["1", "7", str(2**62)], ["0", "-1"]),
        "--seed": (["0", "5"], ["-1", str(2**70)]),
        "--split": (["test", "val", "train"], ["bogus"]),
        "--out": (["out_dir"], ["grey.npy"]),
    },
    "diagnose": {
        "--num-samples": (["4"], ["1", "-1", str(2**40)]),
        "--max-points": (["2", str(2**62)], ["0", "-1"]),
        "--seed": (["0"], ["-1", str(2**70)]),
        "--out": (["out_dir"], ["grey.npy"]),
    },
    "sample": {
        "-n": (["1", "4"], ["0", "-2", str(2**40)]),
        "--seed": (["0", "7", "-1"], []),
        "--out": (["s.png"], ["no_dir/s.png"]),  # never over the data files
    },
    "info": {},
}


@st.composite
def scoring_argv(draw, root: Path):
    command = draw(st.sampled_from(sorted(SCORING_FLAGS)))
    flags = SCORING_FLAGS[command]
    broken = draw(st.sampled_from([None, None, "run", *(f for f in flags if flags[f][1])]))
    runs = ["grey.npy", "junk.npy", "missing", "text.npy"] if broken == "run" else ["run", "run/model.pt"]
    argv = [command, str(root / draw(st.sampled_from(runs)))]
    for flag, (good, bad) in flags.items():
        value = draw(st.sampled_from(bad if flag == broken else good))
        argv += [flag, str(root / value) if flag == "--out" else value]
    if command == "diagnose":  # the cheap parts: PSIS, ESS, collapse; SBC refused below its minimum
        argv += ["--no-gaps", "--no-reference"] + draw(st.sampled_from([["--no-sbc"], ["--sbc-simulations", "3"]]))
    return argv


@FEW
@given(data=st.data())
def test_cli_scoring_random_flags(cli_files, data):
    argv = data.draw(scoring_argv(cli_files))
    code, _, err = run_cli(argv)
    assert_clean_exit(argv, code, err)


def test_cli_clear_errors(cli_files):
    root = cli_files
    grey, run, out = str(root / "grey.npy"), str(root / "run"), str(root / "m")
    for argv, match in (
        (["train", "--dataset", str(root / "nan.npy"), "--out", out, *TINY_FLAGS], "NaN"),
        (["train", "--dataset", str(root / "junk.npy"), "--out", out, *TINY_FLAGS], "junk.npy"),
        (["train", "--dataset", grey, "--seed", "-1", "--out", out, *TINY_FLAGS], "seed"),
        (["train", "--dataset", grey, "--latent-dim", str(2**40), "--out", out], "memory"),
        (["train", "--dataset", grey, "--encoder", "mlp:hidden=[-1]", "--out", out], "build"),
        (["diagnose", run, "--num-samples", "1000", "--max-points", "2", "--no-sbc", "--seed", "-7"], "seed"),
        (["evaluate", str(root / "run"), "--num-samples", str(2**40)], "GiB"),
        (["evaluate", str(root / "run"), "--num-samples", "4", "--seed", "-1"], "seed"),
        (["sample", str(root / "run"), "-n", str(2**40), "--out", str(root / "s.png")], "fewer"),
    ):
        code, _, err = run_cli(argv)
        assert code == 2 and match in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)


def test_cli_sample_huge_seed(cli_files):
    argv = ["sample", str(cli_files / "run"), "-n", "2", "--seed", str(2**70), "--out", str(cli_files / "s.png")]
    code, _, err = run_cli(argv)
    assert_clean_exit(argv, code, err)
    assert code == 2 and "argument --seed: seed must be a whole number" in err


def test_cli_model_file_not_python(cli_files):
    grey = str(cli_files / "grey.npy")
    argv = ["train", "--dataset", grey, "--model", grey, "--out", str(cli_files / "mf"), "--no-progress"]
    code, _, err = run_cli(argv)
    assert_clean_exit(argv, code, err)
    assert code == 2 and "is not a Python file" in err


def test_cli_huge_num_particles(cli_files):
    argv = ["train", "--dataset", str(cli_files / "grey.npy"), "--num-particles", str(2**44), "--batch-size", "8"]
    argv += ["--epochs", "1", "--out", str(cli_files / "p"), *TINY_FLAGS]
    code, _, err = run_cli(argv)
    assert_clean_exit(argv, code, err)
    assert code == 2 and "out of memory" in err


def test_cli_usage_error_is_one_line():
    code, _, err = run_cli(["train", "--epochs"])
    assert code == 2 and err.count("\n") == 1 and err.startswith("ppvae train: error: argument --epochs")
