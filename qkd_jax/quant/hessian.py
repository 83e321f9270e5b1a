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
    """Hutchinson estimates of the Hessian's diagonal blocks' traces, one per leaf of `tree` (joint probe).

    Each probe is one Rademacher vector v over all leaves and one Hessian-vector product; leaf
    l's estimate is the mean of v_l . (H v)_l, whose expectation is Tr(H_ll): the cross-leaf
    terms v_l . H_lm v_m vanish in expectation but add variance. (The released EWGS code probes
    each layer separately instead: `hutchinson_traces_per_leaf`.) Probes are drawn until the
    running mean of the total trace moves by less than `rtol` (relative) between two probes, or
    `max_probes` have been used. Jit-compatible (a `lax.while_loop`).

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


def hutchinson_traces_per_leaf(
    fn: Callable[[Any], jax.Array],
    tree: Any,
    key: jax.Array,
    *,
    max_probes: int = 50,
    rtol: float = 1e-3,
) -> tuple[Any, Any]:
    """Hutchinson estimates of Tr(H_ll), each leaf l of `tree` probed on its own.

    For leaf l, each probe is a Rademacher vector v_l on that leaf alone (zero elsewhere) and one
    Hessian-vector product; the estimate is the mean of v_l . (H_ll v_l), with no cross-leaf
    terms. Probes stop per leaf when that leaf's running mean moves by less than `rtol`
    (relative) between two probes, or after `max_probes`. This is the released EWGS code's
    `trace(model, [params[i]], [grads[i]])`, called once per layer (docs/method.md section 5).
    It costs one Hessian-vector product per probe and leaf, where the joint probe
    (`hutchinson_traces`) costs one per probe for all leaves. Jit-compatible: one compiled
    Hessian-vector product, selected per leaf by a mask inside `lax.fori_loop` / `lax.while_loop`.

    Returns:
      (a tree like `tree` of scalar trace estimates, a tree of the probes each leaf used).
    """
    if max_probes < 1:
        raise ValueError(f"max_probes must be >= 1, got {max_probes}")
    leaves, treedef = jax.tree.flatten(tree)
    dtypes = [x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32 for x in leaves]
    dtype = jnp.result_type(*dtypes)
    grad_fn = jax.grad(fn)

    def probe(leaf, k):
        """v_leaf . (H v)_leaf with v Rademacher on `leaf` and zero on every other leaf."""
        v = [jnp.where(leaf == j, jax.random.rademacher(k, x.shape, dtype=d), jnp.zeros(x.shape, d))
             for j, (x, d) in enumerate(zip(leaves, dtypes))]
        hv = jax.tree.leaves(jax.grad(lambda y: _tree_vdot(grad_fn(y), treedef.unflatten(v)))(tree))
        return sum(jnp.where(leaf == j, jnp.vdot(vj, hj), 0.0).astype(dtype)
                   for j, (vj, hj) in enumerate(zip(v, hv)))

    def one_leaf(leaf, out):
        traces, counts = out
        leaf_key = jax.random.fold_in(key, leaf)

        def cond(carry):
            n, _, _, converged = carry
            return (n < max_probes) & ~converged

        def body(carry):
            n, total, mean, _ = carry
            total = total + probe(leaf, jax.random.fold_in(leaf_key, n))
            new_mean = total / (n + 1)
            moved = jnp.abs(new_mean - mean) / (jnp.abs(mean) + 1e-12)
            return n + 1, total, new_mean, (n > 0) & (moved < rtol)

        init = (jnp.asarray(0), jnp.asarray(0.0, dtype), jnp.asarray(0.0, dtype), jnp.asarray(False))
        n, _, mean, _ = jax.lax.while_loop(cond, body, init)
        return traces.at[leaf].set(mean), counts.at[leaf].set(n)

    init = (jnp.zeros((len(leaves),), dtype), jnp.zeros((len(leaves),), jnp.int32))
    traces, counts = jax.lax.fori_loop(0, len(leaves), one_leaf, init)
    return (treedef.unflatten([traces[j].astype(d) for j, d in enumerate(dtypes)]),
            treedef.unflatten([counts[j] for j in range(len(leaves))]))


HESSIAN_PROBES = {"joint": hutchinson_traces, "per_layer": hutchinson_traces_per_leaf}


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
