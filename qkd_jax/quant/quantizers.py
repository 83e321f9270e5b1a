"""Quantizers as pure functions: map to the normalised grid x_n in [0, 1], call `discretize`, map back.

Every method routes its rounding through `discretize`, so `delta` switches between the
straight-through estimator (delta = 0) and EWGS gradient scaling (delta > 0) for all of them.
Every quantizer accepts `grid_hook`, a function applied to the discretizer output x_q before it
is mapped back (identity when None). Parameters (`lower`, `upper`, `alpha`, `step`, `interval`) are scalars for per-tensor
quantization or arrays broadcastable to `x` (e.g. shape (1, 1, 1, C_out) for per-output-channel
conv weights). Bounds are inclusive: an element exactly on a clip bound passes gradient 1
(torch.clamp semantics).

Validity (bits in 1..8, positive steps/intervals, upper > lower) is checked with ValueError
when the values are static (Python numbers or NumPy arrays). Traced values cannot be checked
under `jit`: there every learnable width (step, interval, alpha, upper - lower) is used through
`positive.positive_width` / `positive.interval_width`, so a value that training pushes across
zero keeps the outputs finite instead of killing the run (see `qkd_jax.quant.positive`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from qkd_jax.quant.clip import clip_inclusive, clip_straight_through
from qkd_jax.quant.discretize import discretize, discretize_index
from qkd_jax.quant.positive import interval_width, positive_width
from qkd_jax.quant.validation import check_bits, check_interval, check_positive

GridHook = Optional[Callable[[jax.Array], jax.Array]]


def _on_grid(x_q: jax.Array, grid_hook: GridHook) -> jax.Array:
    """Applies the caller's hook to the discretizer output x_q (on the [0, 1] grid).

    Layers use it to attach a flax perturbation there, so that gradients and Hessian traces
    w.r.t. x_q (the EWGS delta update) can be taken without changing the quantizer.
    """
    return x_q if grid_hook is None else grid_hook(x_q)


def interval_quantize(x: jax.Array, lower, upper, bits: int, *, signed: bool, delta=0.0, grid_hook: GridHook = None) -> jax.Array:
    """Learnable-interval quantizer of EWGS / SQAKD.

        x_n = clip((x - lower) / (upper - lower), 0, 1),  x_q = discretize(x_n, 2**bits, delta)
        signed (weights):     returns 2 * (x_q - 0.5)  in [-1, 1]  (1 bit: {-1, +1})
        unsigned (activations): returns x_q            in [0, 1]

    Clipped elements pass zero gradient to `x`, `lower` and `upper`; inside (bounds
    included) autodiff of the normalisation gives the rest.
    """
    bits = check_bits(bits)
    check_interval(lower, upper)
    x = jnp.asarray(x)
    x_n = clip_inclusive((x - lower) / interval_width(lower, upper), 0.0, 1.0)
    x_q = _on_grid(discretize(x_n, 2**bits, delta), grid_hook)
    return 2.0 * (x_q - 0.5) if signed else x_q


def pact(x: jax.Array, alpha, bits: int, delta=0.0, grid_hook: GridHook = None, *, signed: bool = False) -> jax.Array:
    """PACT activation quantizer (Choi et al. 2018), and a signed variant (our choice).

        unsigned: y = clip(x, 0, alpha),  x_q = discretize(y / alpha, 2**bits, delta),  returns alpha * x_q
        signed:   c = clip(x, -alpha, alpha) / alpha,  x_q = discretize((c + 1) / 2, L, delta),
                  returns alpha * (2 x_q - 1): a symmetric grid with a zero level, L = 2**b - 1
                  levels, step alpha / (2**(b-1) - 1) (1 bit: L = 2, {-alpha, +alpha})

    Gradients (PACT's straight-through form): d/dx = 1 inside the clip range (times the EWGS
    factor when delta > 0), 0 outside; d/d alpha = 1 where x >= alpha, -1 (signed) where
    x <= -alpha, 0 elsewhere. `alpha` must be > 0. The paper defines the unsigned form only;
    the signed one is for layers whose input has negative values (docs/method.md section 2).
    """
    bits = check_bits(bits)
    check_positive(alpha, "alpha")
    x = jnp.asarray(x)
    alpha = positive_width(jnp.asarray(alpha, x.dtype))
    alpha_sg = jax.lax.stop_gradient(alpha)
    above = jax.lax.stop_gradient((x >= alpha).astype(x.dtype))
    if signed:
        c = clip_inclusive(x, -alpha_sg, alpha_sg) / alpha_sg
        x_q = _on_grid(discretize((c + 1.0) / 2.0, qkd_levels(bits, True), delta), grid_hook)
        below = jax.lax.stop_gradient((x <= -alpha).astype(x.dtype))
        # Forward: alpha (2 x_q - 1). Backward to alpha: +1 at or above alpha, -1 at or below -alpha.
        return alpha_sg * (2.0 * x_q - 1.0) + (alpha - alpha_sg) * (above - below)
    x_q = _on_grid(discretize(clip_inclusive(x, 0.0, alpha_sg) / alpha_sg, 2**bits, delta), grid_hook)
    # Forward: alpha * x_q. Backward to alpha: 1 where x >= alpha (the second term), 0 inside.
    return alpha_sg * x_q + (alpha - alpha_sg) * above


def lsq_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P) of LSQ: unsigned (0, 2**b - 1); signed (2**(b-1), 2**(b-1) - 1).

    A 1-bit signed LSQ grid would be {-s, 0}; qkd_jax uses the binary grid {-s, +s} instead
    (Q_N = Q_P = 1, two levels), the usual meaning of a 1-bit weight.
    """
    bits = check_bits(bits)
    if not signed:
        return 0, 2**bits - 1
    if bits == 1:
        return 1, 1
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def _scale_gradient(x: jax.Array, scale) -> jax.Array:
    """Identity in the forward pass; multiplies the gradient by `scale` (LSQ's grad_scale).

    Written as x + (s - s) rather than (x - s) + s so that the forward value is exactly x
    (the latter can be one ulp off, which moves elements on a clip bound or a tie).
    """
    scaled = x * scale
    return jax.lax.stop_gradient(x) + (scaled - jax.lax.stop_gradient(scaled))


