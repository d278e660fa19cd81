"""``python -m lorax_jax``: the ``lorax-jax`` command (`lorax_jax.cli`)."""

import sys

from lorax_jax.cli import main

sys.exit(main())
