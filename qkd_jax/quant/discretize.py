"""The one rounding primitive behind every quantizer (SQAKD's unified discretizer).

    forward : x_q = round(x_n * (L - 1)) / (L - 1)          (round half to even)
    backward: dL/dx_n = g * (1 + delta * sign(g) * (x_n - x_q)),   g = dL/dx_q

`delta = 0` is the straight-through estimator (STE); `delta > 0` is EWGS element-wise gradient
scaling. `x_n - x_q` is measured on the [0, 1] grid, so one delta means the same in every
quantizer. No gradient flows to `delta`. The backward is itself differentiable, so
reverse-over-reverse differentiation (Hessian-vector products) works.

Other gradient estimators (`qkd_jax.quant.estimators`) come in through `estimator=` or in the
`delta` slot (an `Estimator`, or `est.keyed(key)` for one with a training-time forward): STE and
EWGS run the rule above unchanged; any other runs its own backward rule, and its stochastic forward
when a key is given. Without a key the forward is always the hard rounding.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax.quant.estimators import Estimator, Keyed, is_ewgs_family, legacy_delta


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


def _zero_cotangent(leaf):
    leaf = jnp.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _estimated(x: jax.Array, x_q: jax.Array, estimator: Estimator, levels: int, index: bool) -> jax.Array:
    """Returns `x_q` (the forward value, computed by the caller); backward: the estimator's rule."""
    return x_q


def _estimated_fwd(x, x_q, estimator, levels, index):
    return x_q, (x, x_q, estimator)


def _estimated_bwd(levels, index, res, g):
    x, x_q, estimator = res
    if index:
        # u = x_n (L - 1), r = x_q (L - 1): dL/du = backward(g (L - 1), x_n, x_q) / (L - 1)
        steps = levels - 1
        dx = estimator.backward(g * steps, x / steps, x_q / steps, levels) / steps
    else:
        dx = estimator.backward(g, x, x_q, levels)
    return (jnp.asarray(dx, x.dtype), jnp.zeros_like(x_q), jax.tree.map(_zero_cotangent, estimator))


_estimated.defvjp(_estimated_fwd, _estimated_bwd)


def _split(delta: Any, estimator: Optional[Any]) -> tuple[Any, Optional[Estimator], Optional[jax.Array]]:
    """(EWGS delta, estimator or None for the legacy rule, key) from the delta / estimator arguments."""
    key = None
    if estimator is None and isinstance(delta, (Estimator, Keyed)):
        estimator, delta = delta, 0.0
    if isinstance(estimator, Keyed):
        estimator, key = estimator.estimator, estimator.key
    if estimator is not None and not isinstance(estimator, Estimator):
        raise ValueError(f"estimator must be a qkd_jax.quant.estimators.Estimator, got {estimator!r}")
    if estimator is not None and is_ewgs_family(estimator):
        return legacy_delta(estimator, delta), None, None
    return delta, estimator, key


def _with_estimator(x, levels, estimator, key, index):
    """The forward (stochastic with a key, else hard) with the estimator's backward."""
    steps = levels - 1
    if key is not None and estimator.stochastic:
        fwd = estimator.forward_index(x, levels, key) if index else estimator.forward(x, levels, key)
        x_q = jax.lax.stop_gradient(jnp.asarray(fwd, x.dtype))
    else:
        x_q = jnp.round(x) if index else jnp.round(x * steps) / steps
    floats = jax.tree.map(lambda v: jnp.asarray(v, x.dtype) if isinstance(v, float) else v, estimator)
    return _estimated(x, jax.lax.stop_gradient(x_q), floats, levels, index)


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


def discretize(x_n: jax.Array, levels: int, delta=0.0, *, estimator=None) -> jax.Array:
    """Rounds `x_n` (normalised to [0, 1]) onto `levels` uniform points of [0, 1].

    Args:
      x_n: input on the normalised grid; values outside [0, 1] are rounded all the same
        (callers clip first).
      levels: L >= 2, a Python int (2**bits for a b-bit quantizer).
      delta: EWGS scaling factor (scalar or broadcastable to `x_n`), >= 0. 0 gives STE. May also
        be an estimator (or `est.keyed(key)`), as `estimator`.
      estimator: a `qkd_jax.quant.estimators.Estimator` or `est.keyed(key)`; None: EWGS with `delta`.
        An 'ewgs' estimator whose delta is None uses `delta`.

    Returns:
      `round(x_n * (L - 1)) / (L - 1)` (a stochastic estimator with a key: its training forward),
      same shape and dtype as `x_n`.
    """
    delta, est, key = _split(delta, estimator)
    x_n, steps, delta = _prepare(x_n, levels, delta)
    if est is not None:
        return _with_estimator(x_n, levels, est, key, index=False)
    return _discretize(x_n, steps, delta)


def discretize_index(u: jax.Array, levels: int, delta=0.0, *, estimator=None) -> jax.Array:
    """`discretize` in grid-index units: round(u) for u = x_n * (L - 1), or u shifted from it by
    an even integer (a shift that keeps half-to-even ties where they were).

    Forward `round(u)` (half to even); backward `g * (1 + delta * sign(g) * (u - round(u)) / (L - 1))`,
    the discretizer's EWGS rule with x_n - x_q = (u - round(u)) / (L - 1). For quantizers whose
    formula rounds an unnormalised value (LSQ's round(x / s)): dividing by L - 1 and multiplying
    back in floating point can move an exact tie, k + 1/2, off its half-to-even result.
    `delta` / `estimator` as in `discretize` (the estimator's rule is applied on the [0, 1] grid).
    """
    delta, est, key = _split(delta, estimator)
    u, steps, delta = _prepare(u, levels, delta)
    if est is not None:
        return _with_estimator(u, levels, est, key, index=True)
    return _round_index(u, steps, delta)


def round_ste(x: jax.Array) -> jax.Array:
    """round(x) (half to even) with the straight-through gradient d/dx = 1."""
    x = jnp.asarray(x)
    return x + jax.lax.stop_gradient(jnp.round(x) - x)
