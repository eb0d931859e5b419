"""Files that survive a crash: atomic writes, the previous version kept beside, writability probes, directory locks.

A write goes to a temporary file in the same directory, is flushed to disk (``fsync``) and renamed over the target,
so a crash or ``SIGKILL`` never leaves a half-written file under the real name. With ``keep_previous`` the file it
replaces stays as ``<name>.prev`` (a hard link made before the rename, so the real name never goes missing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ppvae.errors import CheckpointError, ConfigError

__all__ = ["previous", "write_atomic", "copy_atomic", "prepare_dir", "locked_dir"]


def previous(path: str | os.PathLike) -> Path:
    """Where the version of ``path`` before its last write is kept: ``<name>.prev`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def write_atomic(path: Path, write: Callable[[BinaryIO], object], *, keep_previous: bool = False) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, optionally keep the current file as
    ``<name>.prev``, and rename it into place: readers see the old file or the new one, never a mix or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _install(Path(tmp), path, keep_previous)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def copy_atomic(source: Path, path: Path, *, keep_previous: bool = False) -> None:
    """Make ``path`` hold ``source``'s bytes as :func:`write_atomic` would write them: a hard link (no copy; a later
    rename over ``source`` leaves ``path`` as it is), or a copy, fsynced, on a filesystem without hard links."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        _install(tmp, path, keep_previous)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _install(tmp: Path, path: Path, keep_previous: bool) -> None:
    """Rename the finished ``tmp`` over ``path`` (its current file kept as ``<name>.prev`` first if asked) and flush
    the directory entry."""
    if keep_previous and path.exists():
        _keep_previous(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _keep_previous(path: Path) -> None:
    """Make ``<name>.prev`` the current file without a moment where ``path`` is missing (a kill then loses nothing)."""
    prev = previous(path)
    tmp = path.with_name(f".{prev.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)  # a second name for the same data: no copy, and path stays in place
    except OSError:  # a filesystem without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def _fsync_dir(directory: Path) -> None:
    """Flush the directory entry of a rename, so the new name survives a power cut (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepare_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` and check now, not after an hour of training, that files can be written there.

    Writes, fsyncs and removes a small probe file: a read-only directory, a path under a regular file, or a full
    disk fail here with a :class:`CheckpointError` naming the directory.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ppvae-write-test.", dir=directory)
        try:
            os.write(fd, b"\0" * 4096)  # data, not just a name: a full disk may still create empty files
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoints to {directory}: {err.strerror or err}; choose another directory (or free space)"
        ) from None
    return directory


@contextlib.contextmanager
def locked_dir(root: Path) -> Iterator[Path]:
    """``root``, created, held under an exclusive lock on ``root/.lock`` while the grid runs: a second grid on the
    same directory would train the same cells twice and race on their files, so it is refused with a one-line
    error. The lock is the kernel's (``flock``): it goes with the process, so a killed grid leaves nothing to
    clean up. Where there is no ``flock`` (Windows) or the directory is read-only (a finished cache being read),
    nothing is locked."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl

        handle = open(root / ".lock", "a+")  # held open for the lock's lifetime
    except (ImportError, OSError):
        yield root
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(
                f"{root} is in use by another compare ({holder}); wait for it to finish or give another out directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield root
    finally:
        handle.close()  # releases the lock

