"""Faults and bad input: runs killed with SIGKILL resume exactly, checkpoints are atomic and damage is named,
NaN/Inf steps stop (or are skipped) with the step and the site named, and no reader ever unpickles objects."""

import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ppvae
from ppvae import io
from ppvae.cli import main
from ppvae.errors import CheckpointError, ConfigError, TrainingError

ROOT = Path(__file__).resolve().parents[1]
# One torch thread in the subprocesses, as conftest.py sets here: the same sums in the same order, bitwise results.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TINY = ["--encoder", "mlp:hidden=[32]", "--decoder", "mlp:hidden=[32]", "--latent-dim", "2", "--batch-size", "32"]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return io.read(path)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 120.0) -> threading.Thread:
    """In a thread: SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds (polled every 5 ms). A real
    kill at a point inside the next epoch on any machine where an epoch takes longer than ``delay``; the caller
    computes the uninterrupted reference meanwhile, then joins and calls ``check()``."""
    outcome = []

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                outcome.append(f"the run ended (status {proc.returncode}) before it could be killed")
                return
            if time.monotonic() > deadline:
                proc.kill()
                outcome.append("the run never wrote its first checkpoint")
                return
            time.sleep(0.005)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        outcome.append(proc.returncode)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def check() -> None:
        thread.join()
        assert outcome == [-signal.SIGKILL], outcome

    thread.check = check  # type: ignore[attr-defined]
    return thread


# --- 1. resume is exact ------------------------------------------------------------------------------------------


def test_train_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    """``ppvae train`` in a subprocess, SIGKILLed inside an epoch after its first checkpoint; ``ppvae train
    --resume`` (here in-process: the same code as the console script) ends bitwise equal to an uninterrupted run."""
    args = ["train", *TINY, "--epochs", "3", "--no-progress"]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ppvae.cli", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.pt"
    killer = _kill_when(proc, last.exists, delay=random.Random(0).uniform(0.0, 0.1))
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0  # uninterrupted, meanwhile, in this process
    killer.check()
    assert not (out / "model.pt").exists()  # killed before the end
    done = len(io.read(last)["meta"]["history"])
    assert 1 <= done < 3

    assert main(args + ["--out", str(out), "--resume"]) == 0
    _assert_same_weights(tmp_path / "ref" / "model.pt", out / "model.pt")
    ref, got = (io.read(p / "model.pt")["meta"]["history"] for p in (tmp_path / "ref", out))
    assert [h["train_loss"] for h in got] == [h["train_loss"] for h in ref]
    assert [h["val_elbo"] for h in got] == [h["val_elbo"] for h in ref]


_GRID = """
import sys
from ppvae import data
from ppvae.compare import GridSettings, compare

mlp = {"name": "mlp", "kwargs": {"hidden": [32]}}
settings = GridSettings(latent_dim=2, encoder=mlp, decoder=mlp, epochs=3, batch_size=32, num_samples=8,
                        max_test_points=16, diagnose={"gaps": False, "sbc": False, "reference": False})
compare(data.load("digits"), priors=["normal", "mixture"], settings=settings, out=sys.argv[1], progress=None)
"""


def _grid(out: Path) -> None:
    exec(compile(_GRID.replace("sys.argv[1]", repr(str(out))), "grid", "exec"), {})


