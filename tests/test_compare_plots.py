import math

import numpy as np
import pytest

from ppvae.errors import DataError
from ppvae.report import compare_figures as cp


def _cell(label, group, rng, *, status="ok", images=True, d=4, n=50, m=80, shift=0.0):
    log_px = rng.normal(-90.0 + shift, 5.0, n)
    log_px[rng.integers(0, n, 3)] = np.nan
    khat = rng.normal(0.4, 0.2, n)
    khat[:2] = [np.nan, -np.inf]
    img = (lambda c: rng.uniform(size=(8, c, 6, 6))) if images else (lambda c: None)
    return {
        "label": label,
        "group": group,
        "status": status,
        "history": [
            {"epoch": e, "train_loss": 100.0 / e + 80, "val_elbo": None if e % 3 == 0 else -100.0 / e - 85}
            for e in range(1, 8)
        ],
        "log_px": log_px,
        "khat": khat,
        "khat_threshold": 0.7 if d > 1 else 0.62,
        "active_units": min(d, 3),
        "latent_dim": d,
        "z_mean": rng.normal(size=(m, d)),
        "labels": rng.integers(0, 5, m) if images else None,
        "originals": img(1),
        "reconstructions": img(1),
        "samples": img(1),
    }


@pytest.fixture
def cells():
    rng = np.random.default_rng(0)
    return [
        _cell("normal · bernoulli · diagonal", "binary 28×28", rng),
        _cell("vamp · bernoulli · fullrank (a long label to test layout)", "binary 28×28", rng, shift=2.0),
        _cell("normal · gaussian · diagonal", "continuous", rng, images=False, d=1, n=30),
        _cell("broken · bernoulli · flow", "binary 28×28", rng, status="failed"),
    ]


FIGURES = [
    cp.learning_curves,
    cp.log_px_differences,
    cp.khat_distributions,
    cp.active_units_plot,
    cp.latent_projections,
    cp.reconstructions_and_samples,
]


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f.__name__)
def test_figure_writes_a_png(cells, figure, tmp_path):
    import matplotlib.image

    out = figure(cells, tmp_path / "sub" / f"{figure.__name__}.png")
    assert out.exists() and out.suffix == ".png"
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and 120 <= img.shape[0] <= 4000 and 300 <= img.shape[1] <= 4000
    assert img[..., :3].std() > 0.01  # something was drawn


def test_figures_stay_legible_with_twenty_cells(tmp_path):
    import matplotlib.image

    rng = np.random.default_rng(1)
    many = [_cell(f"prior{k} · likelihood{k} · guide{k}", f"g{k % 2}", rng, shift=k / 4) for k in range(20)]
    out = cp.log_px_differences(many, tmp_path / "d.png")
    h = matplotlib.image.imread(out).shape[0]
    few = matplotlib.image.imread(cp.log_px_differences(many[:4], tmp_path / "d4.png")).shape[0]
    assert h > 1.5 * few  # the figure grows with the number of cells


def test_paired_difference_matches_hand_computation():
    a = np.array([-10.0, -12.0, np.nan, -9.0, -11.0, -8.0])
    b = np.array([-11.0, -12.5, -10.0, np.nan, -11.0, -9.5])
    # pairs kept: rows 0, 1, 4, 5 -> d = 1.0, 0.5, 0.0, 1.5
    d = np.array([1.0, 0.5, 0.0, 1.5])
    mean = d.sum() / 4  # 0.75
    sd = math.sqrt(((d - mean) ** 2).sum() / 3)
    m, se = cp.paired_difference(a, b)
    assert m == pytest.approx(0.75)
    assert se == pytest.approx(sd / 2)  # sqrt(4) = 2
    assert cp.paired_difference(a, a) == (0.0, 0.0)
    m2, se2 = cp.paired_difference(b, a)
    assert m2 == pytest.approx(-0.75) and se2 == pytest.approx(se)


def test_paired_difference_rejects_bad_input():
    with pytest.raises(ValueError, match="same rows"):
        cp.paired_difference(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="no row"):
        cp.paired_difference(np.array([np.nan, 1.0]), np.array([1.0, np.nan]))


def test_best_cell_sits_at_zero_and_others_below(cells, tmp_path):
    # the second binary cell is shifted up by 2 nats: it is the group's best; the first is ~2 nats below
    a, b = cells[0]["log_px"], cells[1]["log_px"]
    m, se = cp.paired_difference(a, b)
    assert m < 0 and se > 0
    cp.log_px_differences(cells, tmp_path / "d.png")


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f.__name__)
def test_figure_without_usable_cell_raises(cells, figure, tmp_path):
    failed = [dict(c, status="failed") for c in cells]
    with pytest.raises(ValueError, match="status 'ok'"):
        figure(failed, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_non_image_cells_only_cannot_make_the_image_figure(cells, tmp_path):
    with pytest.raises(DataError):
        cp.reconstructions_and_samples([cells[2]], tmp_path / "x.png")


def test_group_with_mismatched_rows_is_an_error(cells, tmp_path):
    cells[1]["log_px"] = cells[1]["log_px"][:-1]
    with pytest.raises(DataError, match="same test rows"):
        cp.log_px_differences(cells, tmp_path / "x.png")


def test_cell_without_common_rows_is_annotated_not_fatal(cells, tmp_path):
    cells[0]["log_px"] = np.where(np.isfinite(cells[1]["log_px"]), np.nan, -80.0)  # finite only where best is NaN
    assert cp.log_px_differences(cells, tmp_path / "d.png").exists()


def _no_pyplot(monkeypatch):
    """Make every way a figure function could touch global matplotlib state fail; return the backend before."""
    import matplotlib
    import matplotlib.pyplot as plt

    def refuse(*args, **kwargs):
        raise AssertionError("a figure function touched pyplot or the backend")

    backend = matplotlib.get_backend()
    for owner, name in ((matplotlib, "use"), (plt, "switch_backend"), (plt, "figure"), (plt, "imsave")):
        monkeypatch.setattr(owner, name, refuse)
    return backend


def _global_state_is_unchanged(backend):
    import matplotlib
    import matplotlib.pyplot as plt

    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == []


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f.__name__)
def test_figures_leave_the_backend_and_pyplot_alone(cells, figure, tmp_path, monkeypatch):
    backend = _no_pyplot(monkeypatch)
    assert figure(cells, tmp_path / "f.png").exists()
    _global_state_is_unchanged(backend)


def test_diagnosis_figures_leave_the_backend_and_pyplot_alone(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from ppvae.report import figures as plots

    rng = np.random.default_rng(0)
    reference = SimpleNamespace(index=np.array([3, 7]), draws=rng.normal(size=(2, 2, 50, 3)),
                                guide_draws=rng.normal(size=(2, 40, 3)))  # fmt: skip
    backend = _no_pyplot(monkeypatch)
    written = [
        plots.image_grid(torch.rand(5, 1, 8, 8), tmp_path / "grid.png"),
        plots.image_grid(torch.rand(4, 3, 6, 6), tmp_path / "rgb.png"),
        plots.khat_plot(np.array([0.1, 0.6, 0.9, np.nan, -np.inf]), 0.7, tmp_path / "khat.png"),
        plots.kl_per_dim_plot(np.array([2.0, 0.001, 0.5]), tmp_path / "kl.png"),
        plots.reference_plot(reference, tmp_path / "reference.png"),
    ]
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    _global_state_is_unchanged(backend)
