"""`python -m qkd_jax.import_teacher`: a torchvision weights file as a finished teacher phase (qkd_jax/run/import_teacher_cli.py)."""

import sys

from qkd_jax.run.import_teacher_cli import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