def lsq(x: jax.Array, step, bits: int, *, signed: bool, delta=0.0, grid_hook: GridHook = None) -> jax.Array:
    """LSQ quantizer (Esser et al. 2020) with a learnable step `step` > 0.

        v_hat = step * round(clip(x / step, -Q_N, Q_P))
              = step * ((Q_N + Q_P) * discretize(x_n, Q_N + Q_P + 1, delta) - Q_N),
        x_n = (clip(x / step, -Q_N, Q_P) + Q_N) / (Q_N + Q_P)

    With delta = 0: d v_hat / d x = 1 inside the clip range, 0 outside; d v_hat / d step =
    round(x/step) - x/step inside, -Q_N below, Q_P above; the step's gradient is multiplied by
    1 / sqrt(n * Q_P), n = number of elements sharing one step (x.size / step.size).
    The 1-bit signed grid is {-step, +step} (see `lsq_bounds`).

    n counts the array this call sees. In the data-parallel train step (shard_map over 'data',
    gradients pmean'd) that is the per-replica batch, so on R devices an activation step's
    gradient is sqrt(R) times the one-device gradient for the same global batch; weight steps
    are unchanged (weights are not split). This is the per-replica count of the released
    PyTorch DDP code (MQBench LSQ); docs/method.md sections 2 and 10.
    """
    bits = check_bits(bits)
    check_positive(step, "step")
    x = jnp.asarray(x)
    q_n, q_p = lsq_bounds(bits, signed)
    span = q_n + q_p
    step = positive_width(jnp.asarray(step, x.dtype))
    n_per_step = x.size // max(step.size, 1)
    step = _scale_gradient(step, 1.0 / math.sqrt(n_per_step * q_p))
    v = clip_inclusive(x / step, -float(q_n), float(q_p))
    if signed and bits == 1:
        # grid {-1, +1}: x_n = (v + 1) / 2 is exact in floating point
        return step * (2.0 * _on_grid(discretize((v + 1.0) / 2.0, 2, delta), grid_hook) - 1.0)
    # round(v) itself, as LSQ's formula says: going through x_n = (v + Q_N) / span and back
    # (x_n * span) is not exact in floating point and would move ties k + 1/2 off half-to-even.
    # q_n is 0 or even, so round(v) + q_n = round(v + q_n): the same grid and EWGS factor.
    r = discretize_index(v, span + 1, delta)
    if grid_hook is None:
        return step * r
    return step * (grid_hook((r + q_n) / span) * span - q_n)