def test_compare_grid_killed_mid_cell_resumes_to_the_same_cells(tmp_path):
    """A grid in a subprocess, SIGKILLed while its second cell trains; the same grid with the same ``out`` (rerun
    here in-process) takes the first cell from the cache, resumes the second from its fit checkpoint, and every
    cell's weights, scores and arrays equal an uninterrupted grid's. Through the Python API with cheap diagnostics:
    ``ppvae compare`` always runs NUTS, SBC and gaps per cell, too slow for this test; the cells' code is the same."""
    script = tmp_path / "grid.py"
    script.write_text(_GRID)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out)], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def second_cell_training() -> bool:  # one cell finished, the other has written its first checkpoint
        cells = list((out / "cells").glob("*")) if (out / "cells").exists() else []
        finished = [c for c in cells if (c / "result.json").exists()]
        training = [c for c in cells if (c / "checkpoints" / "last.pt").exists() and c not in finished]
        return bool(finished) and bool(training)

    killer = _kill_when(proc, second_cell_training, delay=random.Random(1).uniform(0.0, 0.1))
    _grid(tmp_path / "ref")  # uninterrupted, meanwhile, in this process
    killer.check()
    cells = sorted(c.name for c in (out / "cells").iterdir())
    assert cells == sorted(c.name for c in (tmp_path / "ref" / "cells").iterdir())
    assert sum((out / "cells" / c / "result.json").exists() for c in cells) == 1  # killed inside the second

    _grid(out)  # the same grid, the same out
    for c in cells:
        ref, got = tmp_path / "ref" / "cells" / c, out / "cells" / c
        _assert_same_weights(ref / "model.pt", got / "model.pt")
        a, b = (json.loads((d / "result.json").read_text()) for d in (ref, got))
        assert a["status"] == b["status"] == "ok"
        a["diagnosis"].pop("seconds"), b["diagnosis"].pop("seconds")
        assert a["diagnosis"] == b["diagnosis"]
        assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
        with np.load(ref / "arrays.npz") as fa, np.load(got / "arrays.npz") as fb:
            for k in fa.files:
                np.testing.assert_array_equal(fa[k], fb[k])


