"""Stopping a phase whose loss or parameters became NaN or infinite, before anything is saved."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@jax.jit
def all_finite(tree) -> jax.Array:
    """1.0 when every element of `tree` is finite, NaN otherwise (the metric the check reads).

    The loss of the step that produced a state comes from before its update, so the
    parameters themselves are checked before a checkpoint is written."""
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
    return jnp.where(ok, 1.0, jnp.nan)


def check_finite(values: dict, name: str, step: int, last_saved: int) -> dict:
    """`values` as floats; raises NonFiniteLossError naming the non-finite ones."""
    values = {k: float(np.asarray(v)) for k, v in values.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"phase {name!r}: {bad} at step {step}. Nothing after step {last_saved} was saved, so "
            f"rerunning resumes from that checkpoint; lower the learning rate "
            f"(config.phases.{name}.weights.learning_rate) or enable clipping "
            f"(config.phases.{name}.weights.clip_norm) before rerunning."
        )
    return values
