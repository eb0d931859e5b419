"""write_html: self-contained (no network), in reading order, escaped; rendered by headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pd = pytest.importorskip("pandas")

from ppvae.report.html import write_html  # noqa: E402

CHROMIUM = shutil.which("chromium")
# Without the background-networking flags Chromium tries to reach Google services and fails on a closed network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")


def _png(path: Path, seed: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
    ax.plot(np.random.default_rng(seed).normal(size=20))
    fig.savefig(path)
    plt.close(fig)
    return path


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "group": ["digits / bernoulli", "digits / bernoulli", "mnist / categorical", "mnist / categorical"],
            "run": ["<script>alert(1)</script>", "vamp & iaf", "normal", "flow"],
            "status": ["ok", "ok", "ok", "failed"],
            "nll": [-41.23456, -39.5, 1234.5678, float("nan")],
            "epochs": [20, 20, 5, 5],
            "error": [None, None, None, "RuntimeError: <NaN loss> at epoch 3"],
        }
    )


@pytest.fixture
def page(tmp_path: Path) -> Path:
    figures = [
        ("Pareto k̂ per run", _png(tmp_path / "khat.png", 0)),
        ("KL per latent dim", _png(tmp_path / "kl.png", 1)),
    ]
    return write_html(
        tmp_path / "out" / "report.html",
        title="Priors on digits",
        subtitle="4 runs, digits 8×8, 2026-01-01",
        verdict=["vamp beats normal by 1.7 nats <on test>.", "flow failed."],
        table=_table(),
        column_docs={"nll": "test NLL in nats (IWAE, S=1000); lower is better", "run": "the run's label"},
        figures=figures,
        notes=["Seeds 0–2; ranks are within a group only."],
    )


def test_no_external_url(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"https?://", text, re.I)
    assert "url(" not in text.lower()
    assert "@import" not in text and "@font-face" not in text
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", text, re.I)
    assert refs, "the figures should appear as src= attributes"
    assert all(r.startswith("data:") or r.startswith("#") for r in refs), refs
    assert '<meta charset="utf-8">' in text and text.startswith("<!DOCTYPE html>")


def test_images_are_png_data_uris(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"', text)
    assert [alt for _, alt in uris] == ["Pareto k̂ per run", "KL per latent dim"]
    assert all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for data, _ in uris)


def test_reading_order(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    positions = [text.index(s) for s in ("<h1>", "vamp beats normal", "<table", "<dl", "<figure", "Seeds 0–2")]
    assert positions == sorted(positions)


def test_escaping_failed_rows_and_formatting(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "vamp &amp; iaf" in text and "&lt;on test&gt;" in text
    failed = re.findall(r'<tr class="failed">(.*?)</tr>', text)
    assert len(failed) == 1 and "flow" in failed[0]
    assert "RuntimeError: &lt;NaN loss&gt; at epoch 3" in failed[0]
    assert "\u2014" in failed[0]  # the NaN nll
    assert ">-41.23<" in text and ">1,234.6<" in text and ">nan<" not in text.lower()


def test_one_section_per_group(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert re.findall(r"<h3>Group: (.*?)</h3>", text) == ["digits / bernoulli", "mnist / categorical"]
    assert text.count("<table") == 2
    assert 'scope="row"' not in text  # a default index stays hidden, also in the second group (rows 2, 3)
    assert ">digits / bernoulli<" not in text.split("<table", 1)[1]  # the group column is the heading, not a cell


def test_without_group_one_table(tmp_path: Path) -> None:
    out = write_html(
        tmp_path / "r.html", title="t", verdict=["v"], table=_table().drop(columns="group"), column_docs={}, figures=[]
    )
    text = out.read_text(encoding="utf-8")
    assert text.count("<table") == 1 and "<h3>" not in text and "<figure" not in text


def test_missing_figure_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        write_html(tmp_path / "r.html", title="t", verdict=[], table=_table(), column_docs={}, figures=[("c", missing)])
    assert not (tmp_path / "r.html").exists()


def test_verdict_must_be_a_list(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="list of sentences"):
        write_html(tmp_path / "r.html", title="t", verdict="one string", table=_table(), column_docs={}, figures=[])


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_chromium
def test_chromium_screenshot(page: Path, tmp_path: Path) -> None:
    import matplotlib.image

    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    assert shot.is_file(), f"no screenshot (rc={proc.returncode}): {proc.stderr[-2000:]}"
    assert shot.stat().st_size > 10_000
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels[..., :3].var() > 1e-3, "the screenshot is a single uniform colour"


@needs_chromium
def test_chromium_dom(page: Path, tmp_path: Path) -> None:
    # The virtual-time budget lets the page finish loading (and `load` fire) before the DOM is dumped.
    proc = _chromium(tmp_path, "--dump-dom", "--virtual-time-budget=5000", page.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'data-images-ok="true"' in dom, dom[:500]
    assert 'data-table-rows="4"' in dom
