"""What a quantized layer does with its weights and input, as pure functions of a LayerPrecision.

Collections and names shared by the quantized layers, calibration and the train loop:

    params[...layer...]['quant'][name]     learnable quantizer parameters (own optimizer group)
    quant_delta[...layer...]['w' | 'a']     EWGS delta scalars (not trained; default 0.0 = STE)
    perturbations[...layer...]['w_q' | 'a_q']  zero perturbations on the discretizer outputs x_q
    quant_calibration[...layer...]['quant']    written only while calibrating

Learnable quantizer parameters (scalars, per tensor) are those of the layer's method record
(`qkd_jax.quant.methods`): interval w_lower, w_upper, a_lower, a_upper; pact a_alpha; lsq
w_step, a_step; qkd w_interval, a_interval; dorefa none. `output_scale` is present whenever the
rule asks for it; the 'w_*' / 'a_*' entries only when that side is quantized. Every function
here dispatches on the record, never on the method's name.

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

from qkd_jax.quant.methods import QUANT_METHODS, get_method
from qkd_jax.quant.precision import LayerPrecision

QUANT = "quant"
DELTA_COLLECTION = "quant_delta"
CALIBRATION_COLLECTION = "quant_calibration"
PERTURBATIONS = "perturbations"

Hook = Optional[Callable[[jax.Array], jax.Array]]

#: Every quantizer parameter name (unique across methods) and its placeholder value.
PLACEHOLDER_VALUES: dict[str, float] = {
    **{k: v for m in QUANT_METHODS.values() for k, v in (*m.weight_params.items(), *m.input_params.items())},
    "output_scale": 1.0,
}


def placeholder_params(lp: LayerPrecision) -> dict[str, float]:
    """Names and pre-calibration values of the layer's learnable quantizer parameters."""
    out: dict[str, float] = {}
    if not lp.quantized:
        return out
    method = get_method(lp.method)
    if lp.w_bits is not None:
        out.update(method.weight_params)
    if lp.a_bits is not None:
        out.update(method.input_params)
        if lp.pact_alpha is not None and "a_alpha" in out:
            out["a_alpha"] = float(lp.pact_alpha)
    if lp.output_scale:
        out["output_scale"] = 1.0
    return out


def quantize_weight(
    lp: LayerPrecision, w: jax.Array, q: Mapping[str, jax.Array], delta=0.0, hook: Hook = None
) -> jax.Array:
    """w_hat of the layer's method (identity when weights stay full precision)."""
    if not lp.quantized or lp.w_bits is None:
        return w
    return get_method(lp.method).quantize_weight(lp, w, q, delta, hook)


def quantize_input(
    lp: LayerPrecision, x: jax.Array, q: Mapping[str, jax.Array], delta=0.0, hook: Hook = None
) -> jax.Array:
    """a_hat of the layer's method (identity when activations stay full precision)."""
    if not lp.quantized or lp.a_bits is None:
        return x
    return get_method(lp.method).quantize_input(lp, x, q, delta, hook)


def weight_scale(lp: LayerPrecision, q: Mapping[str, jax.Array], w_hat: jax.Array) -> jax.Array:
    """float32 s_w with w_hat = s_w * (an integer) for every element (no gradient)."""
    return jax.lax.stop_gradient(get_method(lp.method).weight_scale(lp, q, w_hat))


def input_scale(lp: LayerPrecision, q: Mapping[str, jax.Array]) -> jax.Array:
    """float32 s_a with a_hat = s_a * (an integer) for every element (no gradient)."""
    return jax.lax.stop_gradient(get_method(lp.method).input_scale(lp, q))


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
