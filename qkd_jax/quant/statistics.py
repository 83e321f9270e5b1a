"""Batch statistics the calibration closed forms use, with their guards for degenerate batches."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

EPS = 1e-8
#: sqrt(1 - 2/pi): the std of |z| for a standard normal z (EWGS's activation clipping level).
HALF_NORMAL = math.sqrt(1.0 - 2.0 / math.pi)


def sample_std(x: jax.Array) -> jax.Array:
    """The unbiased sample std (ddof=1, as torch.Tensor.std); 0 for a single element."""
    return jnp.std(x, ddof=1) if x.size > 1 else jnp.zeros((), x.dtype)


def positive_or_one(v: jax.Array) -> jax.Array:
    """`v`, or 1 when the statistic is degenerate (<= EPS, e.g. an all-zero input).

    Any width quantizes an all-zero tensor exactly, but a tiny one (EPS) makes the gradients
    w.r.t. the step or interval (~ x / s^2) overflow as soon as the input moves."""
    return jnp.where(v > EPS, v, 1.0)
