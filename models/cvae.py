"""Conditional VAE for structured output: complete an image from 1, 2 or 3 of its quadrants (Sohn et al. 2015).

An image x (binary pixels, an even side) is split into the quadrants it shows, o (1: top left; 2: the top half;
3: all but the bottom right), and the pixels it hides, y. The CVAE (``kind="cvae"``) is

    z | x_o      ~ N(μ_p(x_o), diag σ_p(x_o)²)                     prior network
    y | z        ~ Π_{j hidden} Bernoulli(σ(g(z)_j))                generation network
    q(z | x_o, y) = N(μ_q(x), diag σ_q(x)²)                         recognition network (sees the whole image)

and the baseline (``kind="baseline"``) is the deterministic network of Pyro's CVAE tutorial, y | x_o ~
Π_j Bernoulli(σ(h(x_o)_j)), with no latent. Both observe the whole image at one site ``x`` and mask the shown
pixels out of its log-density, so ppvae's importance-sampled log p̂ of either is log p(y | x_o), the conditional
log-likelihood Sohn et al. and Pyro's tutorial report (negated, nats per image; exact for the baseline). At the
shown pixels the site's distribution is a point mass on x_o (logits ±30), so data the model simulates keep the
shown quadrants the prior was conditioned on, and SBC stays calibrated.

Train one with (options: kind, quadrants, hidden)

    ppvae train --model models/cvae.py --dataset fashion-mnist --binarize static --latent-dim 32 \\
        --model-option quadrants=1 --epochs 10 --out runs/cvae1
    ppvae evaluate runs/cvae1          # −log p̂ is the negative conditional log-likelihood

``benchmarks/bench_cvae.py`` trains the baseline and the CVAE side by side for 1, 2 and 3 quadrants (its table is
in the README's zoo and ``benchmarks/RESULTS.md``). On binarized Fashion-MNIST, 10 epochs each (hidden 500, latent
32; 2026-12-04, one thread), −log p̂(y | x_o) over the 10,000 test images (IWAE_100) was

    quadrants shown        1       2       3
    baseline           221.6   142.2    66.2   nats per image (exact: no latent)
    CVAE               189.5   126.1    64.6

and the tests check, on a synthetic two-mode completion, that the CVAE reaches near the exact log 1/2 where the
baseline can only average (``tests/test_models.py``). The model cannot generate without an image to complete
(``model(None)`` says so), so ``ppvae sample`` does not apply.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

_SHOWN_LOGIT = 30.0  # a shown pixel's logit: probability 1 − 1e-13 of its own value, masked out of the density


def quadrant_mask(side: int, quadrants: int) -> torch.Tensor:
    """``(side, side)`` bool, True where a pixel is shown: 1 = top left, 2 = top half, 3 = all but bottom right."""
    if quadrants not in (1, 2, 3):
        raise ValueError(f"quadrants must be 1, 2 or 3 (how many the model sees); got {quadrants!r}")
    h = side // 2
    shown = torch.zeros(side, side, dtype=torch.bool)
    shown[:h, :h] = True
    if quadrants >= 2:
        shown[:h, h:] = True
    if quadrants == 3:
        shown[h:, :h] = True
    return shown


def _mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class _Completion(nn.Module):
    """What both pairs share: the mask, the network input (x_o, hidden pixels at −1) and the observation site."""

    def __init__(self, data_shape: tuple[int, ...], quadrants: int) -> None:
        super().__init__()
        side = data_shape[-1]
        square = len(data_shape) in (2, 3) and data_shape[-2] == side and side % 2 == 0
        if not square or (len(data_shape) == 3 and data_shape[0] != 1):
            raise ValueError(f"the CVAE completes square one-channel images of an even side; got shape {data_shape}")
        self.data_shape, self.quadrants = tuple(data_shape), quadrants
        self.register_buffer("shown", quadrant_mask(side, quadrants).flatten())
        self.pixels = side * side

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, pixels)``: the shown pixels as they are, the hidden ones at −1 (as Pyro's tutorial marks them)."""
        return torch.where(self.shown, x.flatten(1), -1.0)

    def observe(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        """The image at site ``x``: hidden pixels Bernoulli(σ(logits)), shown ones a point mass on their value."""
        flat = x.flatten(1)
        logits = torch.where(self.shown, (2.0 * flat - 1.0) * _SHOWN_LOGIT, logits)
        pixel = dist.Bernoulli(logits=logits).mask(~self.shown).to_event(1)
        pyro.sample("x", pixel, obs=flat)

    def _need(self, x: torch.Tensor | None) -> torch.Tensor:
        if x is None:
            raise ValueError("the CVAE completes images: it needs one to take the shown quadrants from (model(x))")
        return x


class Baseline(_Completion):
    """y | x_o ~ Bernoulli(σ(h(x_o))): the deterministic network the CVAE is measured against."""

    def __init__(self, data_shape: tuple[int, ...], quadrants: int = 1, hidden: int = 500) -> None:
        super().__init__(data_shape, quadrants)
        self.net = _mlp(self.pixels, hidden, hidden, self.pixels)

    def model(self, x: torch.Tensor | None = None, batch_size: int = 1) -> None:
        x = self._need(x)
        pyro.module("baseline", self)
        with pyro.plate("data", x.shape[0]):
            self.observe(x, self.net(self.inputs(x)))

    def guide(self, x: torch.Tensor | None = None, batch_size: int = 1) -> None:
        pass  # no latent


class CVAE(_Completion):
    """The conditional VAE above: prior, generation and recognition networks of ``hidden`` units."""

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, quadrants: int = 1, hidden: int = 500) -> None:
        super().__init__(data_shape, quadrants)
        self.latent_dim = latent_dim
        self.prior_net = _mlp(self.pixels, hidden, hidden, 2 * latent_dim)
        self.generation_net = _mlp(latent_dim, hidden, hidden, self.pixels)
        self.recognition_net = _mlp(self.pixels, hidden, hidden, 2 * latent_dim)

    @staticmethod
    def _normal(out: torch.Tensor) -> dist.Distribution:
        loc, raw = out.chunk(2, dim=-1)
        return dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1)

    def model(self, x: torch.Tensor | None = None, batch_size: int = 1) -> None:
        x = self._need(x)
        pyro.module("cvae", self)
        seen = self.inputs(x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self._normal(self.prior_net(seen)))
            self.observe(x, self.generation_net(z))

    def guide(self, x: torch.Tensor | None = None, batch_size: int = 1) -> None:
        x = self._need(x)
        pyro.module("cvae", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self._normal(self.recognition_net(x.flatten(1))))


def build(data_shape: tuple[int, ...], latent_dim: int, splits=None, kind: str = "cvae", quadrants: int = 1,
          hidden: int = 500) -> nn.Module:  # fmt: skip
    """Entry point for ``ppvae train --model models/cvae.py``: ``kind`` is ``"cvae"`` or ``"baseline"``."""
    if splits is not None and splits.levels != 2:
        raise ValueError("the CVAE's pixels are Bernoulli: binarize the data (ppvae train --binarize static)")
    if kind == "cvae":
        return CVAE(tuple(data_shape), latent_dim, quadrants, hidden)
    if kind == "baseline":
        return Baseline(tuple(data_shape), quadrants, hidden)
    raise ValueError(f"kind must be 'cvae' or 'baseline'; got {kind!r}")
