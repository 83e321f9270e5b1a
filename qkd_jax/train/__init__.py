"""Training: optimizers (optax parameter groups) and schedules, train state, pure steps,
parallel runner, phases, checkpoints, loop and metrics.

Import the submodules directly, e.g. `from qkd_jax.train import optim`.
"""
