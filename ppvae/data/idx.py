"""MNIST-style IDX files: finding them on disk, downloading them with checksums, and parsing them.

The four files of MNIST and Fashion-MNIST (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each gzipped or not) are looked for, in order, in

1. the ``root`` argument (and ``root/<name>``),
2. ``$PPVAE_DATA/<name>`` and ``$PPVAE_DATA``,
3. the user cache, ``$XDG_CACHE_HOME/ppvae/<name>`` (default ``~/.cache/ppvae/<name>``),
4. system folders: ``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST (Debian's ``dataset-fashion-mnist``).

When none holds them and downloading is allowed, the ``.gz`` files are fetched into the user cache from a base URL
(``url=``, else ``$PPVAE_DATA_URL``, else the dataset's public mirror; ``{name}`` in a base URL is replaced by the
dataset name). Each download goes to a temporary file, is checked against :data:`CHECKSUMS`, and only then renamed
into place. Files found locally are not checksummed (Debian recompresses them); the IDX parser validates them.

IDX format (LeCun et al.): two zero bytes, a type code, the number of dimensions, one big-endian ``int32`` per
dimension, then the values in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from ppvae.errors import DataError

__all__ = ["CHECKSUMS", "DEFAULT_URLS", "FILES", "SYSTEM_DIRS", "cache_dir", "download", "find", "load_idx", "read_idx"]

#: Role → file name without ``.gz``.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: Accepted ``"algorithm:hexdigest"`` checksums of each downloaded ``.gz`` file. MNIST: the published MD5s.
#: Fashion-MNIST: the MD5s published by Zalando Research for their mirror, and the SHA-256s of the files
#: Debian's ``dataset-fashion-mnist`` ships (same images, recompressed), so a mirror of either verifies.
CHECKSUMS: dict[str, dict[str, tuple[str, ...]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": ("md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",),
        "train-labels-idx1-ubyte.gz": ("md5:d53e105ee54ea40749a09fcbcd1e9432",),
        "t10k-images-idx3-ubyte.gz": ("md5:9fb629c4189551a2d022fa330f9573f3",),
        "t10k-labels-idx1-ubyte.gz": ("md5:ec29112dd5afa0611ce80d1b7f02629c",),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": (
            "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "sha256:b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        ),
        "train-labels-idx1-ubyte.gz": (
            "md5:25c81989df183df01b3e8a0aad5dffbe",
            "sha256:0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        ),
        "t10k-images-idx3-ubyte.gz": (
            "md5:bef4ecab320f06d8554ea6380940ec79",
            "sha256:cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "md5:bb300cfdad3c16e7a12a480ee83cd310",
            "sha256:8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        ),
    },
}

DEFAULT_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

SYSTEM_DIRS = {"fashion-mnist": ("/usr/share/datasets/fashion-mnist",)}

# IDX type code → big-endian numpy dtype.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def cache_dir(name: str) -> Path:
    """The user cache folder of dataset ``name``: ``$XDG_CACHE_HOME/ppvae/<name>`` or ``~/.cache/ppvae/<name>``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ppvae" / name


def _candidates(name: str, root: str | os.PathLike | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        dirs += [Path(root), Path(root) / name]
    env = os.environ.get("PPVAE_DATA")
    if env:
        dirs += [Path(env) / name, Path(env)]
    dirs.append(cache_dir(name))
    dirs += [Path(d) for d in SYSTEM_DIRS.get(name, ())]
    return dirs


def _files_in(folder: Path) -> dict[str, Path] | None:
    found = {}
    for role, base in FILES.items():
        for fname in (base, base + ".gz"):
            if (folder / fname).is_file():
                found[role] = folder / fname
                break
        else:
            return None
    return found


def find(name: str, root: str | os.PathLike | None = None) -> tuple[dict[str, Path] | None, list[Path]]:
    """The four files of ``name`` from the first folder holding all of them (or None), and the folders searched."""
    searched = _candidates(name, root)
    for folder in searched:
        found = _files_in(folder)
        if found is not None:
            return found, searched
    return None, searched


def _digest(path: Path, algorithms: set[str]) -> dict[str, str]:
    hashes = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            for h in hashes.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashes.items()}


