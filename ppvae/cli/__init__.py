"""The ``ppvae`` command line: one module per command group, flags checked by argparse types."""

from ppvae.cli.app import main

__all__ = ["main"]
