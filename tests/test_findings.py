"""Findings: the sentences a diagnosis leads with follow from its numbers, on guides whose faults are known."""

from types import SimpleNamespace

import numpy as np
import pytest

import ppvae
from ppvae.diagnostics.findings import findings

from .test_evaluate import HALVED, X, exact_vae, lg_model, scaled_guide
from .test_gaps import GEN, IDX, linear_vae, set_encoder
from .test_gaps import X as XG

ONLY_PSIS = {"collapse": False, "gaps": False, "sbc": False, "reference": False}


def test_exact_guide_is_called_a_good_proposal():
    d = ppvae.diagnose(exact_vae(), X, num_samples=1000, **ONLY_PSIS)
    assert [f.text for f in findings(d)] == [
        "q is a good importance proposal (median PSIS k̂ −inf: constant weights): log p̂ (IWAE_1000) is reliable"
    ]
    assert [(f.code, f.severity) for f in findings(d)] == [("khat-good", "good")]
    assert d.to_dict()["findings"] == [f.to_dict() for f in d.findings()]
    assert d.report().startswith("- q is a good importance proposal")


def test_halved_guide_is_called_unreliable_first():
    d = ppvae.diagnose(lg_model, X, guide=scaled_guide(HALVED), num_samples=1000, **ONLY_PSIS)
    first = d.findings()[0].text
    assert (d.findings()[0].code, d.findings()[0].severity) == ("khat-unreliable", "warning")
    assert first.startswith("Importance sampling from q is unreliable on")
    assert f"{100 * d.share_khat_above:.0f}%" in first


@pytest.mark.filterwarnings("ignore:guide head")
def test_a_spoiled_encoder_is_blamed_not_the_family():
    """Full-rank head, exact family: the whole inference gap is amortization (test_gaps measures it exactly)."""
    vae = linear_vae(GEN, "fullrank")
    set_encoder(vae, GEN, shrink=0.5, widen=0.5, jitter=0.02)
    x = XG[IDX]
    d = ppvae.diagnose(vae, x, num_samples=1000, collapse=False, sbc=False, reference=False, num_gap_points=len(x),
                       gap_steps=300)  # fmt: skip
    f = [s.text for s in d.findings() if "limits q" in s.text]
    assert len(f) == 1 and f[0].startswith("The encoder limits q")


def _stub(**parts):
    """A diagnosis with hand-set parts, for the rules that read summaries only."""
    ev = SimpleNamespace(num_samples=1000, log_px=np.zeros(10))
    base = dict(evaluation=ev, khat=np.full(10, 0.3), khat_threshold=0.67, share_khat_above=0.0, gaps=None,
                reference=None, sbc=None, collapse=None)  # fmt: skip
    return SimpleNamespace(**{**base, **parts})


def test_sbc_rule_names_width_and_bias():
    u = 1 / np.sqrt(12)
    summary = {"p_value": 1e-20, "rank_sd": [u, 1.3 * u, u], "rank_mean": [0.5, 0.5, 0.7]}
    f = [x.text for x in findings(_stub(sbc=SimpleNamespace(summary=lambda: summary)))]
    assert "(p < 1e-16)" in f[-1]
    assert "U-shaped (q too narrow) in 1 and shifted (q biased) in 1 of 3 dimensions" in f[-1]
    summary = {"p_value": 0.4, "rank_sd": [u], "rank_mean": [0.5]}
    assert "no miscalibration" in str(findings(_stub(sbc=SimpleNamespace(summary=lambda: summary)))[-1])


def test_collapse_and_reference_rules():
    c = {"collapsed_dims": [2, 5], "latent_dim": 8, "active_units": 6, "mutual_information": 6.2,
         "mutual_information_max": np.log(500)}  # fmt: skip
    f = [x.text for x in findings(_stub(collapse=SimpleNamespace(summary=lambda: c)))]
    assert f[-3].startswith("2 of 8 latent dimensions collapsed") and "6 of 8" in f[-2] and "bound log M" in f[-1]
    ref = SimpleNamespace(rhat=np.array([1.0, 1.05]), index=[0], metrics={})
    assert "not converged" in str(findings(_stub(reference=ref))[-1])
    ref = SimpleNamespace(rhat=np.array([1.0]), index=[0, 1], metrics={"mean_error_sd": np.array([1.5, -2.0]),
                          "sd_ratio": np.array([0.5, 0.7])})  # fmt: skip
    last = findings(_stub(reference=ref))[-1]
    assert "off by 1.75 posterior sd" in last.text and "too narrow" in last.text
    assert (last.code, last.severity) == ("reference-off", "warning")