def download(name: str, dest: Path, base_url: str | None = None) -> dict[str, Path]:
    """Download the missing ``.gz`` files of ``name`` into ``dest``, verifying each against :data:`CHECKSUMS`.

    A file whose checksum matches none of the known ones is deleted and :class:`DataError` names it, the expected and
    the seen checksums. Files already in ``dest`` are kept.
    """
    base = base_url or os.environ.get("PPVAE_DATA_URL") or DEFAULT_URLS[name]
    base = base.replace("{name}", name).rstrip("/") + "/"
    table = CHECKSUMS.get(name, {})
    dest.mkdir(parents=True, exist_ok=True)
    for base_name in FILES.values():
        fname = base_name + ".gz"
        final = dest / fname
        if final.is_file() or (dest / base_name).is_file():
            continue
        expected = table.get(fname)
        if not expected:
            raise DataError(
                f"no known checksum for {name} file {fname}; refusing to download it unverified "
                f"(add it to ppvae.data.idx.CHECKSUMS or place the file in {dest} yourself)"
            )
        url = base + fname
        fd, tmp_name = tempfile.mkstemp(prefix=f".{fname}.", suffix=".part", dir=dest)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with urllib.request.urlopen(url, timeout=60) as response:
                        for chunk in iter(lambda: response.read(1 << 20), b""):
                            out.write(chunk)
                except (OSError, ValueError) as exc:
                    raise DataError(
                        f"could not download {url}: {exc}; check the URL (url= or $PPVAE_DATA_URL) "
                        f"or place the files in {dest} yourself"
                    ) from exc
            seen = _digest(tmp, {e.split(":", 1)[0] for e in expected})
            if not any(seen[e.split(":", 1)[0]] == e.split(":", 1)[1] for e in expected):
                seen_text = ", ".join(f"{a}:{d}" for a, d in sorted(seen.items()))
                raise DataError(
                    f"checksum mismatch for {fname} downloaded from {url}: expected "
                    f"{' or '.join(expected)}, saw {seen_text}; the file was deleted — check the mirror"
                )
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    found = _files_in(dest)
    assert found is not None
    return found


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file (gzipped or not, detected from its first bytes) into a numpy array.

    Raises :class:`DataError` naming the file when it is not IDX, has ``ndim`` ≠ the expected number of dimensions,
    or is truncated or too long.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            gzipped = fh.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}; delete it and fetch it again") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(
            f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); "
            "expected an MNIST-style IDX file such as train-images-idx3-ubyte(.gz)"
        )
    dims_n = raw[3]
    if ndim is not None and dims_n != ndim:
        raise DataError(f"{path} holds a {dims_n}-dimensional IDX array; expected {ndim} dimensions")
    header = 4 + 4 * dims_n
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated inside its header; delete it and fetch it again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=dims_n, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"IDX file {path} has {len(raw) - header} data bytes but its header {dims} needs {expected} "
            "(truncated or corrupted); delete it and fetch it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def load_idx(files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the four files found by :func:`find`: train images, train labels, test images, test labels."""
    arrays = []
    for part in ("train", "test"):
        images = read_idx(files[f"{part}_images"], ndim=3)
        labels = read_idx(files[f"{part}_labels"], ndim=1)
        if len(images) != len(labels):
            raise DataError(
                f"{files[f'{part}_images']} holds {len(images)} images but {files[f'{part}_labels']} "
                f"holds {len(labels)} labels; the files do not belong together"
            )
        arrays += [images, labels]
    if arrays[0].shape[1:] != arrays[2].shape[1:]:
        raise DataError(
            f"train images are {arrays[0].shape[1:]} but test images are {arrays[2].shape[1:]}; "
            f"the files in {files['train_images'].parent} do not belong together"
        )
    return arrays[0], arrays[1], arrays[2], arrays[3]
