"""EWGS delta from the Hessian of the training loss w.r.t. each layer's discretizer output.

    delta_l = max(0, mean_k[(Tr(H_k,l) / N_l) / (3 std(g_k,l) + eps)])     (REFERENCE section 5)

Quantized layers expose their discretizer outputs x_q as flax perturbations ('perturbations'
collection, entries 'w_q' and 'a_q'); the gradient w.r.t. a zero perturbation is dL/dx_q and a
reverse-over-reverse product gives H v. As in the official EWGS code (PyHessian-style), one
Rademacher vector over all layers at once gives every layer's trace: E[v_l . (H v)_l] =
Tr(H_ll), the cross-layer terms vanish in expectation. Probing stops when the running mean of
the total trace moves by less than `rtol` (relative) or after `max_probes`.

The loss is the phase's objective (cross-entropy for labelled phases, the KL to the teacher for
SQAKD, which has no labels), with the student in train mode and its BatchNorm statistics left
unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp

from qkd_jax.train.state import TrainState

# perturbation name -> key of the same layer in the 'quant_delta' collection
PROBE_TO_DELTA = {"w_q": "w", "a_q": "a"}


def _tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _batch_loss_fn(state: TrainState, batch: Mapping[str, jax.Array], objective: Any):
    """Returns (loss(perturbations), zero perturbations) for one batch."""
    images, labels = batch["image"], batch.get("label")
    teacher_logits = None
    if state.teacher is not None:
        teacher_logits = jax.lax.stop_gradient(
            state.teacher.apply_fn(state.teacher.variables(), images, train=False)
        )
    variables = state.variables()

    def loss(perturbations):
        logits, _ = state.apply_fn(
            {**variables, "perturbations": perturbations},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return objective(logits, teacher_logits, labels)[0]

    _, created = state.apply_fn(variables, images, train=True, mutable=["batch_stats", "perturbations"])
    zeros = jax.tree.map(jnp.zeros_like, flax.core.unfreeze(created.get("perturbations", {})))
    return loss, zeros


def layer_traces_and_grads(
    loss_fn, zeros, key: jax.Array, *, max_probes: int = 50, rtol: float = 1e-3
) -> tuple[Any, Any, jax.Array]:
    """Per-leaf Hutchinson traces of the Hessian of `loss_fn` at `zeros`, its gradient, probes used."""
    grad_fn = jax.grad(loss_fn)
    grads = grad_fn(zeros)
    leaves, treedef = jax.tree.flatten(zeros)

    def probe(k):
        keys = jax.random.split(k, len(leaves))
        v = treedef.unflatten([jax.random.rademacher(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)])
        hv = jax.grad(lambda p: _tree_vdot(grad_fn(p), v))(zeros)
        return jax.tree.map(lambda a, b: jnp.vdot(a, b), v, hv)

    def cond(carry):
        n, _, _, converged = carry
        return (n < max_probes) & ~converged

    def body(carry):
        n, sums, prev_total, _ = carry
        sums = jax.tree.map(jnp.add, sums, probe(jax.random.fold_in(key, n)))
        total = sum(jax.tree.leaves(sums)) / (n + 1)
        converged = (n > 0) & (jnp.abs(total - prev_total) < rtol * (jnp.abs(prev_total) + 1e-12))
        return n + 1, sums, total, converged

    init_sums = jax.tree.map(lambda x: jnp.zeros((), x.dtype), zeros)
    init = (jnp.asarray(0), init_sums, jnp.asarray(0.0), jnp.asarray(False))
    n, sums, _, _ = jax.lax.while_loop(cond, body, init)
    traces = jax.tree.map(lambda s: s / n, sums)
    return traces, grads, n


def _ratio(trace: jax.Array, grad: jax.Array, eps: float) -> jax.Array:
    return (trace / grad.size) / (3.0 * jnp.std(grad, ddof=1) + eps)  # torch .std() (ddof=1)


@functools.partial(jax.jit, static_argnames=("objective", "max_probes", "rtol", "eps"))
def _batch_ratios(state, batch, key, *, objective, max_probes, rtol, eps):
    """Per-layer (Tr(H)/N) / (3 std(g) + eps) on one batch, keyed like the perturbations."""
    loss_fn, zeros = _batch_loss_fn(state, batch, objective)
    traces, grads, _ = layer_traces_and_grads(loss_fn, zeros, key, max_probes=max_probes, rtol=rtol)
    return jax.tree.map(lambda t, g: _ratio(t, g, eps), traces, grads)


def compute_ewgs_deltas(
    state: TrainState,
    batches: Iterable[Mapping[str, jax.Array]],
    objective: Any,
    key: jax.Array,
    *,
    max_probes: int = 50,
    rtol: float = 1e-3,
    eps: float = 1e-8,
) -> dict:
    """New 'quant_delta' collection with every layer's delta computed on `batches`.

    Layers that expose no perturbation (full-precision layers) keep their current delta.
    `objective` must be hashable (the distill objectives are frozen dataclasses): it is a
    static argument of the compiled per-batch function, which is compiled once per shape.
    """
    ratios: list[Any] = []
    for k, batch in enumerate(batches):
        ratios.append(
            _batch_ratios(
                state, dict(batch), jax.random.fold_in(key, k),
                objective=objective, max_probes=max_probes, rtol=rtol, eps=eps,
            )
        )
    if not ratios:
        raise ValueError("compute_ewgs_deltas needs at least one batch")
    mean_ratio = jax.tree.map(lambda *r: jnp.maximum(0.0, jnp.mean(jnp.stack(r))), *ratios)
    return _write_deltas(flax.core.unfreeze(state.quant_delta), mean_ratio)


def _write_deltas(quant_delta: dict, ratios: Mapping) -> dict:
    """Copies each layer's ratio (keyed by its perturbation name) into 'quant_delta'."""
    out = jax.tree.map(lambda x: x, quant_delta)

    def visit(src: Mapping, dst: Optional[dict], path: tuple[str, ...]):
        for name, value in src.items():
            if isinstance(value, Mapping):
                visit(value, None if dst is None else dst.get(name), path + (name,))
                continue
            if name not in PROBE_TO_DELTA:
                continue
            if dst is None or PROBE_TO_DELTA[name] not in dst:
                raise KeyError(
                    f"layer {'/'.join(path)} exposes perturbation {name!r} but has no "
                    f"'quant_delta' entry {PROBE_TO_DELTA[name]!r}"
                )
            old = dst[PROBE_TO_DELTA[name]]
            dst[PROBE_TO_DELTA[name]] = jnp.asarray(value, jnp.asarray(old).dtype).reshape(jnp.shape(old))

    visit(ratios, out, ())
    return out
