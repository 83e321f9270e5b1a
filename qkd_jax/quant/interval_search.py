"""The QKD weight interval that minimises the weight's quantization error on its grid.

QKD initialises the weight interval to I_W = max|W| (docs/method.md section 4). On the signed
2-bit grid {-I, 0, I} every weight with |w| < I/2 rounds to zero, which for a trained conv
kernel (max|W| of 4 to 6 standard deviations) is most of the tensor. `mse_interval` instead
picks, among n evenly spaced candidates I_k = max|W| k / n (k = 1..n, so max|W| itself is one
of them), the one with the smallest mean squared error mean((Q_I(W) - W)^2), with Q_I the QKD
signed quantizer itself (`qkd_interval`), so the search sees exactly the grid training uses.
Minimising the quantization MSE is the classical optimal-uniform-quantizer criterion (Max,
"Quantizing for minimum distortion", 1960; for a Gaussian and 3 levels the optimum step is
1.224 sigma); the candidate search is our choice. Ties keep the smallest interval (argmin).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qkd_jax.quant.quantizers import qkd_interval

#: Number of candidate intervals: a resolution of 1 % of max|W|.
MSE_CANDIDATES = 100


def mse_candidates(max_abs: jax.Array, n: int = MSE_CANDIDATES) -> jax.Array:
    """max_abs * k / n for k = 1..n (float32)."""
    if n < 1:
        raise ValueError(f"the interval search needs n >= 1 candidates, got {n}")
    k = jnp.arange(1, n + 1, dtype=jnp.float32)
    return jnp.asarray(max_abs, jnp.float32) * (k / n)


def interval_mse(w: jax.Array, interval: jax.Array, bits: int) -> jax.Array:
    """mean((Q_I(w) - w)^2) for the QKD signed quantizer at `bits` (forward only)."""
    w = jnp.asarray(w, jnp.float32)
    return jnp.mean(jnp.square(qkd_interval(w, interval, bits, signed=True) - w))


def mse_interval(w: jax.Array, bits: int, n: int = MSE_CANDIDATES) -> jax.Array:
    """The candidate interval max|W| k / n (k = 1..n) with the smallest `interval_mse`.

    Jit-compatible; the candidates are evaluated one after another (`lax.map`), so memory stays
    that of one tensor. An all-zero `w` gives 0 (the caller replaces degenerate values).
    """
    w = jax.lax.stop_gradient(jnp.asarray(w, jnp.float32))
    candidates = mse_candidates(jnp.max(jnp.abs(w)), n)
    errors = jax.lax.map(lambda i: interval_mse(w, i, bits), candidates)
    return candidates[jnp.argmin(errors)]
