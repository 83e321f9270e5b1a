"""EWGS delta from the Hessian of the training loss w.r.t. each layer's discretizer output.

    delta_l = max(0, mean_k[(Tr(H_k,l) / N_l) / (3 std(g_k,l) + eps)])     (docs/method.md section 5)

Quantized layers expose their discretizer outputs x_q as flax perturbations ('perturbations'
collection, entries 'w_q' and 'a_q'); the gradient w.r.t. a zero perturbation is dL/dx_q and a
reverse-over-reverse product gives H v. Two Hutchinson probes (`probe`):

- 'per_layer' (the released EWGS code, `update_grad_scales` / `trace` in its CIFAR10/utils.py,
  also in SQAKD's CIFAR/utils.py): each x_q is probed on its own, Rademacher v_l on that tensor
  only, E[v_l . H_ll v_l] = Tr(H_ll); probing stops per tensor. One Hessian-vector product per
  probe and tensor.
- 'joint': one Rademacher vector over all tensors at once gives every tensor's trace,
  E[v_l . (H v)_l] = Tr(H_ll) (the cross-tensor terms vanish in expectation but add variance);
  probing stops on the total trace. One Hessian-vector product per probe for all tensors.

Probing stops when the running mean moves by less than `rtol` (relative) or after
`max_probes`. The loss is the objective passed in: the cross-entropy with labels (what the
released code uses, also for its distillation runs) or the phase's own objective (the KL to
the teacher for SQAKD, label-free); `run/plan.py` picks it from `quant.hessian_loss`. The
student is in train mode and its BatchNorm statistics are left unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp

from qkd_jax.quant.hessian import HESSIAN_PROBES, ewgs_ratio
from qkd_jax.train.state import TrainState

# perturbation name -> key of the same layer in the 'quant_delta' collection
PROBE_TO_DELTA = {"w_q": "w", "a_q": "a"}


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
    loss_fn, zeros, key: jax.Array, *, max_probes: int = 50, rtol: float = 1e-3, probe: str = "joint"
) -> tuple[Any, Any, Any]:
    """Per-leaf Hutchinson traces of the Hessian of `loss_fn` at `zeros`, its gradient, probes used
    (a scalar for 'joint', a tree of per-leaf counts for 'per_layer')."""
    if probe not in HESSIAN_PROBES:
        raise ValueError(f"unknown Hessian probe {probe!r}; choose one of {sorted(HESSIAN_PROBES)}")
    traces, n = HESSIAN_PROBES[probe](loss_fn, zeros, key, max_probes=max_probes, rtol=rtol)
    return traces, jax.grad(loss_fn)(zeros), n


@functools.partial(jax.jit, static_argnames=("objective", "max_probes", "rtol", "eps", "probe"))
def _batch_ratios(state, batch, key, *, objective, max_probes, rtol, eps, probe):
    """Per-layer (Tr(H)/N) / (3 std(g) + eps) on one batch, keyed like the perturbations."""
    loss_fn, zeros = _batch_loss_fn(state, batch, objective)
    traces, grads, _ = layer_traces_and_grads(loss_fn, zeros, key, max_probes=max_probes, rtol=rtol, probe=probe)
    return jax.tree.map(lambda t, g: ewgs_ratio(t, g, eps=eps), traces, grads)


def compute_ewgs_deltas(
    state: TrainState,
    batches: Iterable[Mapping[str, jax.Array]],
    objective: Any,
    key: jax.Array,
    *,
    max_probes: int = 50,
    rtol: float = 1e-3,
    eps: float = 1e-8,
    probe: str = "per_layer",
) -> dict:
    """New 'quant_delta' collection with every layer's delta computed on `batches`.

    `probe`: 'per_layer' (released EWGS code) or 'joint' (module docstring).

    Layers that expose no perturbation (full-precision layers) keep their current delta.
    `objective` must be hashable (the distill objectives are frozen dataclasses): it is a
    static argument of the compiled per-batch function, which is compiled once per shape.
    """
    ratios: list[Any] = []
    for k, batch in enumerate(batches):
        ratios.append(
            _batch_ratios(
                state, dict(batch), jax.random.fold_in(key, k),
                objective=objective, max_probes=max_probes, rtol=rtol, eps=eps, probe=probe,
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
