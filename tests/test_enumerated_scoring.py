"""Enumerated discrete latents are summed exactly in scoring: log-weights and ELBO against closed forms and Pyro.

A two-component mixture with a continuous latent, x = μ_y + z + ε, z ~ N(0, 1), ε ~ N(0, σ²), has
p(x) = Σ_y π_y N(x; μ_y, 1 + σ²). The label is enumerated by the model (the guide draws z only) or by the guide
(q(y | x), then q(z | x, y): the semi-supervised M2 shape). A hidden Markov chain with enumerated states under
``pyro.markov`` has its exact likelihood from the forward algorithm.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

import ppvae
from ppvae.infer.logweights import log_weights

PI = torch.tensor([0.3, 0.7])
MU = torch.tensor([-2.0, 1.5])
SIGMA = 0.5


def exact_log_px(x: torch.Tensor) -> torch.Tensor:
    comp = dist.Normal(MU, math.sqrt(1 + SIGMA**2)).log_prob(x.unsqueeze(-1)) + PI.log()
    return comp.logsumexp(-1)


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        y = pyro.sample("y", dist.Categorical(PI), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(MU[y] + z, SIGMA), obs=x)


def guide_z(x):
    # A deliberately imperfect q(z | x) (the exact posterior is a mixture): weights then vary.
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.3 * x, 0.9))


def model_m2(x):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(PI))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(MU[y] + z, SIGMA), obs=x)


@config_enumerate
def guide_m2(x):
    with pyro.plate("data", x.shape[0]):
        logits = torch.stack([-x, x], -1)  # a crude classifier q(y | x)
        y = pyro.sample("y", dist.Categorical(logits=logits))
        pyro.sample("z", dist.Normal(0.5 * (x - MU[y]), 0.7))


X = torch.tensor([-2.5, -0.3, 0.4, 1.2, 3.0])


@pytest.mark.parametrize("pair", [(model, guide_z), (model_m2, guide_m2)], ids=["model-enumerated", "guide-enumerated"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_log_px_converges_to_the_exact_marginal(pair, vectorize):
    pyro.set_rng_seed(0)
    lw = log_weights(*pair, X, num_samples=20000 if vectorize else 3000, enumerate=True, vectorize=vectorize)
    assert lw.shape == (5, 20000 if vectorize else 3000)
    log_px = lw.double().logsumexp(1) - math.log(lw.shape[1])
    tol = 0.01 if vectorize else 0.05
    torch.testing.assert_close(log_px, exact_log_px(X).double(), atol=tol, rtol=0)


def test_model_enumerated_weights_are_the_closed_form_sum_over_labels():
    pyro.set_rng_seed(1)
    lw = log_weights(model, guide_z, X, num_samples=3, enumerate=True, max_plate_nesting=1)  # (N, S)
    # The same draws of z (the guide's one draw, (S, N), from the same seed: no dry run to find the plates),
    # summed over y by hand.
    pyro.set_rng_seed(1)
    z = dist.Normal(0.3 * X, 0.9).expand([3, 5]).sample()
    by_hand = (
        (dist.Normal(MU + z.unsqueeze(-1), SIGMA).log_prob(X.unsqueeze(-1)) + PI.log()).logsumexp(-1)
        + dist.Normal(0.0, 1.0).log_prob(z)
        - dist.Normal(0.3 * X, 0.9).log_prob(z)
    )
    torch.testing.assert_close(lw, by_hand.T)


@pytest.mark.parametrize("pair", [(model, guide_z), (model_m2, guide_m2)], ids=["model-enumerated", "guide-enumerated"])
def test_elbo_equals_pyros_trace_enum_elbo_on_the_same_draws(pair):
    pyro.set_rng_seed(2)
    _, elbo = log_weights(*pair, X, num_samples=1, enumerate=True, vectorize=False, with_elbo=True, max_plate_nesting=1)
    pyro.set_rng_seed(2)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(*pair, X)
    assert elbo.sum().item() == pytest.approx(-loss, rel=1e-5)


def test_guide_enumerated_elbo_is_the_q_weighted_average_not_the_stratified_bound():
    pyro.set_rng_seed(3)
    lw, elbo = log_weights(model_m2, guide_m2, X, num_samples=2000, enumerate=True, with_elbo=True)
    # Jensen: the stratified weights' mean log is a tighter bound than the pair's own ELBO, both below log p(x).
    exact = exact_log_px(X)
    assert torch.all(elbo.mean(1) < lw.mean(1))
    assert torch.all(lw.mean(1) < exact + 0.01)


def test_sampling_without_enumerate_is_the_same_estimator_in_expectation():
    pyro.set_rng_seed(4)
    sampled = log_weights(model_m2, guide_m2, X, num_samples=40000)
    log_px = sampled.double().logsumexp(1) - math.log(sampled.shape[1])
    torch.testing.assert_close(log_px, exact_log_px(X).double(), atol=0.03, rtol=0)


# --- a hidden Markov chain: states enumerated under pyro.markov, exact likelihood by the forward algorithm ---
TRANS = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
EMIT = torch.tensor([-1.0, 1.0])
INIT = torch.tensor([0.5, 0.5])


def hmm(seqs):
    n, t_max = seqs.shape
    with pyro.plate("data", n):
        s = pyro.sample("s_0", dist.Categorical(INIT), infer={"enumerate": "parallel"})
        pyro.sample("x_0", dist.Normal(EMIT[s], 1.0), obs=seqs[:, 0])
        for t in pyro.markov(range(1, t_max)):
            s = pyro.sample(f"s_{t}", dist.Categorical(TRANS[s]), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Normal(EMIT[s], 1.0), obs=seqs[:, t])


def hmm_guide(seqs):
    pass


def forward(seq: torch.Tensor) -> float:
    alpha = INIT.log() + dist.Normal(EMIT, 1.0).log_prob(seq[0])
    for x in seq[1:]:
        alpha = (alpha.unsqueeze(-1) + TRANS.log()).logsumexp(0) + dist.Normal(EMIT, 1.0).log_prob(x)
    return alpha.logsumexp(0).item()


def test_a_markov_chain_of_enumerated_states_is_summed_exactly():
    seqs = torch.tensor([[-1.2, -0.8, 1.1, 0.9, 1.3, -0.2], [0.3, 0.1, -0.4, -1.5, -0.9, -1.1]])
    lw = log_weights(hmm, hmm_guide, seqs, num_samples=3, enumerate=True)
    expected = torch.tensor([forward(s) for s in seqs])
    torch.testing.assert_close(lw, expected.unsqueeze(1).expand(2, 3))


def test_evaluate_sums_enumerated_labels_and_reports_pyros_elbo():
    """Through the public path: evaluate's log p̂ is the exact marginal (the HMM has no continuous latent, so
    every weight is exact and ELBO = log p̂ = log p(x)); on the mixture, log p̂ is near the closed form."""
    seqs = torch.tensor([[-1.2, -0.8, 1.1, 0.9, 1.3, -0.2], [0.3, 0.1, -0.4, -1.5, -0.9, -1.1]])
    ev = ppvae.evaluate(hmm, seqs, guide=hmm_guide, num_samples=4, seed=0)
    expected = [forward(s) for s in seqs]
    assert ev.log_px.tolist() == pytest.approx(expected, abs=1e-4)
    assert ev.elbo.tolist() == pytest.approx(expected, abs=1e-4)
    ev = ppvae.evaluate(model_m2, X, guide=guide_m2, num_samples=5000, seed=0)
    assert ev.log_px.tolist() == pytest.approx(exact_log_px(X).tolist(), abs=0.02)
    assert ev.particles == "vectorized"


def _pixel_mixture(mask):
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("pixels", x.shape[1], dim=-1):
            with pyro.poutine.mask(mask=mask):
                y = pyro.sample("y", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
                pyro.sample("x", dist.Normal(2.0 * y, 1.0), obs=x)

    return model


def test_an_enumerated_latent_per_pixel_is_summed_per_pixel_and_a_mask_leaves_pixels_out():
    """y enumerated inside a pixel plate nested in the data plate: log p(x_n) = Σ_d log Σ_y p(y) p(x_nd | y). A
    masked pixel contributes nothing (its y's probabilities still sum to 1, as in TraceEnum_ELBO; masking them to
    0 for each value would have added log 2 per masked pixel)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    per_pixel = torch.stack(
        [math.log(0.7) + dist.Normal(0.0, 1.0).log_prob(x), math.log(0.3) + dist.Normal(2.0, 1.0).log_prob(x)]
    ).logsumexp(0)
    for mask, kept in ((torch.ones(4, dtype=torch.bool), slice(None)), (torch.arange(4) > 0, slice(1, None))):
        lw, elbo = log_weights(_pixel_mixture(mask), hmm_guide, x, num_samples=2, enumerate=True, with_elbo=True)
        expected = per_pixel[:, kept].sum(-1, keepdim=True).expand(3, 2)
        torch.testing.assert_close(lw, expected)
        torch.testing.assert_close(elbo, expected)  # no continuous latent: the ELBO is log p(x)
        loss = TraceEnum_ELBO(max_plate_nesting=2).loss(_pixel_mixture(mask), hmm_guide, x)
        assert -loss == pytest.approx(expected[:, 0].sum().item(), rel=1e-5)


