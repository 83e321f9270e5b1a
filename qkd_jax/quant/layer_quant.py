"""What a quantized layer does with its weights and input, as pure functions of a LayerPrecision.

Collections and names shared by the quantized layers, calibration and the train loop:

    params[...layer...]['quant'][name]     learnable quantizer parameters (own optimizer group)
    quant_delta[...layer...]['w' | 'a']     EWGS delta scalars (not trained; default 0.0 = STE)
    perturbations[...layer...]['w_q' | 'a_q']  zero perturbations on the discretizer outputs x_q
    quant_calibration[...layer...]['quant']    written only while calibrating

Learnable quantizer parameters per method (scalars, per tensor):
    interval: w_lower, w_upper, a_lower, a_upper, output_scale
    pact:     a_alpha (weights are DoReFa: no parameters)
    lsq:      w_step, a_step
    dorefa:   none
    qkd:      w_interval, a_interval
(`output_scale` is present whenever the rule asks for it; the 'w_*' / 'a_*' entries only when
that side is quantized.)

Integer factorisation. Every quantizer's output is a real scale times an integer:
w_hat = s_w q_w, a_hat = s_a q_a (`weight_scale`, `input_scale`; the grids are tabulated in
`export.codes`). A layer with both sides quantized computes

    y = layer(q_a, q_w) * (s_a * s_w) + bias         (`integer_valued`, `combined_scale`)

which equals layer(a_hat, w_hat) + bias mathematically (the conv / matmul is linear), with the
same gradients. The point is exactness: q_a, q_w are integers held in floats, so every product
and partial sum of the convolution is an integer, exact in float32 while
fan_in * max|q_a| * max|q_w| <= 2^24 (e.g. any 3x3x512 layer at 4 bits or less). The result is
then the same on every processor whatever XLA's summation order, vector width or FMA use, and
bit-identical to the int32 accumulator of the integer export.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax.quant.positive import positive_width
from qkd_jax.quant.quantizers import dorefa_activation, dorefa_weight, interval_quantize, lsq, pact, qkd_interval
from qkd_jax.quant.rules import LayerPrecision

QUANT = "quant"
DELTA_COLLECTION = "quant_delta"
CALIBRATION_COLLECTION = "quant_calibration"
PERTURBATIONS = "perturbations"

Hook = Optional[Callable[[jax.Array], jax.Array]]

# Placeholder values before calibration (valid, data independent). Calibrate before training.
_WEIGHT_PLACEHOLDERS = {
    "interval": {"w_lower": -1.0, "w_upper": 1.0},
    "lsq": {"w_step": 1.0},
    "qkd": {"w_interval": 1.0},
}
_INPUT_PLACEHOLDERS = {
    "interval": {"a_lower": 0.0, "a_upper": 1.0},
    "pact": {"a_alpha": 6.0},
    "lsq": {"a_step": 1.0},
    "qkd": {"a_interval": 1.0},
}

#: Every quantizer parameter name (names are unique across methods) and its placeholder value.
PLACEHOLDER_VALUES: dict[str, float] = {
    **{k: v for d in _WEIGHT_PLACEHOLDERS.values() for k, v in d.items()},
    **{k: v for d in _INPUT_PLACEHOLDERS.values() for k, v in d.items()},
    "output_scale": 1.0,
}


def placeholder_params(lp: LayerPrecision) -> dict[str, float]:
    """Names and pre-calibration values of the layer's learnable quantizer parameters."""
    out: dict[str, float] = {}
    if not lp.quantized:
        return out
    if lp.w_bits is not None:
        out.update(_WEIGHT_PLACEHOLDERS.get(lp.method, {}))
    if lp.a_bits is not None:
        out.update(_INPUT_PLACEHOLDERS.get(lp.method, {}))
        if lp.method == "pact" and lp.pact_alpha is not None:
            out["a_alpha"] = float(lp.pact_alpha)
    if lp.output_scale:
        out["output_scale"] = 1.0
    return out


def quantize_weight(
    lp: LayerPrecision, w: jax.Array, q: Mapping[str, jax.Array], delta=0.0, hook: Hook = None
) -> jax.Array:
    """w_hat of the layer's method (identity when weights stay full precision).

    interval: 2 x_q - 1 in [-1, 1];  pact, dorefa: DoReFa;  lsq: signed LSQ;  qkd: signed QKD grid.
    """
    if not lp.quantized or lp.w_bits is None:
        return w
    b, m = lp.w_bits, lp.method
    if m == "interval":
        return interval_quantize(w, q["w_lower"], q["w_upper"], b, signed=True, delta=delta, grid_hook=hook)
    if m in ("pact", "dorefa"):
        return dorefa_weight(w, b, delta=delta, grid_hook=hook)
    if m == "lsq":
        return lsq(w, q["w_step"], b, signed=True, delta=delta, grid_hook=hook)
    if m == "qkd":
        return qkd_interval(w, q["w_interval"], b, signed=True, delta=delta, grid_hook=hook)
    raise ValueError(f"unknown method {m!r}")


