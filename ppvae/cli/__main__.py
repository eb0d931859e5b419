"""``python -m ppvae.cli``: the same as the ``ppvae`` command."""

import sys

from ppvae.cli.app import main

sys.exit(main())