Q = torch.tensor([[0.6, 0.4], [0.3, 0.7]])


@config_enumerate
def chain_guide(seqs):
    """q(s | x): a Markov chain of its own, enumerated by the guide."""
    n, t_max = seqs.shape
    with pyro.plate("data", n):
        s = pyro.sample("s_0", dist.Categorical(logits=torch.stack([-seqs[:, 0], seqs[:, 0]], -1)))
        for t in pyro.markov(range(1, t_max)):
            s = pyro.sample(f"s_{t}", dist.Categorical(Q[s]))


def brute_force(seq: torch.Tensor) -> tuple[float, float]:
    """log p(x) and the ELBO E_q[log p(x, s) − log q(s)] of ``chain_guide`` by summing over all 2^T paths."""
    log_p, log_q = [], []
    q0 = torch.log_softmax(torch.stack([-seq[0], seq[0]]), -1)
    for path in itertools.product(range(2), repeat=len(seq)):
        lp = INIT[path[0]].log() + dist.Normal(EMIT[path[0]], 1.0).log_prob(seq[0])
        lq = q0[path[0]]
        for t in range(1, len(seq)):
            lp = lp + TRANS[path[t - 1], path[t]].log() + dist.Normal(EMIT[path[t]], 1.0).log_prob(seq[t])
            lq = lq + Q[path[t - 1], path[t]].log()
        log_p.append(lp)
        log_q.append(lq)
    lp, lq = torch.stack(log_p), torch.stack(log_q)
    return lp.logsumexp(0).item(), (lq.exp() * (lp - lq)).sum().item()


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_chain_both_sides_mark_for_enumeration_is_the_guides_and_exact(vectorize):
    """The model marks its states for enumeration and so does the guide (config_enumerate on both, as Pyro's HMM
    examples do): the guide's enumerated values are replayed in the model, not enumerated again on dims of the
    model's own, which shifted every later dim and gave wrong log p̂ and ELBO with no warning."""
    seqs = torch.tensor([[-1.2, -0.8, 1.1, 0.9, 1.3, -0.2], [0.3, 0.1, -0.4, -1.5, -0.9, -1.1]])
    truth = torch.tensor([brute_force(s) for s in seqs])
    lw, elbo = log_weights(hmm, chain_guide, seqs, num_samples=2, enumerate=True, with_elbo=True, vectorize=vectorize)
    torch.testing.assert_close(lw, truth[:, :1].expand(2, 2))  # every path taken: exact whatever q
    torch.testing.assert_close(elbo, truth[:, 1:].expand(2, 2))
    ev = ppvae.evaluate(hmm, seqs, guide=chain_guide, num_samples=2, seed=0)
    assert ev.log_px.tolist() == pytest.approx(truth[:, 0].tolist(), abs=1e-4)
    assert ev.elbo.tolist() == pytest.approx(truth[:, 1].tolist(), abs=1e-4)


