"""Per-example distillation losses, optax style: no reduction, class axis last.

Every function returns one value per example (shape `logits.shape[:-1]`, i.e. `(batch,)`).
Reduction is the caller's; the official SQAKD/QKD convention is the **batch mean**
(`jnp.mean(loss)`), which is what `qkd_jax.distill.objectives` applies.

Inputs in low precision (bf16/fp16) are computed in float32. Softmaxes go through
`log_softmax`, so logits of magnitude 1e4 neither overflow nor give NaN.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def _check_static_range(value: Any, name: str, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    """Raises ValueError when a static Python/NumPy number lies outside (or on an open end of) [low, high]."""
    if isinstance(value, jax.core.Tracer):
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        return  # arrays with several elements: left to the caller
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {value!r}.")


def _as_float(x: jax.Array) -> jax.Array:
    """Returns `x` as an array of at least float32 precision."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Hinton's KD term per example: `T^2 * sum_c p_t,c (log p_t,c - log p_s,c)`.

    `p = softmax(logits / T)`. The T^2 factor keeps gradient magnitudes independent of T.
    Gradients flow into both arguments; stop the teacher's with `jax.lax.stop_gradient`
    (the objectives do).

    Args:
      student_logits: `(..., classes)` logits of the distribution being fitted (log p_s).
      teacher_logits: same shape, the target distribution (p_t).
      temperature: T > 0.

    Returns:
      `(...)` per-example divergences, >= 0.
    """
    _check_static_range(temperature, "temperature", 0.0, math.inf, low_open=True, high_open=True)
    s, t = _as_float(student_logits), _as_float(teacher_logits)
    if s.shape != t.shape:
        raise ValueError(f"student_logits {s.shape} and teacher_logits {t.shape} must have the same shape.")
    log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
    per_class = jnp.exp(log_pt) * (log_pt - log_ps)
    return (temperature**2) * jnp.sum(per_class, axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Softmax cross-entropy per example with integer labels and optional label smoothing.

    `CE = -sum_c q_c log softmax(logits)_c` with `q = (1 - eps) * onehot(y) + eps / C`
    (torch `CrossEntropyLoss(label_smoothing=eps)` and the SQAKD `LabelSmoothCELoss`).

    Args:
      logits: `(..., classes)`.
      labels: integer class indices of shape `logits.shape[:-1]`.
      label_smoothing: eps in [0, 1].

    Returns:
      `(...)` per-example losses.
    """
    _check_static_range(label_smoothing, "label_smoothing", 0.0, 1.0, low_open=False, high_open=False)
    logits = _as_float(logits)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be integer class indices, got dtype {labels.dtype} (one-hot targets are not accepted)."
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} must equal logits.shape[:-1] = {logits.shape[:-1]}.")
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
        return nll
    uniform = -jnp.mean(log_p, axis=-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform
