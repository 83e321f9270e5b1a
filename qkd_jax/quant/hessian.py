"""Hessian-trace estimation and the EWGS delta it gives (docs/method.md section 5).

Hessian-vector products use reverse-over-reverse differentiation, which `jax.custom_vjp`
functions (the discretizer) support; forward-over-reverse would not.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def hvp(fn: Callable[[jax.Array], jax.Array], x: jax.Array, v: jax.Array) -> jax.Array:
    """H(x) v for a scalar function `fn`, by reverse-over-reverse differentiation."""
    return jax.grad(lambda y: jnp.vdot(jax.grad(fn)(y), v))(x)


def _tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def hutchinson_traces(
    fn: Callable[[Any], jax.Array],
    tree: Any,
    key: jax.Array,
    *,
    max_probes: int = 50,
    rtol: float = 1e-3,
) -> tuple[Any, jax.Array]:
    """Hutchinson estimates of the Hessian's diagonal blocks' traces, one per leaf of `tree`.

    Each probe is one Rademacher vector v over all leaves and one Hessian-vector product; leaf
    l's estimate is the mean of v_l . (H v)_l, whose expectation is Tr(H_ll) (the cross-leaf terms
    vanish in expectation, as in PyHessian and the released EWGS code). Probes are drawn until
    the running mean of the total trace moves by less than `rtol` (relative) between two probes,
    or `max_probes` have been used. Jit-compatible (a `lax.while_loop`).

    Returns:
      (a tree like `tree` of scalar trace estimates, number of probes used).
    """
    if max_probes < 1:
        raise ValueError(f"max_probes must be >= 1, got {max_probes}")
    leaves, treedef = jax.tree.flatten(tree)
    dtypes = [x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32 for x in leaves]
    grad_fn = jax.grad(fn)

    def probe(k):
        keys = [k] if len(leaves) == 1 else list(jax.random.split(k, len(leaves)))
        v = treedef.unflatten(
            [jax.random.rademacher(kk, x.shape, dtype=d) for kk, x, d in zip(keys, leaves, dtypes)]
        )
        hv = jax.grad(lambda y: _tree_vdot(grad_fn(y), v))(tree)
        return jax.tree.map(jnp.vdot, v, hv)

    def cond(carry):
        n, _, _, converged = carry
        return (n < max_probes) & ~converged

    def body(carry):
        n, sums, mean, _ = carry
        sums = jax.tree.map(jnp.add, sums, probe(jax.random.fold_in(key, n)))
        new_mean = sum(jax.tree.leaves(sums)) / (n + 1)
        moved = jnp.abs(new_mean - mean) / (jnp.abs(mean) + 1e-12)
        converged = (n > 0) & (moved < rtol)
        return n + 1, sums, new_mean, converged

    sums0 = treedef.unflatten([jnp.zeros((), d) for d in dtypes])
    init = (jnp.asarray(0), sums0, jnp.asarray(0.0, jnp.result_type(*dtypes)), jnp.asarray(False))
    n, sums, _, _ = jax.lax.while_loop(cond, body, init)
    return jax.tree.map(lambda t: t / n, sums), n


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
    return hutchinson_traces(fn, jnp.asarray(x), key, max_probes=max_probes, rtol=rtol)


def ewgs_ratio(trace: jax.Array, grad: jax.Array, *, eps: float = 1e-8) -> jax.Array:
    """One batch's EWGS ratio (Tr(H) / N) / (3 std(g) + eps), N = grad.size.

    The std is the sample std (ddof=1), torch's `Tensor.std()` as in the released EWGS code.
    """
    return (trace / grad.size) / (3.0 * jnp.std(grad, ddof=1) + eps)


def ewgs_delta(traces: jax.Array, grads: jax.Array, *, eps: float = 1e-8) -> jax.Array:
    """EWGS scaling factor from K batches: max(0, mean_k[(Tr(H_k) / N) / (3 std(g_k) + eps)]).

    The per-batch ratio is `ewgs_ratio` (sample std, as the released EWGS code).

    Args:
      traces: shape (K,), Tr(H_k) of the task loss w.r.t. the discretizer output x_q on batch k.
      grads: shape (K, *x_q.shape), g_k = dL/dx_q on batch k; N = x_q.size.
      eps: keeps a zero gradient from dividing by zero (its delta is then 0 when Tr(H) = 0).
    """
    traces = jnp.atleast_1d(jnp.asarray(traces))
    grads = jnp.asarray(grads)
    if grads.ndim < 1 or grads.shape[0] != traces.shape[0]:
        raise ValueError(
            f"grads needs a leading batch axis of size {traces.shape[0]} (one per trace), "
            f"got shape {grads.shape}"
        )
    ratios = jax.vmap(lambda t, g: ewgs_ratio(t, g, eps=eps))(traces, grads)
    return jnp.maximum(0.0, jnp.mean(ratios))
