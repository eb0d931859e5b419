"""Datasets for ppvae: loading, validation, splitting, scaling and binarization.

:func:`load` returns a :class:`DataSplits` (train/val/test tensors of shape ``(N, *data_shape)``, float32, plus labels
and a JSON-serializable record of the preprocessing). Known names:

- ``"digits"``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, values 0..16, no network). Shape
  ``(1, 8, 8)``; scaled by 1/16 to 17 grey levels on [0, 1] unless ``scale=False`` (raw counts).
- ``"mnist"``, ``"fashion-mnist"``: IDX files, shape ``(1, 28, 28)``, scaled by 1/255 (256 levels). The official
  test set is ``test``; ``val`` is carved from the training set. Where the files are looked for and how they are
  downloaded: :mod:`ppvae.data.idx` (``root=``, ``$PPVAE_DATA``, the user cache, ``/usr/share/datasets``).
- ``"linear-gaussian"``: synthetic data from :class:`LinearGaussian`, whose exact log p(x) and posterior are known.
- A path to ``.npy``, ``.npz`` (key ``x`` or the single array, optional ``y`` labels) or ``.csv`` (numeric, optional
  header, one example per row), or an array/tensor passed directly: shape ``(N, ...)``.

Binarization (``binarize=``): ``"static"`` draws x ~ Bernoulli(grey) once with the seed; ``"dynamic"`` draws a fresh
training set every epoch (:class:`DynamicBinarized`) and binarizes val/test statically with the seed, as in
Burda et al. 2015 ("Importance Weighted Autoencoders"). Bernoulli results compare only under the same binarization.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ppvae._validate import check_seed, is_int
from ppvae.data import idx as datasets_idx
from ppvae.errors import ConfigError, DataError

__all__ = [
    "FILE_TYPES",
    "KNOWN_NAMES",
    "DataSplits",
    "DynamicBinarized",
    "LinearGaussian",
    "as_tensor",
    "check_finite",
    "load",
]

KNOWN_NAMES = ("digits", "mnist", "fashion-mnist", "linear-gaussian")
FILE_TYPES = (".npy", ".npz", ".csv")
_BINARIZE = (None, "static", "dynamic")


def check_finite(x: Tensor, what: str) -> None:
    """Raise :class:`DataError` when ``x`` holds NaN or ±Inf, with their count and the index of the first one."""
    if not x.is_floating_point() and not x.is_complex():
        return
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise DataError(
            f"{what} holds {count} NaN/Inf value(s) (first at index {first}, example {first[0]}); "
            "remove or impute them before training or scoring"
        )


def as_tensor(data: Any, what: str = "data") -> Tensor:
    """Convert an array, tensor or (nested) list of numbers to a float32 tensor; DataError on non-numeric data and on
    finite values too large for float32 (they would silently become ±inf)."""
    if torch.is_tensor(data):
        if data.is_complex():
            raise DataError(f"{what} must be real numbers; got a tensor of dtype {data.dtype}")
        if data.dtype == torch.float32:
            return data
        if data.is_floating_point() and data.numel():
            _check_float32_range(float(data.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()), what)
        return data.float()
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise DataError(f"cannot convert {what} of type {type(data).__name__} to an array: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise DataError(
            f"{what} must be numeric; got an array of dtype {arr.dtype} (kind {arr.dtype.kind!r}): "
            "convert strings/objects to numbers first"
        )
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 4 and arr.size:
        _check_float32_range(float(np.nan_to_num(np.abs(arr), nan=0.0, posinf=0.0).max()), what)
    # asarray, not ascontiguousarray: the latter turns a 0-d array into shape (1,), hiding a wrong rank.
    return torch.from_numpy(np.asarray(arr, dtype=np.float32, order="C"))


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_float32_range(largest: float, what: str) -> None:
    """Finite values beyond float32's range would become ±inf in the float32 tensors ppvae trains on."""
    if largest > _FLOAT32_MAX:
        raise DataError(
            f"{what} holds finite values as large as {largest:.4g} in magnitude, beyond float32's range "
            f"(±{_FLOAT32_MAX:.4g}), where ppvae computes; rescale them (e.g. divide by their maximum or standardize)"
        )