def quantize_input(
    lp: LayerPrecision, x: jax.Array, q: Mapping[str, jax.Array], delta=0.0, hook: Hook = None
) -> jax.Array:
    """a_hat of the layer's method (identity when activations stay full precision).

    interval: x_q in [0, 1];  pact: alpha x_q;  dorefa: x_q of clip(x, 0, 1);
    lsq: LSQ (signed if lp.a_signed);  qkd: QKD grid (signed if lp.a_signed).
    """
    if not lp.quantized or lp.a_bits is None:
        return x
    b, m = lp.a_bits, lp.method
    if m == "interval":
        return interval_quantize(x, q["a_lower"], q["a_upper"], b, signed=False, delta=delta, grid_hook=hook)
    if m == "pact":
        return pact(x, q["a_alpha"], b, delta=delta, grid_hook=hook)
    if m == "dorefa":
        return dorefa_activation(x, b, delta=delta, grid_hook=hook)
    if m == "lsq":
        return lsq(x, q["a_step"], b, signed=lp.a_signed, delta=delta, grid_hook=hook)
    if m == "qkd":
        return qkd_interval(x, q["a_interval"], b, signed=lp.a_signed, delta=delta, grid_hook=hook)
    raise ValueError(f"unknown method {m!r}")


def _reciprocal(n: int) -> jax.Array:
    """float32(1 / n) as a constant: scales are products of float32 numbers, never divisions,
    so every path (jit or not, any XLA rewrite of x / n) computes the same float32 value."""
    return jnp.float32(np.float32(1.0 / n))


def weight_scale(lp: LayerPrecision, q: Mapping[str, jax.Array], w_hat: jax.Array) -> jax.Array:
    """float32 s_w with w_hat = s_w * (an integer) for every element (no gradient).

    interval, dorefa/pact b > 1: 1 / (2^b - 1);  dorefa/pact b = 1: E = max|w_hat| (= mean|W|);
    lsq: |step|;  qkd: |I| / (2^(b-1) - 1) (b = 1: |I|).
    """
    b, m = lp.w_bits, lp.method
    if m == "interval" or (m in ("pact", "dorefa") and b > 1):
        s = _reciprocal(2**b - 1)
    elif m in ("pact", "dorefa"):
        s = jnp.max(jnp.abs(jnp.asarray(w_hat, jnp.float32)))
    elif m == "lsq":
        s = positive_width(jnp.asarray(q["w_step"], jnp.float32))
    elif m == "qkd":
        s = positive_width(jnp.asarray(q["w_interval"], jnp.float32))
        if b > 1:
            s = s * _reciprocal(2 ** (b - 1) - 1)
    else:
        raise ValueError(f"unknown method {m!r}")
    return jax.lax.stop_gradient(s)


def input_scale(lp: LayerPrecision, q: Mapping[str, jax.Array]) -> jax.Array:
    """float32 s_a with a_hat = s_a * (an integer) for every element (no gradient).

    interval, dorefa: 1 / (2^b - 1);  pact: |alpha| / (2^b - 1);  lsq: |step|;
    qkd: |I| / (2^b - 1) unsigned, |I| / (2^(b-1) - 1) signed (b = 1: |I|).
    """
    b, m = lp.a_bits, lp.method
    if m in ("interval", "dorefa"):
        s = _reciprocal(2**b - 1)
    elif m == "pact":
        s = positive_width(jnp.asarray(q["a_alpha"], jnp.float32)) * _reciprocal(2**b - 1)
    elif m == "lsq":
        s = positive_width(jnp.asarray(q["a_step"], jnp.float32))
    elif m == "qkd":
        s = positive_width(jnp.asarray(q["a_interval"], jnp.float32))
        steps = (2**b - 1) if not lp.a_signed else (2 ** (b - 1) - 1 if b > 1 else 1)
        if steps > 1:
            s = s * _reciprocal(steps)
    else:
        raise ValueError(f"unknown method {m!r}")
    return jax.lax.stop_gradient(s)


def combined_scale(s_a: jax.Array, s_w: jax.Array) -> jax.Array:
    """The float32 factor s_a * s_w of an integer conv / matmul (one product: the same float32
    value in the fake-quant layer and the integer export)."""
    return jnp.asarray(s_a, jnp.float32) * jnp.asarray(s_w, jnp.float32)


def integer_valued(v: jax.Array, scale: jax.Array) -> jax.Array:
    """v / scale rounded to the nearest integer in the forward pass; gradient 1 / scale.

    `v` is a quantizer output, within float rounding of scale * integer, so the rounding only
    removes that rounding error. u + stop_gradient(round(u) - u) is exactly round(u) in float
    arithmetic (round(u) - u is exact by Sterbenz's lemma, and the exact sum is representable).
    """
    u = v / jnp.asarray(scale, v.dtype)
    return u + jax.lax.stop_gradient(jnp.round(u) - u)


def add_bias(y: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """y + bias over the last (feature) axis, as nn.Conv / nn.Dense add it."""
    if bias is None:
        return y
    return y + jnp.asarray(bias, y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
