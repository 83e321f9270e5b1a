"""`python -m qkd_jax.demo`: the README's main job (qkd_jax/run/demo.py)."""

from qkd_jax.run.demo import comparison_table, main, run_cli

__all__ = ["comparison_table", "main", "run_cli"]

if __name__ == "__main__":
    run_cli()
