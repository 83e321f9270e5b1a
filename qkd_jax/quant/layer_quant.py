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
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax

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
