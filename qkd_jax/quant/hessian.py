"""Hessian-trace estimation and the EWGS delta it gives (REFERENCE section 5).

Hessian-vector products use reverse-over-reverse differentiation, which `jax.custom_vjp`
functions (the discretizer) support; forward-over-reverse would not.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def hvp(fn: Callable[[jax.Array], jax.Array], x: jax.Array, v: jax.Array) -> jax.Array:
    """H(x) v for a scalar function `fn`, by reverse-over-reverse differentiation."""
    return jax.grad(lambda y: jnp.vdot(jax.grad(fn)(y), v))(x)


def hutchinson_trace(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    key: jax.Array,
    *,
    max_probes: int = 50,
    rtol: float = 1e-3,
) -> tuple[jax.Array, jax.Array]:
    """Hutchinson estimate of Tr(d^2 fn / dx^2) at `x` with Rademacher probes v: mean of v^T H v.

    Probes are drawn until the running mean moves by less than `rtol` (relative) between two
    probes, or `max_probes` have been used. Jit-compatible (a `lax.while_loop`).

    Returns:
      (trace estimate, number of probes used).
    """
    if max_probes < 1:
        raise ValueError(f"max_probes must be >= 1, got {max_probes}")
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    grad_fn = jax.grad(fn)

    def probe(k):
        v = jax.random.rademacher(k, x.shape, dtype=dtype)
        hv = jax.grad(lambda y: jnp.vdot(grad_fn(y), v))(x)
        return jnp.vdot(v, hv)

    def cond(carry):
        n, _, _, converged = carry
        return (n < max_probes) & ~converged

    def body(carry):
        n, total, mean, _ = carry
        sample = probe(jax.random.fold_in(key, n))
        total = total + sample
        new_mean = total / (n + 1)
        moved = jnp.abs(new_mean - mean) / (jnp.abs(mean) + 1e-12)
        converged = (n > 0) & (moved < rtol)
        return n + 1, total, new_mean, converged

    init = (jnp.asarray(0), jnp.asarray(0.0, dtype), jnp.asarray(0.0, dtype), jnp.asarray(False))
    n, _, mean, _ = jax.lax.while_loop(cond, body, init)
    return mean, n


def ewgs_delta(traces: jax.Array, grads: jax.Array, *, eps: float = 1e-8) -> jax.Array:
    """EWGS scaling factor from K batches: max(0, mean_k[(Tr(H_k) / N) / (3 std(g_k) + eps)]).

    Args:
      traces: shape (K,), Tr(H_k) of the task loss w.r.t. the discretizer output x_q on batch k.
      grads: shape (K, *x_q.shape), g_k = dL/dx_q on batch k; N = x_q.size.
      The std is the sample std (ddof=1), torch's `Tensor.std()` as in the released EWGS code.
      eps: keeps a zero gradient from dividing by zero (its delta is then 0 when Tr(H) = 0).
    """
    traces = jnp.atleast_1d(jnp.asarray(traces))
    grads = jnp.asarray(grads)
    if grads.ndim < 1 or grads.shape[0] != traces.shape[0]:
        raise ValueError(
            f"grads needs a leading batch axis of size {traces.shape[0]} (one per trace), "
            f"got shape {grads.shape}"
        )
    k = traces.shape[0]
    flat = grads.reshape(k, -1)
    n = flat.shape[1]
    ratio = (traces / n) / (3.0 * jnp.std(flat, axis=1, ddof=1) + eps)
    return jnp.maximum(0.0, jnp.mean(ratio))
