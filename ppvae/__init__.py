"""ppvae: probabilistic-programming variational autoencoders."""

__version__ = "0.1.0"