def dorefa_weight(w: jax.Array, bits: int, delta=0.0, grid_hook: GridHook = None) -> jax.Array:
    """DoReFa weight quantizer (Zhou et al. 2016); no learnable parameters.

        b > 1: w' = tanh(w) / (2 max|tanh(w)|) + 0.5,  returns 2 * discretize(w', 2**b, delta) - 1
        b = 1: returns sign(w) * E, E = stop_gradient(mean|w|), identity (straight-through)
               gradient, via discretize(clip(0.5 + w / (2E), 0, 1), 2, delta) (w = 0 maps to -E).
    """
    bits = check_bits(bits)
    w = jnp.asarray(w)
    if bits == 1:
        e = jax.lax.stop_gradient(jnp.mean(jnp.abs(w)))
        e = jnp.where(e > 0, e, 1.0)
        x_n = clip_straight_through(0.5 + w / (2.0 * e), 0.0, 1.0)
        return e * (2.0 * _on_grid(discretize(x_n, 2, delta), grid_hook) - 1.0)
    t = jnp.tanh(w)
    x_n = t / (2.0 * jnp.max(jnp.abs(t))) + 0.5
    return 2.0 * _on_grid(discretize(x_n, 2**bits, delta), grid_hook) - 1.0


def dorefa_activation(x: jax.Array, bits: int, delta=0.0, grid_hook: GridHook = None, *,
                      signed: bool = False) -> jax.Array:
    """DoReFa activation quantizer: discretize(clip(x, 0, 1), 2**bits, delta).

    signed (our choice; the paper defines the unsigned form only): c = clip(x, -1, 1), returns
    2 discretize((c + 1) / 2, L, delta) - 1 on L = 2**b - 1 levels, a symmetric grid with a zero
    level and step 1 / (2**(b-1) - 1) (1 bit: L = 2, {-1, +1}); the signed PACT grid with alpha = 1.
    """
    bits = check_bits(bits)
    x = jnp.asarray(x)
    if signed:
        c = clip_inclusive(x, -1.0, 1.0)
        return 2.0 * _on_grid(discretize((c + 1.0) / 2.0, qkd_levels(bits, True), delta), grid_hook) - 1.0
    return _on_grid(discretize(clip_inclusive(x, 0.0, 1.0), 2**bits, delta), grid_hook)


def qkd_levels(bits: int, signed: bool) -> int:
    """Grid size of the QKD quantizer: signed has 2**(b-1) - 1 positive levels, a zero and
    their negatives (2**b - 1 levels); 1-bit signed is {-1, +1}; unsigned has 2**b levels."""
    bits = check_bits(bits)
    if not signed:
        return 2**bits
    return 2 if bits == 1 else 2**bits - 1


def qkd_interval(x: jax.Array, interval, bits: int, *, signed: bool, delta=0.0, grid_hook: GridHook = None) -> jax.Array:
    """QKD interval quantizer with a learnable layer-wise interval I > 0.

        signed (weights):      c = clip(x / I, -1, 1),  returns I * (2 * discretize((c + 1) / 2, L) - 1),
                               L = 2**b - 1 (symmetric grid with zero; 1 bit: L = 2, sign(x) * I)
        unsigned (activations): returns I * discretize(clip(x / I, 0, 1), 2**b, delta)

    The gradient to I is autodiff of this expression with the rounding straight-through
    (LSQ-style): q - x/I inside the interval, +-1 (signed) or 1 (unsigned) beyond it.
    """
    bits = check_bits(bits)
    check_positive(interval, "interval")
    x = jnp.asarray(x)
    interval = positive_width(jnp.asarray(interval, x.dtype))
    levels = qkd_levels(bits, signed)
    if signed:
        c = clip_inclusive(x / interval, -1.0, 1.0)
        return interval * (2.0 * _on_grid(discretize((c + 1.0) / 2.0, levels, delta), grid_hook) - 1.0)
    return interval * _on_grid(discretize(clip_inclusive(x / interval, 0.0, 1.0), levels, delta), grid_hook)
