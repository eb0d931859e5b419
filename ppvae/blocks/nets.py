"""Encoder and decoder networks: plain PyTorch, no Pyro.

An encoder maps data ``x: (*batch, *data_shape)`` to features ``h: (*batch, out_features)`` read by a guide head;
a decoder maps latents ``z: (*batch, latent_dim)`` to likelihood parameters ``(*batch, *out_shape)`` where
``out_shape = (num_params, *data_shape)`` is set by the likelihood head. Leading batch dimensions are arbitrary
(vectorized particles add one), so every network flattens them and restores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from ppvae.blocks.registry import Registry
from ppvae.errors import ConfigError

__all__ = ["NETWORKS", "MLPEncoder", "MLPDecoder", "ConvEncoder", "ConvDecoder"]

NETWORKS = Registry("network")

_ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU}


def _activation(name: str) -> type[nn.Module]:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


def _mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers between consecutive ``sizes`` with ``activation`` between (not after the last)."""
    act = _activation(activation)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


@NETWORKS.register("mlp-encoder")
class MLPEncoder(nn.Module):
    """Fully connected encoder: flatten ``x`` and apply ``hidden`` layers with an activation after each.

    ``hidden=()`` gives the identity on the flattened data (a linear guide head then makes a linear encoder,
    the exact posterior family of the linear-Gaussian model).
    """

    def __init__(self, data_shape: Sequence[int], hidden: Sequence[int] = (400,), activation: str = "softplus"):
        super().__init__()
        self.data_shape = tuple(data_shape)
        d = math.prod(self.data_shape)
        self.out_features = hidden[-1] if hidden else d
        self.net = _mlp([d, *hidden], activation)
        if hidden:
            self.net.append(_activation(activation)())

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[: x.dim() - len(self.data_shape)]
        return self.net(x.reshape(*batch, -1))


@NETWORKS.register("mlp-decoder")
class MLPDecoder(nn.Module):
    """Fully connected decoder: ``latent_dim → hidden… → prod(out_shape)``, reshaped to ``out_shape``."""

    def __init__(
        self,
        latent_dim: int,
        out_shape: Sequence[int],
        hidden: Sequence[int] = (400,),
        activation: str = "softplus",
    ):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.net = _mlp([latent_dim, *hidden, math.prod(self.out_shape)], activation)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).reshape(*z.shape[:-1], *self.out_shape)


def _image_shape(data_shape: Sequence[int], what: str) -> tuple[int, int, int]:
    if len(data_shape) != 3:
        raise ConfigError(
            f"the {what} needs images shaped (channels, height, width), got data_shape {tuple(data_shape)}; "
            "use encoder='mlp' for flat data"
        )
    return tuple(data_shape)  # type: ignore[return-value]


@NETWORKS.register("conv-encoder")
class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (3×3, padding 1) then a linear layer to ``out_features``.

    Works for any image size: 8×8 digits become 2×2 maps, 28×28 images 7×7 maps.
    """

    def __init__(
        self, data_shape: Sequence[int], channels: int = 32, out_features: int = 256, activation: str = "relu"
    ):
        super().__init__()
        c, h, w = _image_shape(data_shape, "conv encoder")
        self.data_shape = (c, h, w)
        self.out_features = out_features
        act = _activation(activation)
        self.conv = nn.Sequential(
            nn.Conv2d(c, channels, 3, stride=2, padding=1),
            act(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            act(),
        )
        hh, ww = -(-h // 4), -(-w // 4)
        self.fc = nn.Sequential(nn.Linear(2 * channels * hh * ww, out_features), act())

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[:-3]
        h = self.conv(x.reshape(-1, *self.data_shape))
        return self.fc(h.flatten(1)).reshape(*batch, self.out_features)


@NETWORKS.register("conv-decoder")
class ConvDecoder(nn.Module):
    """Linear layer to a ``(2c, ⌈H/4⌉, ⌈W/4⌉)`` map, two stride-2 transposed convolutions, crop to H×W.

    ``out_shape = (num_params, C, H, W)``: the last layer has ``num_params·C`` channels, split per parameter.
    """

    def __init__(self, latent_dim: int, out_shape: Sequence[int], channels: int = 32, activation: str = "relu"):
        super().__init__()
        if len(out_shape) != 4:
            raise ConfigError(
                f"the conv decoder needs images shaped (channels, height, width), got {tuple(out_shape[1:])}; "
                "use decoder='mlp' for flat data"
            )
        self.out_shape = tuple(out_shape)
        p, c, h, w = self.out_shape
        act = _activation(activation)
        self.start = (2 * channels, -(-h // 4), -(-w // 4))
        self.fc = nn.Sequential(nn.Linear(latent_dim, math.prod(self.start)), act())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
            act(),
            nn.ConvTranspose2d(channels, p * c, 4, stride=2, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *self.start)
        p, c, hh, ww = self.out_shape
        out = self.deconv(h)[..., :hh, :ww]
        return out.reshape(*batch, *self.out_shape)


def build_encoder(spec: str | dict | nn.Module, data_shape: Sequence[int]) -> nn.Module:
    """Build an encoder from ``"mlp"``/``"conv"`` (or a full registered name, spec dict, or a module).

    A user's module must expose ``out_features`` (the width of the features it returns).
    """
    spec = _short_name(spec, "encoder")
    enc = NETWORKS.build(spec, data_shape=tuple(data_shape))
    if not isinstance(getattr(enc, "out_features", None), int):
        raise ConfigError(
            f"encoder {type(enc).__name__} has no integer attribute 'out_features'; set it to the width of "
            "the features its forward returns"
        )
    return enc


def build_decoder(spec: str | dict | nn.Module, latent_dim: int, out_shape: Sequence[int]) -> nn.Module:
    """Build a decoder from ``"mlp"``/``"conv"`` (or a full registered name, spec dict, or a module)."""
    return NETWORKS.build(_short_name(spec, "decoder"), latent_dim=latent_dim, out_shape=tuple(out_shape))


def _short_name(spec: str | dict | nn.Module, role: str) -> str | dict | nn.Module:
    if isinstance(spec, str) and spec in ("mlp", "conv"):
        return f"{spec}-{role}"
    if isinstance(spec, dict) and spec.get("name") in ("mlp", "conv"):
        return {**spec, "name": f"{spec['name']}-{role}"}
    return spec