class NormedPair(nn.Module):
    """A user's pair whose encoder has BatchNorm: its running statistics (buffers) must be resumed too."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        self.dec = nn.Linear(1, 4)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        h = self.enc(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(h[:, :1], nn.functional.softplus(h[:, 1:]) + 1e-3).to_event(1))


def test_resume_restores_buffers_and_early_stopping(tmp_path):
    x, val = torch.randn(64, 4), torch.randn(16, 4) * 3

    def run(directory, epochs, resume=False, patience=None):
        pyro.set_rng_seed(7)
        pair = NormedPair()
        kw = {"val_data": val, "patience": patience} if patience else {}
        result = ppvae.fit(
            pair, x, epochs=epochs, batch_size=16, lr=0.05, progress=False, checkpoint_dir=directory, resume=resume,
            **kw,
        )  # fmt: skip
        return pair, result

    full, _ = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, _ = run(tmp_path / "b", 4, resume=True)
    for k, v in full.state_dict().items():  # running_mean, running_var, num_batches_tracked included
        assert torch.equal(v, resumed.state_dict()[k]), k
    # A run that ran out of patience and was killed before returning stays stopped when resumed.
    stopped, result = run(tmp_path / "c", 200, patience=1)
    assert result.stopped_early and len(result.history) < 200
    again, resumed_result = run(tmp_path / "c", 200, resume=True, patience=1)
    assert resumed_result.stopped_early and len(resumed_result.history) == len(result.history)
    for k, v in stopped.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


# --- 2. atomic checkpoints, damage named, unwritable directories found up front ----------------------------------


def _small_fit(tmp_path, epochs, **kwargs):
    pyro.set_rng_seed(3)
    vae = ppvae.VAE((8,), 2, likelihood="normal")
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    return vae, ppvae.fit(
        vae, x, epochs=epochs, batch_size=16, progress=False, checkpoint_dir=tmp_path / "ck", seed=1, **kwargs
    )


def test_truncated_checkpoint_names_the_file_and_the_older_one(tmp_path):
    _small_fit(tmp_path, 3)
    last, prev = tmp_path / "ck" / "last.pt", tmp_path / "ck" / "last.pt.prev"
    assert len(io.read(prev)["meta"]["history"]) == 2  # the checkpoint before the newest is kept
    assert not list((tmp_path / "ck").glob(".*"))  # no temporary or probe files left behind
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as err:
        _small_fit(tmp_path, 4, resume=True)
    msg = str(err.value)
    assert "cannot resume" in msg and str(last) in msg and "truncated" in msg
    assert f"mv {prev} {last}" in msg and "(2 epochs)" in msg
    # Following the advice resumes, and ends where an uninterrupted run ends.
    os.replace(prev, last)
    resumed, result = _small_fit(tmp_path, 4, resume=True)
    assert len(result.history) == 4
    full, _ = _small_fit(tmp_path / "full", 4)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    last.unlink()  # only someone else's hand leaves .prev without the file: said, not silently started over
    with pytest.raises(CheckpointError, match=r"last\.pt is missing but .*last\.pt\.prev exists"):
        _small_fit(tmp_path, 5, resume=True)


def test_garbage_checkpoint_and_wrong_file_kind(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "last.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=r"cannot resume: cannot read .*last\.pt: truncated, corrupted"):
        _small_fit(tmp_path, 1, resume=True)
    ppvae.save(ppvae.VAE((8,), 2, likelihood="normal"), tmp_path / "ck" / "last.pt")  # a model, not a checkpoint
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        _small_fit(tmp_path, 1, resume=True)


def test_checkpoint_loads_as_a_model(tmp_path):
    vae, _ = _small_fit(tmp_path, 1)
    loaded = ppvae.load(tmp_path / "ck" / "last.pt")
    for k, v in vae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_unwritable_output_is_found_before_training(tmp_path, monkeypatch, capsys):
    """Tests run as root, where chmod 0o500 does not stop writes: a read-only directory is simulated by making
    file creation fail with EROFS, an unwritable path by a parent that is a regular file (ENOTDIR, real), a full
    disk by a small free-space figure."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=f"cannot write checkpoints to {blocker / 'ck'}"):
        _small_fit(blocker, 1)

    import tempfile

    def read_only(*_, **__):
        raise OSError(30, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        with pytest.raises(CheckpointError, match=r"cannot write checkpoints to .*ck: Read-only file system"):
            _small_fit(tmp_path / "ro", 1)
    assert not (tmp_path / "ro" / "ck" / "last.pt").exists()

    import shutil

    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
        with pytest.raises(CheckpointError, match=r"not enough space for checkpoints in .*ck: 0.0 MiB free"):
            _small_fit(tmp_path / "full", 1)

    # The CLI: one line, status 2, before any epoch runs.
    assert main(["train", "--epochs", "1", "--no-progress", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write checkpoints to {blocker / 'run' / 'checkpoints'}" in err


def test_disk_full_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _small_fit(tmp_path, 1)
    good = (tmp_path / "ck" / "last.pt").read_bytes()

    def full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last\.pt: No space left.*previous epoch"):
        _small_fit(tmp_path, 3, resume=True)
    assert (tmp_path / "ck" / "last.pt").read_bytes() == good
    assert not list((tmp_path / "ck").glob(".*.tmp"))
    with pytest.raises(CheckpointError, match=r"cannot write .*m\.pt: No space left on device"):
        ppvae.save(ppvae.VAE((8,), 2, likelihood="normal"), tmp_path / "m.pt")


# --- 3. numerical faults -----------------------------------------------------------------------------------------


class Pair(nn.Module):
    """A user's model/guide pair: Normal likelihood on 4 features, one latent; the guide sees clamped data."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 2)
        self.dec = nn.Linear(1, 4)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        h = self.enc(x.clamp(-5, 5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(h[:, :1], nn.functional.softplus(h[:, 1:]) + 1e-3).to_event(1))


def _loader(x):  # unshuffled: batch k holds rows 16k .. 16k+15
    return DataLoader(TensorDataset(x), batch_size=16)


def _pair_fit(x, epochs=2, **kwargs):
    pyro.set_rng_seed(5)
    pair = Pair()
    try:
        return pair, ppvae.fit(pair, _loader(x), epochs=epochs, lr=1e-2, progress=False, seed=2, **kwargs), None
    except TrainingError as err:
        return pair, None, err


def _data(bad_row=None, value=1e38):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    if bad_row is not None:
        x[bad_row, 2] = value  # finite, but (x - loc)² overflows: log p(x | z) = -inf
    return x


def test_nonfinite_loss_names_step_site_and_rows_and_keeps_last_good_parameters(tmp_path):
    pair, _, err = _pair_fit(_data(bad_row=40), checkpoint_dir=tmp_path / "ck")
    msg = str(err)
    assert re.search(r"the loss became (nan|inf) at epoch 1, batch 3 of 4;", msg)
    assert "site 'x' (model, observed) has log-probability -inf at batch rows [8]" in msg
    assert "data run from" in msg and "1e+38" in msg
    assert "learning rate" in msg and "support" in msg and "on_nonfinite='skip'" in msg
    assert f"kept in memory and in {tmp_path / 'ck' / 'nonfinite.pt'}" in msg
    assert "\n" not in msg
    # The last good parameters are those after batches 1 and 2: a run on those two batches alone ends there.
    good, _, no_err = _pair_fit(_data()[:32], epochs=1)
    assert no_err is None
    saved = io.read(tmp_path / "ck" / "nonfinite.pt")
    assert saved["meta"]["failed_at"] == {"epoch": 1, "batch": 3}
    for k, v in good.state_dict().items():
        assert torch.equal(pair.state_dict()[k], v), k
        assert torch.equal(saved["state_dict"][k], v), k
    assert not (tmp_path / "ck" / "last.pt").exists()  # no epoch finished: nothing to resume from


def test_huge_learning_rate_diverges_with_a_clear_error(tmp_path):
    def run(x, epochs):
        pyro.set_rng_seed(0)
        vae = ppvae.VAE((8,), 2, likelihood="normal")
        try:
            ppvae.fit(vae, _loader(x), epochs=epochs, lr=1e4, progress=False, checkpoint_dir=tmp_path / str(len(x)))
        except TrainingError as err:
            return vae, err
        return vae, None

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    vae, err = run(x, 3)
    msg = str(err)
    assert re.search(r"the loss became (nan|inf) at epoch 1, batch 2 of 4;", msg)
    assert "site 'x' (model, observed) has log-probability -inf" in msg and "loc from" in msg
    assert "lr=10000: try 1000" in msg
    good, no_err = run(x[:16], 1)  # the one batch before the bad one
    assert no_err is None
    for k, v in good.state_dict().items():
        assert torch.equal(vae.state_dict()[k], v), k
        assert torch.isfinite(v).all()


def test_skip_policy_counts_skipped_batches_and_trains_on(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"skipped 1 of 4 batches in epoch [12] .*site 'x'"):
        pair, result, err = _pair_fit(_data(bad_row=40), on_nonfinite="skip")
    assert err is None
    assert [h["skipped_batches"] for h in result.history] == [1, 1]
    assert all(torch.isfinite(p).all() for p in pair.parameters())
    pyro.set_rng_seed(5)
    assert not torch.equal(Pair().dec.weight, pair.dec.weight)  # the same initial weights, moved by training
    # An epoch with no good batch cannot go on.
    x = _data()
    x[::16, 0] = 1e38
    _, _, err = _pair_fit(x, on_nonfinite="skip")
    assert "every batch of epoch 1 (4) had a non-finite loss" in str(err)
    with pytest.raises(ConfigError, match="on_nonfinite must be one of 'raise', 'skip'"):
        ppvae.fit(Pair(), x, on_nonfinite="ignore", progress=False)


def test_skip_warning_points_at_the_line_that_called_fit():
    pyro.set_rng_seed(5)
    with pytest.warns(RuntimeWarning, match="skipped 1 of 4") as record:
        ppvae.fit(Pair(), _loader(_data(bad_row=40)), epochs=1, progress=False, on_nonfinite="skip")
    assert [w.filename for w in record if "skipped" in str(w.message)] == [__file__]


def test_nonfinite_gradient_with_finite_loss_is_caught():
    class SqrtPair(Pair):
        def model(self, x):  # sqrt at 0: a finite loss, an infinite gradient
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
                loc = self.dec(z) + torch.sqrt(self.dec.bias[0] * 0)
                pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    pyro.set_rng_seed(0)
    with pytest.raises(TrainingError, match=r"gradient became NaN or infinite \(in dec.bias\) while the loss was"):
        ppvae.fit(SqrtPair(), _loader(_data()), epochs=1, progress=False)


def test_out_of_support_value_in_a_validated_pair_names_the_site():
    class PoissonPair(Pair):
        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
                pyro.sample("x", dist.Poisson(self.dec(z).exp()).to_event(1), obs=x)

    x = torch.poisson(torch.full((64, 4), 3.0))
    x[20, 1] = -1.0
    pyro.set_rng_seed(0)
    with pytest.raises(TrainingError, match=r"invalid values at site 'x' .*at epoch 1, batch 2 of 4"):
        ppvae.fit(PoissonPair(), _loader(x), epochs=1, progress=False)


def test_cli_on_nonfinite_raise_and_skip(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
    x[::25, 1] = 1e38  # finite, so the data checks pass; log p(x | z) = -inf under a Normal
    np.save(tmp_path / "x.npy", x)
    args = ["train", *TINY, "--dataset", str(tmp_path / "x.npy"), "--epochs", "2", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(r"^ppvae train: error: the loss became (nan|inf) at epoch 1, batch \d of 8; ", err)
    assert re.search(r"site 'x' \(model, observed\) has log-probability -inf at batch rows \[.*1e\+38", err)
    assert (tmp_path / "a" / "checkpoints" / "nonfinite.pt").exists()
    assert not (tmp_path / "a" / "model.pt").exists()

    assert main(args + ["--out", str(tmp_path / "b"), "--on-nonfinite", "skip"]) == 0
    err = capsys.readouterr().err.strip().splitlines()  # (and Pyro's NaN warnings: val/test hold such rows too)
    assert sum(line.startswith("ppvae train: RuntimeWarning: skipped ") for line in err) == 2
    history = io.read(tmp_path / "b" / "model.pt")["meta"]["history"]
    assert all(h["skipped_batches"] > 0 for h in history)


# --- 4. safe loading ---------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_no_reader_unpickles_objects(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _Evil(marker)
    pickle.loads(pickle.dumps(_Evil(tmp_path / "works")))  # the payload is real: unpickling runs it
    assert (tmp_path / "works").exists()

    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"format": "ppvae", "version": 1, "payload": evil}))
    archive = tmp_path / "archive.pt"
    torch.save({"format": "ppvae", "version": 1, "kind": "vae", "config": "{}", "state_dict": evil}, archive)
    for path in (raw, archive):
        with pytest.raises(CheckpointError, match="refused|not a torch archive"):
            ppvae.load(path)

    # The resume path: a malicious last.pt in the checkpoint directory.
    (tmp_path / "ck").mkdir()
    torch.save({"format": "ppvae", "version": 1, "kind": "checkpoint", "rng": evil}, tmp_path / "ck" / "last.pt")
    with pytest.raises(CheckpointError, match="cannot resume: refused to load"):
        _small_fit(tmp_path, 1, resume=True)

    # The CLI: info and evaluate on a run directory whose model.pt is malicious.
    run = tmp_path / "run"
    run.mkdir()
    os.replace(archive, run / "model.pt")
    for command in (["info", str(run)], ["evaluate", str(run)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "refused to load" in err and "Traceback" not in err

    # Compare caches read arrays.npz with allow_pickle=False: an object array is refused, the cell is rerun.
    from ppvae.compare.cells import load_cell

    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "result.json").write_text(json.dumps({"status": "ok"}))
    np.savez(cell / "arrays.npz", log_px=np.array([evil], dtype=object))
    assert load_cell(cell) is None
    # Data files too (ppvae train --dataset x.npy).
    np.save(tmp_path / "x.npy", np.array([evil], dtype=object), allow_pickle=True)
    assert main(["train", "--dataset", str(tmp_path / "x.npy"), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "pickle" in capsys.readouterr().err
    assert not marker.exists()
def test_the_step_check_is_exact_about_gradients_huge_finite_ones_are_not_a_fault():
    """fit's per-step check sums the gradients (cheap); a sum that overflows is looked at entry by entry, so huge
    but finite gradients (Adam's to scale) are not skipped as faults, and a NaN or Inf entry always is."""
    from ppvae.infer.train import _all_finite, _grad_sum

    def params(*values):
        out = []
        for v in values:
            p = torch.zeros(len(v), requires_grad=True)
            p.grad = torch.tensor(v)
            out.append(p)
        return out

    loss = torch.tensor(1.0)
    huge = params([3e38, 3e38], [3e38])
    assert not torch.isfinite(_grad_sum(huge))  # the sum overflows ...
    assert _all_finite(loss, _grad_sum(huge), huge)  # ... the entries do not
    for bad in ([1.0, float("nan")], [float("inf"), 1.0], [float("inf"), -float("inf")]):
        ps = params([0.5], bad)
        assert not _all_finite(loss, _grad_sum(ps), ps)
    assert not _all_finite(torch.tensor(float("nan")), _grad_sum(params([1.0])), params([1.0]))
    assert _all_finite(loss, None, [])
