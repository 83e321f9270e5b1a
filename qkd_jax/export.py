"""`python -m qkd_jax.export`: integer export of a run's phase (qkd_jax/run/export_cli.py)."""

import sys

from qkd_jax.run.export_cli import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
