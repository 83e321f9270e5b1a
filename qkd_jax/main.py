"""`python -m qkd_jax.main`: the run command line (qkd_jax/run/cli.py)."""

from qkd_jax.run.cli import main, run_cli

__all__ = ["main", "run_cli"]

if __name__ == "__main__":
    run_cli()
