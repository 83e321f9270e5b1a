"""Learning-rate schedules as optax schedules: functions of the global step `s` (updates done so far).

With `lr0` the base rate, `spe` steps per epoch, `e = s // spe` the epoch, `N` total steps:

- `constant`:      `lr0`
- `cosine_epoch`:  `lr0 * (1 + cos(pi * e / E)) / 2`, `E = ceil(N / spe)` epochs; constant within an
                   epoch (torch `CosineAnnealingLR(T_max=epochs)` stepped once per epoch).
- `cosine_step`:   `lr0 * (1 + cos(pi * min(s, N) / N)) / 2` (the same, stepped every iteration).
- `warmup_cosine`: `lr_w + (lr0 - lr_w) * s / W` for `s < W`, then
                   `lr0 * (1 + cos(pi * min(s - W, N - W) / (N - W))) / 2`
                   (the SQAKD Tiny-ImageNet recipe: W = 2500 iterations, lr_w = 1e-4).
- `step`:          `lr0 * factor ** #{m in decay_epochs : e >= m}` (torch `MultiStepLR` per epoch).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("constant", "cosine_epoch", "cosine_step", "warmup_cosine", "step")


def _half_cosine(lr0: float, progress: jnp.ndarray) -> jnp.ndarray:
    """`lr0 * (1 + cos(pi * progress)) / 2` for progress in [0, 1]."""
    return lr0 * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))


def constant(lr0: float) -> optax.Schedule:
    """`lr0` at every step."""
    return lambda step: jnp.asarray(lr0, jnp.float32)


def cosine_epoch(lr0: float, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    """Cosine annealing to 0 stepped once per epoch: `lr0 * (1 + cos(pi * e / E)) / 2`."""
    def schedule(step):
        epoch = jnp.asarray(step) // steps_per_epoch
        return _half_cosine(lr0, epoch.astype(jnp.float32) / num_epochs)
    return schedule


def cosine_step(lr0: float, total_steps: int) -> optax.Schedule:
    """Cosine annealing to 0 stepped every iteration: `lr0 * (1 + cos(pi * s / N)) / 2`."""
    return lambda step: _half_cosine(lr0, jnp.asarray(step, jnp.float32) / total_steps)


def warmup_cosine(lr0: float, warmup_steps: int, total_steps: int, init_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup from `init_lr` to `lr0` over `warmup_steps`, then per-iteration cosine to 0."""
    if warmup_steps == 0:
        return cosine_step(lr0, total_steps)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = init_lr + (lr0 - init_lr) * s / warmup_steps
        cos = _half_cosine(lr0, (s - warmup_steps) / (total_steps - warmup_steps))
        return jnp.where(s < warmup_steps, warm, cos)
    return schedule


def step_decay(lr0: float, steps_per_epoch: int, decay_epochs: Sequence[int], factor: float) -> optax.Schedule:
    """Multiply by `factor` at the start of each epoch in `decay_epochs`."""
    # A NumPy constant: embedded in the compiled step (a jax.Array closed over by a jitted step
    # becomes a hidden argument, which jax.export cannot map back to the step's inputs).
    milestones = np.asarray(sorted(decay_epochs), np.int32).reshape(-1)

    def schedule(step):
        epoch = jnp.asarray(step) // steps_per_epoch
        count = jnp.sum(epoch >= milestones)
        return lr0 * jnp.asarray(factor, jnp.float32) ** count.astype(jnp.float32)
    return schedule


def make_schedule(
    name: str,
    lr0: float,
    *,
    steps_per_epoch: int,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_init_lr: float = 0.0,
    decay_epochs: Sequence[int] = (),
    decay_factor: float = 0.1,
) -> optax.Schedule:
    """Builds the schedule called `name` (one of `SCHEDULES`)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}.")
    if steps_per_epoch < 1 or total_steps < 1:
        raise ValueError(f"steps_per_epoch and total_steps must be >= 1, got {steps_per_epoch}, {total_steps}.")
    if name == "constant":
        return constant(lr0)
    if name == "cosine_epoch":
        return cosine_epoch(lr0, steps_per_epoch, max(1, math.ceil(total_steps / steps_per_epoch)))
    if name == "cosine_step":
        return cosine_step(lr0, total_steps)
    if name == "warmup_cosine":
        if warmup_steps >= total_steps:
            raise ValueError(f"warmup_steps={warmup_steps} must be < total_steps={total_steps}.")
        return warmup_cosine(lr0, warmup_steps, total_steps, warmup_init_lr)
    return step_decay(lr0, steps_per_epoch, decay_epochs, decay_factor)
