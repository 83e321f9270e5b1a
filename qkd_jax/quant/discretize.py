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


@jax.custom_vjp
def _round_index(u: jax.Array, steps: jax.Array, delta: jax.Array) -> jax.Array:
    return jnp.round(u)


def _round_index_fwd(u, steps, delta):
    r = jnp.round(u)
    return r, (u, r, delta, steps)


def _round_index_bwd(res, g):
    u, r, delta, steps = res
    # (u - r) / steps is x_n - x_q of the [0, 1] grid: the same EWGS factor as `discretize`.
    scale = 1.0 + delta * jnp.sign(g) * (u - r) / steps
    return (g * scale).astype(u.dtype), jnp.zeros_like(steps), jnp.zeros_like(delta)


_round_index.defvjp(_round_index_fwd, _round_index_bwd)


def _prepare(x, levels, delta):
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be a Python int >= 2, got {levels!r}")
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    x = x.astype(dtype)
    steps = jnp.asarray(levels - 1, dtype)
    delta = jnp.asarray(delta, dtype)
    try:
        fits = jnp.broadcast_shapes(delta.shape, x.shape) == x.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"delta of shape {delta.shape} does not broadcast to x_n {x.shape}")
    return x, steps, delta


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
    x_n, steps, delta = _prepare(x_n, levels, delta)
    return _discretize(x_n, steps, delta)


def discretize_index(u: jax.Array, levels: int, delta=0.0) -> jax.Array:
    """`discretize` in grid-index units: round(u) for u = x_n * (L - 1), or u shifted from it by
    an even integer (a shift that keeps half-to-even ties where they were).

    Forward `round(u)` (half to even); backward `g * (1 + delta * sign(g) * (u - round(u)) / (L - 1))`,
    the discretizer's EWGS rule with x_n - x_q = (u - round(u)) / (L - 1). For quantizers whose
    formula rounds an unnormalised value (LSQ's round(x / s)): dividing by L - 1 and multiplying
    back in floating point can move an exact tie, k + 1/2, off its half-to-even result.
    """
    u, steps, delta = _prepare(u, levels, delta)
    return _round_index(u, steps, delta)


def round_ste(x: jax.Array) -> jax.Array:
    """round(x) (half to even) with the straight-through gradient d/dx = 1."""
    x = jnp.asarray(x)
    return x + jax.lax.stop_gradient(jnp.round(x) - x)