@pytest.mark.parametrize("vectorize", [True, False])
def test_one_datapoint_and_one_particle_are_scored_like_any_other(vectorize):
    """A data plate of size 1 (the last batch of N = k·B + 1) and a particle plate of size 1 are no dim of any
    packed term; the enumerated sum must still come back as (N, S)."""
    for x, s in ((X[:1], 4), (X, 1), (X[:1], 1)):
        lw, elbo = log_weights(model, guide_z, x, num_samples=s, enumerate=True, vectorize=vectorize, with_elbo=True)
        assert lw.shape == elbo.shape == (len(x), s)
    pyro.set_rng_seed(0)
    lw = log_weights(model, guide_z, X[:1], num_samples=4000, enumerate=True, vectorize=vectorize)
    log_px = lw.double().logsumexp(1) - math.log(lw.shape[1])
    assert log_px.item() == pytest.approx(exact_log_px(X[:1]).item(), abs=0.05)
    ev = ppvae.evaluate(model, X, guide=guide_z, num_samples=20000, seed=0, batch_size=4)  # last batch: 1 datapoint
    assert ev.log_px.tolist() == pytest.approx(exact_log_px(X).tolist(), abs=0.03)


def test_a_mask_set_on_the_distribution_leaves_pixels_out_like_poutine_mask():
    """``Distribution.mask()`` keeps its mask inside ``log_prob``: the enumerated site's unmasked probabilities are
    read from the distribution under the mask, so a masked pixel adds nothing (not log 2, as TraceEnum_ELBO adds)."""

    def dist_masked(mask):
        def model(x):
            with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("pixels", x.shape[1], dim=-1):
                y = pyro.sample("y", dist.Bernoulli(0.3).mask(mask), infer={"enumerate": "parallel"})
                pyro.sample("x", dist.Normal(2.0 * y, 1.0).mask(mask), obs=x)

        return model

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    mask = torch.arange(4) > 0
    expected = log_weights(_pixel_mixture(mask), hmm_guide, x, num_samples=2, enumerate=True)
    per_pixel = torch.stack(
        [math.log(0.7) + dist.Normal(0.0, 1.0).log_prob(x), math.log(0.3) + dist.Normal(2.0, 1.0).log_prob(x)]
    ).logsumexp(0)
    torch.testing.assert_close(expected, per_pixel[:, 1:].sum(-1, keepdim=True).expand(3, 2))
    lw, elbo = log_weights(dist_masked(mask), hmm_guide, x, num_samples=2, enumerate=True, with_elbo=True)
    torch.testing.assert_close(lw, expected)
    torch.testing.assert_close(elbo, expected)
