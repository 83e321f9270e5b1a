"""Clipping with torch.clamp gradient semantics.

`jnp.clip` is built from max/min, whose gradient splits 0.5/0.5 at ties, so an element that
sits exactly on a bound would get half a gradient. The reference implementations (PyTorch)
pass the full gradient there: bounds are inclusive. These helpers reproduce that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def clip_inclusive(x: jax.Array, lower, upper) -> jax.Array:
    """clip(x, lower, upper); d/dx = 1 for lower <= x <= upper, 0 outside.

    The gradient w.r.t. a bound is 1 where x is strictly beyond it (the output equals the
    bound there) and 0 elsewhere, as with torch.clamp(x, min=tensor, max=tensor).
    """
    inside = (x >= lower) & (x <= upper)
    return jnp.where(inside, x, jnp.where(x < lower, lower, upper))


def clip_straight_through(x: jax.Array, lower, upper) -> jax.Array:
    """clip(x, lower, upper) in the forward pass, identity gradient everywhere."""
    return x + jax.lax.stop_gradient(jnp.clip(x, lower, upper) - x)
