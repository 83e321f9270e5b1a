"""Learnable widths (steps, intervals, clipping values) kept positive inside the quantizers.

An optimizer step can carry a learnable LSQ step, QKD interval, PACT clipping value or the
interval quantizer's width `upper - lower` across zero. Used as stored, such a value divides
the input by ~0 or flips the grid, and the run dies with inf/NaN. Every quantizer therefore
uses the *effective* value

    positive_width(p) = max(|p|, MIN_WIDTH)          (forward)
    d positive_width / d p = sign(p)                  (backward, straight through the clamp)

the functional form of what MQBench's LSQ does in place before each forward pass
(`scale.abs_(); scale.clamp_(min=eps)`, eps = float32 epsilon). For a positive parameter above
MIN_WIDTH (every calibrated value) it is the identity, value and gradient, so ordinary runs
are unchanged. The interval quantizer's width uses `max(upper - lower, MIN_WIDTH)` with an
identity gradient (an |.| there would mirror the grid). `output_scale` is already used as
|output_scale|. Exporters read the same effective values (`effective_width`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: Smallest width a quantizer uses: float32 machine epsilon, as MQBench's LSQ clamp.
MIN_WIDTH = float(np.finfo(np.float32).eps)


def positive_width(p) -> jax.Array:
    """max(|p|, MIN_WIDTH), with gradient sign(p) (straight through the clamp)."""
    p = jnp.asarray(p)
    mag = jnp.abs(p)
    return mag + jax.lax.stop_gradient(jnp.maximum(mag, MIN_WIDTH) - mag)


def interval_width(lower, upper) -> jax.Array:
    """max(upper - lower, MIN_WIDTH), with the gradient of upper - lower (straight through)."""
    width = jnp.asarray(upper) - jnp.asarray(lower)
    return width + jax.lax.stop_gradient(jnp.maximum(width, MIN_WIDTH) - width)


def effective_width(p) -> np.ndarray:
    """NumPy float32 value of `positive_width(p)` (for exporters reading stored parameters)."""
    return np.maximum(np.abs(np.asarray(p, np.float32)), np.float32(MIN_WIDTH))
