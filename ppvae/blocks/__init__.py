"""Building blocks of a VAE, each a module whose ``forward`` returns a ``torch.distributions.Distribution``.

:mod:`~ppvae.blocks.priors` p(z), :mod:`~ppvae.blocks.likelihoods` p(x|z), :mod:`~ppvae.blocks.guides` q(z|x),
:mod:`~ppvae.blocks.nets` the encoder and decoder networks; :mod:`~ppvae.blocks.registry` records each block's
JSON spec so a model saves as configuration plus weights; :mod:`~ppvae.blocks.specs` reads specs as users write
them (``"normal:scale=learned"``); :mod:`~ppvae.blocks.discretize` scores continuous likelihoods as probabilities of
grey levels; :func:`~ppvae.blocks.torch_dist.as_pyro` lets a plain torch distribution (a zuko flow) stand at a
Pyro sample site.
"""

from ppvae.blocks.guides import GUIDES
from ppvae.blocks.likelihoods import LIKELIHOODS
from ppvae.blocks.nets import NETWORKS
from ppvae.blocks.priors import PRIORS
from ppvae.blocks.torch_dist import as_pyro

__all__ = ["PRIORS", "LIKELIHOODS", "GUIDES", "NETWORKS", "as_pyro"]