class DynamicBinarized(Dataset):
    """Grey levels in [0, 1] whose every access draws a fresh binary image x ~ Bernoulli(grey) (torch's global RNG).

    ``grey``: (N, *data_shape). ``get_batch(idx)`` draws a whole batch at once; ``dataset[i]`` one example.
    Dynamic binarization of the training set regularizes (Burda et al. 2015); evaluate on a statically binarized set.
    """

    def __init__(self, grey: Tensor) -> None:
        grey = as_tensor(grey)
        _check_unit_interval(grey, "data to binarize")
        self.grey = grey

    def __len__(self) -> int:
        return len(self.grey)

    def __getitem__(self, i: int) -> Tensor:
        return torch.bernoulli(self.grey[i])

    def get_batch(self, idx: Tensor) -> Tensor:
        """Fresh binary draws of examples ``idx`` (LongTensor): (len(idx), *data_shape)."""
        return torch.bernoulli(self.grey[idx])

    @property
    def shape(self) -> torch.Size:
        return self.grey.shape

    def __repr__(self) -> str:
        return f"DynamicBinarized(n={len(self)}, data_shape={tuple(self.grey.shape[1:])})"


@dataclass
class DataSplits:
    """Train/val/test data of shape (N, *data_shape), float32, with int64 labels where the dataset has them.

    ``levels``: number of equally spaced grey levels k / (levels - 1) on [0, 1] (digits 17, MNIST 256, 2 after
    binarization); None for continuous or unscaled count data. ``preprocessing``: JSON-serializable record of what
    was done, saved with a run. ``generator``: the :class:`LinearGaussian` behind synthetic data, else None.
    """

    name: str
    train: Tensor | DynamicBinarized
    val: Tensor | None = None
    test: Tensor | None = None
    train_labels: Tensor | None = None
    val_labels: Tensor | None = None
    test_labels: Tensor | None = None
    data_shape: tuple[int, ...] = ()
    levels: int | None = None
    binarize: str | None = None
    preprocessing: dict = field(default_factory=dict)
    generator: LinearGaussian | None = None


