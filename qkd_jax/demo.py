"""`python -m qkd_jax.demo`: the README's main job (qkd_jax/run/demo.py)."""

from qkd_jax.run.demo import comparison_table, main

__all__ = ["comparison_table", "main"]

if __name__ == "__main__":
    from absl import app

    app.run(main)
