"""Method records of the released SQAKD Tiny-ImageNet quantizers (MQBench, docs/method.md section 9).

    'pact_released'    released DoReFa weights / released PACT activations (fixed alpha 6)
    'lsq_released'     LSQ on the signed grid for weights and activations (learnable steps)
    'dorefa_released'  released DoReFa weights / released DoReFa activations

Every grid is MQBench's signed symmetric one, codes r in [-2^(b-1), 2^(b-1) - 1] with zero point
0 (`released_quantizers`), whatever the sign of the input: `a_signed` is accepted and changes
nothing. Integer grids: (2^b, 1, 2^(b-1)), i.e. q = r; scales 2 / (2^b - 1) (DoReFa),
12 / (2^b - 1) (PACT), |step| (LSQ), float32 constants or the learned step, never divisions of
traced values. DoReFa activations are normalised by the batch's max|tanh(x)| before rounding:
the grid and scale are fixed, the codes depend on the batch (as in the released code), and the
integer export reproduces them batch by batch (it computes codes with the quantizer itself).

Full-range layers (`LayerPrecision.full_range`, the released "32-bit" first and last layers):
no rounding, only the transforms the released 32-bit quantizers still apply: DoReFa's
tanh(X) / (max|tanh(X)| + 1e-5) of weights (PACT and DoReFa) and inputs (DoReFa), PACT's clip
of the input to [-6, 6]. LSQ's 32-bit grid (step 2 mean|x| / sqrt(2^31 - 1)) is treated as full
precision (`FULL_RANGE_METHODS` leaves it out; docs/method.md section 9).

Calibration closed forms (x = the layer's input, W = its kernel): LSQ
w_released_step = 2 mean|W| / sqrt(2^(b-1) - 1), a_released_step = 2 mean|x| / sqrt(2^(b-1) - 1);
PACT and DoReFa have nothing to calibrate (their scales are constants). The released records
calibrate on full-precision inputs (`calibration.calibrate(..., fp_inputs=True)`, chosen by
`config.quant.variant='released'`).

Registered on import; `qkd_jax.quant.methods` imports this module at its end, so the records are
present wherever QUANT_METHODS is read.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qkd_jax.quant.methods import GridSpec, QuantMethod, _f32, register
from qkd_jax.quant.positive import positive_width
from qkd_jax.quant.precision import LayerPrecision
from qkd_jax.quant.released_quantizers import (
    dorefa_normalize,
    dorefa_scale,
    dorefa_signed,
    lsq_signed,
    pact_clip,
    pact_scale,
    pact_signed,
    signed_bounds,
)
from qkd_jax.quant.statistics import positive_or_one

#: Textbook method name -> its released record.
RELEASED_METHODS = {"pact": "pact_released", "lsq": "lsq_released", "dorefa": "dorefa_released"}
#: Released records whose "32-bit" layers keep a transform (full_range=True is accepted).
FULL_RANGE_METHODS = ("pact_released", "dorefa_released")


def _bits(bits: int, name: str) -> int:
    """The released grids need b >= 2 (b = 1: q_max = 0, LSQ's init and grad scale divide by it)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name}={bits!r}: the released (MQBench) quantizers take 2..8 bits; use 2 or more, "
                         f"or quant.variant='textbook' for 1-bit layers")
    return bits


def _signed_grid(bits: int, signed: bool = True) -> GridSpec:
    """Codes k = r + 2^(b-1) in [0, 2^b - 1]: q = k - 2^(b-1) = r."""
    return 2**bits, 1, -signed_bounds(_bits(bits, "bits"))[0]


def _const(value) -> jax.Array:
    return jnp.float32(value)


def _no_params(lp: LayerPrecision, x: jax.Array) -> dict:
    return {}


def _full_range_unsupported(lp: LayerPrecision) -> None:
    if lp.full_range:
        raise ValueError(f"method {lp.method!r} has no full-range (32-bit) layer; keep the layer full "
                         f"precision (fp=True). Full-range methods: {FULL_RANGE_METHODS}")


