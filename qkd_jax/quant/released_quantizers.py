"""The quantizers of the released SQAKD Tiny-ImageNet code (its bundled MQBench), as pure functions.

docs/method.md section 9. Every released quantizer ends in torch's per-tensor affine fake
quantization with zero point 0 on the signed symmetric grid (MQBench `'symmetry': True`):

    codes r in [q_min, q_max] = [-2^(b-1), 2^(b-1) - 1]
    forward:  u = x * (1 / s),  r = round(u) (half to even),  returns s * clip(r, q_min, q_max)
    backward: d/dx = 1 where q_min <= round(u) <= q_max, else 0   (torch's mask: on the *rounded* u)

`fake_quantize_signed` (fixed s: PACT, DoReFa) and `lsq_signed` (learnable s: LSQ, with
`torch._fake_quantize_learnable_per_tensor_affine`'s scale gradient) implement it; the
rounding goes through `discretize_index`, so `delta` > 0 gives the EWGS factor as everywhere
else and `grid_hook` sees x_q = (r - q_min) / (2^b - 1) (the export reads the code r - q_min off it).

    PACT (pact.py):    fixed s = alpha / ((q_max - q_min) / 2), alpha = 6 (never learned)
    DoReFa (dorefa.py): X = tanh(x); X = X / (max|X| + 1e-5); then s = 2 / (2^b - 1)
    LSQ (lsq.py):      s learned, its gradient times 1 / sqrt(x.size * q_max)

The "32-bit" first and last layers of the released code keep only the transforms
(`dorefa_normalize`, `pact_clip`), see `qkd_jax.quant.released_methods`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax.quant.clip import clip_inclusive
from qkd_jax.quant.discretize import discretize_index
from qkd_jax.quant.positive import positive_width
from qkd_jax.quant.quantizers import GridHook, _scale_gradient
from qkd_jax.quant.validation import check_bits, check_positive

#: PACT's alpha in the released code: the constructor default 6.0, never learned (section 9).
PACT_ALPHA = 6.0
#: The constant DoReFa adds to max|tanh(X)| before dividing (`dorefa.py`).
DOREFA_EPS = 1e-5


def signed_bounds(bits: int) -> tuple[int, int]:
    """(q_min, q_max) = (-2^(b-1), 2^(b-1) - 1) of MQBench's symmetric scheme (`scheme.py`)."""
    bits = check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def half_range(bits: int) -> float:
    """(q_max - q_min) / 2 = (2^b - 1) / 2, the divisor of torch's symmetric observer scale."""
    q_min, q_max = signed_bounds(bits)
    return (q_max - q_min) / 2.0


def pact_scale(bits: int, alpha: float = PACT_ALPHA) -> np.float32:
    """float32(alpha) / float32((q_max - q_min) / 2), as torch's observer computes it (0.8 at 4 bits)."""
    return np.float32(alpha) / np.float32(half_range(bits))


def dorefa_scale(bits: int) -> np.float32:
    """float32(1) / float32((q_max - q_min) / 2) = 2 / (2^b - 1): the MinMax observer's scale for
    inputs normalised to max |X| = 1 (the released value is m / (m + 1e-5) times this, see
    docs/method.md section 9)."""
    return np.float32(1.0) / np.float32(half_range(bits))


def _round_masked(u: jax.Array, bits: int, delta, grid_hook: GridHook) -> jax.Array:
    """clip(round(u), q_min, q_max) with gradient (EWGS factor) where round(u) is in range, else 0."""
    q_min, q_max = signed_bounds(bits)
    span = q_max - q_min
    r = discretize_index(u, span + 1, delta)
    r_sg = jax.lax.stop_gradient(r)
    inside = (r_sg >= q_min) & (r_sg <= q_max)
    r = jnp.where(inside, r, jnp.clip(r_sg, q_min, q_max))
    if grid_hook is None:
        return r
    return grid_hook((r - q_min) / span) * span + q_min


def fake_quantize_signed(x: jax.Array, scale, bits: int, delta=0.0, grid_hook: GridHook = None) -> jax.Array:
    """torch.fake_quantize_per_tensor_affine(x, scale, 0, -2^(b-1), 2^(b-1) - 1) with a fixed scale.

    No gradient flows to `scale`; d/dx = scale * (1 / scale) (1 up to one float32 rounding) where
    round(x / scale) is on the grid, 0 elsewhere.
    """
    check_positive(scale, "scale")
    x = jnp.asarray(x)
    scale = jax.lax.stop_gradient(jnp.asarray(scale, x.dtype))
    inv = jnp.asarray(1.0, x.dtype) / scale
    return scale * _round_masked(x * inv, bits, delta, grid_hook)


def lsq_signed(x: jax.Array, step, bits: int, delta=0.0, grid_hook: GridHook = None) -> jax.Array:
    """torch._fake_quantize_learnable_per_tensor_affine(x, |s|, 0, q_min, q_max, grad_factor).

    Forward as `fake_quantize_signed` with s = max(|step|, eps). Gradients: d/dx as there;
    d/ds = round(u) - u where round(u) is on the grid, q_min below, q_max above, times
    grad_factor = 1 / sqrt(x.size * q_max) (x.size includes the batch: the per-replica count).
    """
    check_positive(step, "step")
    x = jnp.asarray(x)
    q_max = signed_bounds(bits)[1]
    step = positive_width(jnp.asarray(step, x.dtype))
    step = _scale_gradient(step, 1.0 / math.sqrt(x.size * max(q_max, 1)))
    return step * _round_masked(x * (jnp.asarray(1.0, x.dtype) / step), bits, delta, grid_hook)


def dorefa_normalize(x: jax.Array) -> jax.Array:
    """X = tanh(x) / (max|tanh(x)| + 1e-5) over the whole tensor (autodiff through tanh and max)."""
    t = jnp.tanh(jnp.asarray(x))
    return t / (jnp.max(jnp.abs(t)) + DOREFA_EPS)


def dorefa_signed(x: jax.Array, bits: int, delta=0.0, grid_hook: GridHook = None) -> jax.Array:
    """Released DoReFa (weights, and activations per call, i.e. per batch): normalise, then the
    signed grid with s = 2 / (2^b - 1)."""
    return fake_quantize_signed(dorefa_normalize(x), dorefa_scale(bits), bits, delta, grid_hook)


def pact_signed(x: jax.Array, bits: int, delta=0.0, grid_hook: GridHook = None) -> jax.Array:
    """Released PACT after calibration: the signed grid with the fixed s = 6 / ((2^b - 1) / 2)."""
    return fake_quantize_signed(x, pact_scale(bits), bits, delta, grid_hook)


def pact_clip(x: jax.Array, alpha: float = PACT_ALPHA) -> jax.Array:
    """The released 32-bit PACT input quantizer, up to its 2^-31 alpha grid: clip to [-alpha, alpha]
    (gradient 1 inside, bounds included; torch's 32-bit mask drops the gradient at +alpha itself)."""
    return clip_inclusive(jnp.asarray(x), -alpha, alpha)