class LinearGaussian:
    """z ~ N(0, I_d); x | z ~ N(W z + b, sigma^2 I_D).

    Exact: p(x) = N(b, W W^T + sigma^2 I); posterior q*(z|x) = N(S W^T (x - b) / sigma^2, S),
    S = (I + W^T W / sigma^2)^{-1} (probabilistic PCA, Tipping & Bishop 1999). With ``orthogonal=True`` the columns of
    W are orthogonal with distinct norms, so S is diagonal and a mean-field Normal guide contains the exact posterior.
    ``W`` (D, d) and ``b`` (D,) are float32; the exact quantities are computed in float64.
    """

    def __init__(
        self, data_dim: int = 8, latent_dim: int = 2, noise: float = 0.5, orthogonal: bool = True, seed: int = 0
    ) -> None:
        if not (is_int(latent_dim) and is_int(data_dim)) or latent_dim < 1 or data_dim < 1:
            raise ConfigError(f"data_dim and latent_dim must be ≥ 1; got data_dim={data_dim}, latent_dim={latent_dim}")
        if orthogonal and latent_dim > data_dim:
            raise ConfigError(f"orthogonal=True needs latent_dim ≤ data_dim; got {latent_dim} > {data_dim}")
        if not (isinstance(noise, (int, float)) and not isinstance(noise, bool) and noise > 0 and math.isfinite(noise)):
            raise ConfigError(f"noise must be a positive number; got {noise}")
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(data_dim, latent_dim, generator=g, dtype=torch.float64)
        if orthogonal:
            q, _ = torch.linalg.qr(w)
            w = q * torch.linspace(2.0, 1.0, latent_dim, dtype=torch.float64)
        self.W = w.float()
        self.b = torch.randn(data_dim, generator=g, dtype=torch.float64).float()
        self.sigma = float(noise)
        self.data_dim, self.latent_dim, self.orthogonal = int(data_dim), int(latent_dim), bool(orthogonal)

    def sample(self, n: int, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` pairs: x (n, D), z (n, d), float32. ``seed=None`` uses torch's global RNG."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        z = torch.randn(n, self.latent_dim, generator=g)
        x = z @ self.W.T + self.b + self.sigma * torch.randn(n, self.data_dim, generator=g)
        return x, z

    def log_px(self, x: Tensor) -> Tensor:
        """Exact log p(x) in nats: (n,), float64."""
        w = self.W.double()
        cov = w @ w.T + self.sigma**2 * torch.eye(self.data_dim, dtype=torch.float64)
        mvn = torch.distributions.MultivariateNormal(self.b.double(), covariance_matrix=cov)
        return mvn.log_prob(as_tensor(x).double())

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Exact posterior p(z | x): mean (n, d) and covariance S (d, d), float64."""
        w = self.W.double()
        s = torch.linalg.inv(torch.eye(self.latent_dim, dtype=torch.float64) + w.T @ w / self.sigma**2)
        mean = (as_tensor(x).double() - self.b.double()) @ w @ s / self.sigma**2
        return mean, s

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log N(z; 0, I) + log N(x; W z + b, sigma^2 I): (n,), float64."""
        x, z = as_tensor(x).double(), as_tensor(z).double()
        normal = torch.distributions.Normal
        prior = normal(0.0, 1.0).log_prob(z).sum(-1)
        loc = z @ self.W.double().T + self.b.double()
        return prior + normal(loc, self.sigma).log_prob(x).sum(-1)


def _check_unit_interval(x: Tensor, what: str) -> None:
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise DataError(
            f"{what} must lie in [0, 1] to be binarized; saw values in [{float(x.min()):g}, "
            f"{float(x.max()):g}]: load with scale=True (or rescale) first"
        )


def _check_shape(x: Tensor, what: str) -> None:
    if x.dim() < 2:
        raise DataError(
            f"{what} has shape {tuple(x.shape)}; expected (N, D) or (N, *data_shape) with one example "
            "per row (reshape 1-D data with x.reshape(-1, 1))"
        )
    if x.numel() == 0:
        raise DataError(f"{what} is empty (shape {tuple(x.shape)}); give at least one example with one feature")
    check_finite(x, what)


def _check_split(split: Any) -> tuple[float, float, float]:
    try:
        fr = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        fr = ()
    if len(fr) != 3 or any(not math.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6 or fr[0] == 0:
        raise ConfigError(
            f"split must be three non-negative fractions (train, val, test) summing to 1 with train > 0;"
            f" got {split!r}, e.g. use (0.8, 0.1, 0.1)"
        )
    return fr  # type: ignore[return-value]


def _sizes(n: int, fr: tuple[float, ...]) -> list[int]:
    """Example counts per part: every part with a positive fraction gets at least one example."""
    parts = sum(f > 0 for f in fr)
    if n < parts:
        raise DataError(
            f"{n} example(s) cannot fill a {parts}-way split {fr}; give at least {parts} examples "
            "or set the val/test fractions to 0"
        )
    rest = [max(1, round(f * n)) if f > 0 else 0 for f in fr[1:]]
    while n - sum(rest) < 1:  # a tiny n: shrink the largest held-out part
        rest[rest.index(max(rest))] -= 1
    return [n - sum(rest), *rest]


def _split(x: Tensor, y: Tensor | None, fr: tuple[float, ...], seed: int) -> list[tuple[Tensor | None, Tensor | None]]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for size in _sizes(len(x), fr):
        idx = order[start : start + size]
        start += size
        out.append((x[idx], None if y is None else y[idx]) if size else (None, None))
    return out


def _labels(y: Any, n: int, what: str) -> Tensor:
    arr = np.asarray(y)
    if arr.dtype.kind not in "biuf" or arr.shape != (n,):
        raise DataError(f"{what} labels must be {n} integers, shape ({n},); got dtype {arr.dtype}, shape {arr.shape}")
    bad = np.zeros(arr.shape, dtype=bool)
    if arr.dtype.kind == "f":  # whole numbers that int64 holds exactly: no NaN/inf, no silent wrap-around
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (np.abs(arr) > 2**53)
    elif arr.dtype.kind == "u" and arr.dtype.itemsize == 8:
        bad = arr > np.iinfo(np.int64).max
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{what} labels must be {n} integers; got {arr[i]!r} at index {i} ({int(bad.sum())} such value(s), dtype "
            f"{arr.dtype}): give whole-number class labels"
        )
    return torch.from_numpy(arr.astype(np.int64))


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (an .npz), or an empty one


def _sniff(path: Path, expected: str) -> None:
    """Refuse a .npy/.npz file that is neither a NumPy array nor a zip archive before NumPy sees it: np.load would
    otherwise try it as a pickle (refused, with advice to allow pickles) and report random bytes as pickled data."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(_NPY_MAGIC) or head.startswith(_ZIP_MAGIC):
        return
    if not head:
        kind = "it is empty"
    elif head[:1] == b"\x80":
        kind = "it looks like a Python pickle, which is never unpickled (that could run code)"
    elif all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        kind = "it looks like text (for numbers in text, use a .csv file)"
    else:
        kind = f"it starts with bytes {head[:8]!r}"
    raise DataError(
        f"cannot read {path}: expected {expected}, but it has no NumPy header and is not a zip archive: {kind}; "
        "save arrays with np.save / np.savez"
    )


def _read_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    suffix = path.suffix.lower()
    expected = {
        ".npy": "a NumPy .npy array",
        ".npz": "a NumPy .npz archive with key 'x' (and optional 'y')",
        ".csv": "a numeric CSV file, one example per row",
    }[suffix]
    try:
        if suffix == ".csv":
            with open(path, encoding="utf-8") as fh:
                first = fh.readline()
            try:
                [float(v) for v in first.strip().split(",")]
                skip = 0
            except ValueError:
                skip = 1  # a header line
            with warnings.catch_warnings():  # an empty file: reported as empty data below, not as a warning
                warnings.simplefilter("ignore", UserWarning)
                return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64), None
        _sniff(path, expected)
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded:
            keys = list(loaded.files)
            key = "x" if "x" in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise DataError(f"{path} holds arrays {keys}; name the data 'x' (and labels 'y') or keep one array")
            return loaded[key], (loaded["y"] if "y" in keys and key == "x" else None)
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):  # an object array: its elements are pickles, and unpickling could run code
            raise DataError(
                f"cannot read {path}: it holds an object array (pickled Python objects), refused because unpickling "
                "a file can run code; save numeric arrays (np.save(path, x.astype(np.float32)))"
            ) from exc
        raise DataError(f"cannot read {path}: expected {expected} ({type(exc).__name__}: {exc})") from exc
    except (OSError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path}: expected {expected} ({type(exc).__name__}: {exc})") from exc


def _scale_array(x: Tensor, raw_dtype: Any, scale: bool | None, what: str) -> tuple[Tensor, int | None, dict]:
    """User arrays: uint8 → /255 (256 levels) unless scale=False; scale=True on other nonnegative data → /max, with
    max + 1 levels when the values are integers; scale=None leaves other data as they are."""
    _check_shape(x, what)
    is_uint8 = str(raw_dtype) in ("uint8", "torch.uint8")
    if scale is False or (scale is None and not is_uint8):
        return x, None, {"scale": None}
    if is_uint8:
        return x / 255.0, 256, {"scale": "divide by 255 (uint8)"}
    if len(x) and x.min() < 0:
        raise DataError(
            f"scale=True divides {what} by its maximum and needs nonnegative data; saw minimum "
            f"{float(x.min()):g}: standardize it yourself and pass scale=False"
        )
    top = float(x.max()) if len(x) else 0.0
    if top <= 0:
        return x, None, {"scale": None}
    # Integer data give max + 1 grey levels, as long as float32 holds every integer up to max exactly (2^24);
    # beyond that the grid k / max is not representable and the data are treated as continuous.
    levels = int(top) + 1 if top <= 2**24 and bool(torch.all(x == torch.round(x))) else None
    return x / top, levels, {"scale": f"divide by max {top:g}"}


def _known(name: str) -> str | None:
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}.get(key, key)
    return key if key in KNOWN_NAMES else None


def _no_extra(kwargs: dict, allowed: tuple[str, ...], what: str) -> None:
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        raise ConfigError(f"unexpected argument(s) {extra} for {what}; accepted: {list(allowed) or 'none'}")


def _load_idx(name: str, root: Any, download: bool, url: str | None) -> tuple[np.ndarray, ...]:
    files, searched = datasets_idx.find(name, root)
    if files is None:
        if not download:
            apt = "run `apt-get install dataset-fashion-mnist`, " if name == "fashion-mnist" else ""
            raise DataError(
                f"{name} IDX files ({', '.join(datasets_idx.FILES.values())}, .gz or not) not found; searched: "
                f"{', '.join(map(str, searched))}. Fix: {apt}put the files in one of these folders or set "
                "PPVAE_DATA to their folder, or pass download=True"
            )
        files = datasets_idx.download(name, datasets_idx.cache_dir(name), url)
    return (*datasets_idx.load_idx(files), str(files["train_images"].parent))


def load(
    name: str | os.PathLike | Tensor | np.ndarray,
    *,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    scale: bool | None = None,
    binarize: str | None = None,
    root: str | None = None,
    download: bool = True,
    url: str | None = None,
    flatten: bool = False,
    **kwargs: Any,
) -> DataSplits:
    """Load a dataset by name, path or array, validate it, split it, scale and binarize it (see the module doc).

    ``split``: (train, val, test) fractions, applied with a permutation seeded by ``seed`` (MNIST-style datasets keep
    their official test set, ignore ``split[2]`` and carve val from train by ``split[1] / (split[0] + split[1])``).
    ``scale``: None = the dataset's default. ``binarize``: None, "static" or "dynamic". ``flatten``: reshape to
    (N, prod(data_shape)). ``kwargs``: ``n, data_dim, latent_dim, noise, orthogonal`` for "linear-gaussian";
    ``labels`` for an array passed directly.
    """
    fr = _check_split(split)
    seed = check_seed(seed)
    if binarize not in _BINARIZE:
        raise ConfigError(f"binarize must be one of {list(_BINARIZE)}; got {binarize!r}")
    if scale not in (None, True, False):
        raise ConfigError(f"scale must be None (the dataset's default), True or False; got {scale!r}")
    record: dict[str, Any] = {"split": list(fr), "seed": seed}
    generator, levels, y = None, None, None
    official_test: tuple[Tensor, Tensor] | None = None
    key = _known(name) if isinstance(name, str) else None
    if isinstance(name, (Tensor, np.ndarray)):
        _no_extra(kwargs, ("labels",), "an array")
        label = "array"
        x = as_tensor(name, label)
        y = None if kwargs.get("labels") is None else _labels(kwargs["labels"], len(x), "the")
        x, levels, info = _scale_array(x, name.dtype, scale, label)
        record.update(source="array", **info)
    elif key == "digits":
        _no_extra(kwargs, (), "digits")
        from sklearn.datasets import load_digits

        bunch = load_digits()
        label, x = key, torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)
        y = torch.from_numpy(bunch.target.astype(np.int64))
        if scale is not False:
            x, levels = x / 16.0, 17
        record.update(source="sklearn.datasets.load_digits", scale="divide by 16" if levels else None)
    elif key in ("mnist", "fashion-mnist"):
        _no_extra(kwargs, (), key)
        xtr, ytr, xte, yte, folder = _load_idx(key, root, download, url)
        label = key
        x, y = torch.from_numpy(xtr).float().unsqueeze(1), torch.from_numpy(ytr.astype(np.int64))
        official_test = (torch.from_numpy(xte).float().unsqueeze(1), torch.from_numpy(yte.astype(np.int64)))
        if scale is not False:
            x, official_test, levels = x / 255.0, (official_test[0] / 255.0, official_test[1]), 256
        record.update(source=folder, scale="divide by 255" if levels else None)
    elif key == "linear-gaussian":
        allowed = ("n", "data_dim", "latent_dim", "noise", "orthogonal")
        _no_extra(kwargs, allowed, key)
        if scale:
            raise ConfigError("linear-gaussian data are continuous and unbounded: scale=True does not apply")
        n = kwargs.pop("n", 2000)
        if not is_int(n) or n < 1:
            raise ConfigError(f"n (the number of linear-gaussian examples) must be a whole number ≥ 1; got {n!r}")
        n = int(n)
        generator = LinearGaussian(seed=seed, **kwargs)
        label, (x, _) = key, generator.sample(n, seed=seed)
        record.update(
            source="LinearGaussian",
            n=n,
            scale=None,
            data_dim=generator.data_dim,
            latent_dim=generator.latent_dim,
            noise=generator.sigma,
            orthogonal=generator.orthogonal,
        )
    elif isinstance(name, (str, os.PathLike)):
        path = Path(name)
        try:
            is_file, exists = path.is_file(), path.exists()
        except (OSError, ValueError):  # a name too long for the file system, or holding a NUL byte
            is_file = exists = False
        if not is_file:
            if path.suffix.lower() in FILE_TYPES or exists:
                raise DataError(f"data file {path} not found (or not a file); expected a {'/'.join(FILE_TYPES)} file")
            raise DataError(
                f"unknown dataset {str(name)!r}: not a known name ({', '.join(KNOWN_NAMES)}) nor an "
                f"existing file ({', '.join(FILE_TYPES)})"
            )
        if path.suffix.lower() not in FILE_TYPES:
            raise DataError(f"cannot load {path}: unknown file type {path.suffix!r}; accepted: {', '.join(FILE_TYPES)}")
        _no_extra(kwargs, (), "a data file")
        raw, raw_y = _read_file(path)
        label = str(name)
        x = as_tensor(raw, str(path))
        y = None if raw_y is None else _labels(raw_y, len(x), str(path))
        x, levels, info = _scale_array(x, raw.dtype, scale, str(path))
        record.update(source=str(path), **info)
    else:
        raise DataError(
            f"cannot load data of type {type(name).__name__}; give a dataset name ({', '.join(KNOWN_NAMES)})"
            f", a {'/'.join(FILE_TYPES)} path, a torch.Tensor or a numpy array"
        )
    return _finish(label, x, y, official_test, fr, seed, levels, binarize, flatten, record, generator)


def _finish(
    name: str,
    x: Tensor,
    y: Tensor | None,
    official_test: tuple[Tensor, Tensor] | None,
    fr: tuple[float, float, float],
    seed: int,
    levels: int | None,
    binarize: str | None,
    flatten: bool,
    record: dict,
    generator: LinearGaussian | None,
) -> DataSplits:
    _check_shape(x, name)
    if official_test is not None:
        check_finite(official_test[0], f"{name} test set")
        total = fr[0] + fr[1]
        parts = _split(x, y, (fr[0] / total, fr[1] / total, 0.0), seed)[:2] + [official_test]
    else:
        parts = _split(x, y, fr, seed)
    (xtr, ytr), (xva, yva), (xte, yte) = parts
    if flatten:
        xtr, xva, xte = (None if t is None else t.reshape(len(t), -1) for t in (xtr, xva, xte))
    data_shape = tuple(xtr.shape[1:])
    record.update(
        flatten=flatten,
        binarize=binarize,
        data_shape=list(data_shape),
        levels=levels,
        sizes={k: 0 if t is None else len(t) for k, t in (("train", xtr), ("val", xva), ("test", xte))},
    )
    train: Tensor | DynamicBinarized = xtr
    if binarize is not None:
        g = torch.Generator().manual_seed(seed)
        for t, what in ((xtr, "train"), (xva, "val"), (xte, "test")):
            if t is not None:
                _check_unit_interval(t, f"{name} {what} data")
        binary = [None if t is None else torch.bernoulli(t, generator=g) for t in (xtr, xva, xte)]
        train = binary[0] if binarize == "static" else DynamicBinarized(xtr)
        xva, xte, levels = binary[1], binary[2], 2
        record.update(
            levels=2,
            binarize_note=(
                "x ~ Bernoulli(grey) drawn once with torch.Generator seeded by seed"
                if binarize == "static"
                else "train: fresh Bernoulli(grey) draws per access (global RNG); val/test: drawn once with seed"
            ),
        )
    return DataSplits(
        name=name,
        train=train,
        val=xva,
        test=xte,
        train_labels=ytr,
        val_labels=yva,
        test_labels=yte,
        data_shape=data_shape,
        levels=levels,
        binarize=binarize,
        preprocessing=record,
        generator=generator,
    )