def _dorefa_w(lp: LayerPrecision, w, q, delta=0.0, hook=None):
    if lp.full_range:
        return dorefa_normalize(w)
    return dorefa_signed(w, _bits(lp.w_bits, "w_bits"), delta, hook)


def _released_weight_scale(lp: LayerPrecision, q, w_hat) -> jax.Array:
    """The released DoReFa weight scale 2 / (2^b - 1), a float32 constant (PACT and DoReFa records)."""
    return _const(dorefa_scale(_bits(lp.w_bits, "w_bits")))


def _pact_x(lp: LayerPrecision, x, q, delta=0.0, hook=None):
    if lp.full_range:
        return pact_clip(x)
    return pact_signed(x, _bits(lp.a_bits, "a_bits"), delta, hook)


def _dorefa_weight_record(name: str, quantize_input, input_scale) -> QuantMethod:
    """A released record with DoReFa weights, no learnable parameters and the signed grids; the
    PACT and DoReFa records differ only in their input quantizer and its scale."""
    return register(QuantMethod(
        name=name,
        weight_params={},
        input_params={},
        quantize_weight=_dorefa_w,
        quantize_input=quantize_input,
        calibrate_weight=_no_params,
        calibrate_input=_no_params,
        weight_grid=_signed_grid,
        input_grid=_signed_grid,
        weight_scale=_released_weight_scale,
        input_scale=input_scale,
        input_sign="always",
    ))


PACT_RELEASED = _dorefa_weight_record(
    "pact_released", _pact_x, lambda lp, q: _const(pact_scale(_bits(lp.a_bits, "a_bits"))))


def _lsq_init(x: jax.Array, bits: int, name: str) -> jax.Array:
    """2 mean|x| / sqrt(q_max) (MQBench LSQObserver, q_max = 2^(b-1) - 1)."""
    return positive_or_one(2.0 * jnp.mean(jnp.abs(x)) / math.sqrt(signed_bounds(_bits(bits, name))[1]))


def _lsq_w(lp: LayerPrecision, w, q, delta=0.0, hook=None):
    _full_range_unsupported(lp)
    return lsq_signed(w, q["w_released_step"], _bits(lp.w_bits, "w_bits"), delta, hook)


def _lsq_x(lp: LayerPrecision, x, q, delta=0.0, hook=None):
    _full_range_unsupported(lp)
    return lsq_signed(x, q["a_released_step"], _bits(lp.a_bits, "a_bits"), delta, hook)


LSQ_RELEASED = register(QuantMethod(
    name="lsq_released",
    weight_params={"w_released_step": 1.0},
    input_params={"a_released_step": 1.0},
    quantize_weight=_lsq_w,
    quantize_input=_lsq_x,
    calibrate_weight=lambda lp, w: {"w_released_step": _lsq_init(w, lp.w_bits, "w_bits")},
    calibrate_input=lambda lp, x: {"a_released_step": _lsq_init(x, lp.a_bits, "a_bits")},
    weight_grid=_signed_grid,
    input_grid=_signed_grid,
    weight_scale=lambda lp, q, w_hat: positive_width(_f32(q["w_released_step"])),
    input_scale=lambda lp, q: positive_width(_f32(q["a_released_step"])),
    input_sign="always",
))


def _dorefa_x(lp: LayerPrecision, x, q, delta=0.0, hook=None):
    if lp.full_range:
        return dorefa_normalize(x)
    return dorefa_signed(x, _bits(lp.a_bits, "a_bits"), delta, hook)


DOREFA_RELEASED = _dorefa_weight_record(
    "dorefa_released", _dorefa_x, lambda lp, q: _const(dorefa_scale(_bits(lp.a_bits, "a_bits"))))


def full_range_transforms(lp: LayerPrecision) -> LayerPrecision:
    """The precision of the released calibration pass for layer `lp` (observers on, rounding off):
    the method's full-range transforms for released PACT / DoReFa, full precision otherwise."""
    if lp.quantized and lp.method in FULL_RANGE_METHODS:
        return dataclasses.replace(lp, full_range=True)
    return dataclasses.replace(lp, method="none")
