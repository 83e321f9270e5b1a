"""The one rounding primitive behind every quantizer (SQAKD's unified discretizer).

    forward : x_q = round(x_n * (L - 1)) / (L - 1)          (round half to even)
    backward: dL/dx_n = g * (1 + delta * sign(g) * (x_n - x_q)),   g = dL/dx_q

`delta = 0` is the straight-through estimator (STE); `delta > 0` is EWGS element-wise gradient
scaling. `x_n - x_q` is measured on the [0, 1] grid, so one delta means the same in every
quantizer. No gradient flows to `delta`. The backward is itself differentiable, so
reverse-over-reverse differentiation (Hessian-vector products) works.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def levels_for_bits(bits: int) -> int:
    """Number of quantization levels for a bit width: 2**bits."""
    return 2 ** int(bits)


@jax.custom_vjp
def _discretize(x_n: jax.Array, steps: jax.Array, delta: jax.Array) -> jax.Array:
    return jnp.round(x_n * steps) / steps


def _discretize_fwd(x_n, steps, delta):
    x_q = jnp.round(x_n * steps) / steps
    return x_q, (x_n, x_q, delta, steps)


def _discretize_bwd(res, g):
    x_n, x_q, delta, steps = res
    scale = 1.0 + delta * jnp.sign(g) * (x_n - x_q)
    return (g * scale).astype(x_n.dtype), jnp.zeros_like(steps), jnp.zeros_like(delta)


_discretize.defvjp(_discretize_fwd, _discretize_bwd)


def discretize(x_n: jax.Array, levels: int, delta=0.0) -> jax.Array:
    """Rounds `x_n` (normalised to [0, 1]) onto `levels` uniform points of [0, 1].

    Args:
      x_n: input on the normalised grid; values outside [0, 1] are rounded all the same
        (callers clip first).
      levels: L >= 2, a Python int (2**bits for a b-bit quantizer).
      delta: EWGS scaling factor (scalar or broadcastable to `x_n`), >= 0. 0 gives STE.

    Returns:
      `round(x_n * (L - 1)) / (L - 1)`, same shape and dtype as `x_n`.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be a Python int >= 2, got {levels!r}")
    x_n = jnp.asarray(x_n)
    dtype = x_n.dtype if jnp.issubdtype(x_n.dtype, jnp.floating) else jnp.float32
    x_n = x_n.astype(dtype)
    steps = jnp.asarray(levels - 1, dtype)
    delta = jnp.asarray(delta, dtype)
    if jnp.broadcast_shapes(delta.shape, x_n.shape) != x_n.shape:
        raise ValueError(f"delta of shape {delta.shape} does not broadcast to x_n {x_n.shape}")
    return _discretize(x_n, steps, delta)


def round_ste(x: jax.Array) -> jax.Array:
    """round(x) (half to even) with the straight-through gradient d/dx = 1."""
    x = jnp.asarray(x)
    return x + jax.lax.stop_gradient(jnp.round(x) - x)
