"""One record per quantizer method: everything the rest of the library needs to know about it.

A `QuantMethod` holds the method's learnable parameters (names and pre-calibration values), its
weight and input quantizers (pure functions of `qkd_jax.quant.quantizers`), its calibration
closed forms, its integer grids (levels, multiplier, zero point: q = multiplier * code -
zero_point) and float32 scales (real value = scale * q), how it quantizes a signed input
(`input_sign`) and whether its layers carry an |output_scale|. Precision rules, the quantized
layers, calibration and the integer export read the record by name from `QUANT_METHODS`;
adding a method is one `register(QuantMethod(...))` and its tests (docs/architecture.md).

Parameter names are unique across methods: 'w_*' on the weight side, 'a_*' on the input side.
Calibration closed forms (x = the layer's input, W = its kernel, std with ddof=1):
    interval: w_upper = -w_lower = 3 std(W); a_upper = 3 std(x) / sqrt(1 - 2/pi), a_lower = min(x)
    pact:     a_alpha = the rule's constant, else 3 std(x) / sqrt(1 - 2/pi) (unsigned) or
              |mean(x)| + 3 std(x) (signed)
    lsq:      w_step = 2 mean|W| / sqrt(Q_P), a_step = 2 mean|x| / sqrt(Q_P)
    qkd:      w_interval = the candidate max|W| k / 100 (k = 1..100) with the least quantization MSE
              on the weight grid (`interval_search.mse_interval`; QKD's max|W| leaves most ternary
              weights at zero); a_interval = max(x) (unsigned) or max|x| (signed)
    dorefa:   nothing to calibrate
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax.quant.interval_search import mse_interval
from qkd_jax.quant.positive import positive_width
from qkd_jax.quant.precision import LayerPrecision
from qkd_jax.quant.quantizers import (
    dorefa_activation,
    dorefa_weight,
    interval_quantize,
    lsq,
    lsq_bounds,
    pact,
    qkd_interval,
)
from qkd_jax.quant.statistics import HALF_NORMAL, EPS, positive_or_one, sample_std

Params = Mapping[str, Any]
Hook = Optional[Callable[[jax.Array], jax.Array]]
#: (levels, multiplier, zero_point) of an integer grid: codes 0..levels-1, q = multiplier * code - zero_point.
GridSpec = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class QuantMethod:
    """A quantizer method (see the module docstring).

    quantize_weight(lp, w, q, delta, hook) / quantize_input(lp, x, q, delta, hook): w_hat, a_hat.
    calibrate_weight(lp, w) / calibrate_input(lp, x): {parameter name: value} from one batch.
    weight_grid(bits) / input_grid(bits, signed): the GridSpec of the quantizer's output.
    weight_scale(lp, q, w_hat) / input_scale(lp, q): float32 scales, w_hat = scale * q exactly
      up to float rounding (`layer_quant`, "Integer factorisation").
    """

    name: str
    weight_params: Mapping[str, float]
    input_params: Mapping[str, float]
    quantize_weight: Callable[..., jax.Array]
    quantize_input: Callable[..., jax.Array]
    calibrate_weight: Callable[[LayerPrecision, jax.Array], dict]
    calibrate_input: Callable[[LayerPrecision, jax.Array], dict]
    weight_grid: Callable[[int], GridSpec]
    input_grid: Callable[[int, bool], GridSpec]
    weight_scale: Callable[[LayerPrecision, Params, jax.Array], jax.Array]
    input_scale: Callable[[LayerPrecision, Params], jax.Array]
    # How signed inputs are handled: 'grid' (a signed grid with a_signed=True), 'always' (every
    # input on a signed grid; a_signed is accepted and ignored), 'offset' (a learnable lower bound
    # covers them; a_signed is accepted and ignored), 'none' (unsigned only).
    input_sign: str = "none"
    output_scale: bool = False  # layers carry a learnable |output_scale| by default

    @property
    def signed_inputs(self) -> bool:
        """a_signed=True is accepted."""
        return self.input_sign != "none"


QUANT_METHODS: dict[str, QuantMethod] = {}
#: The values of QuantMethod.input_sign.
INPUT_SIGNS = ("grid", "always", "offset", "none")


def register(method: QuantMethod) -> QuantMethod:
    """Adds `method` to QUANT_METHODS (names and parameter names must be new)."""
    if method.input_sign not in INPUT_SIGNS:
        raise ValueError(f"method {method.name!r}: input_sign must be one of {INPUT_SIGNS}")
    if method.name in QUANT_METHODS or method.name == "none":
        raise ValueError(f"quantizer method {method.name!r} is already registered")
    taken = {p for m in QUANT_METHODS.values() for p in (*m.weight_params, *m.input_params)}
    clash = taken & {*method.weight_params, *method.input_params}
    if clash:
        raise ValueError(f"method {method.name!r}: parameter names {sorted(clash)} are taken")
    QUANT_METHODS[method.name] = method
    return method


def get_method(name: str) -> QuantMethod:
    if name not in QUANT_METHODS:
        raise ValueError(f"unknown quantizer method {name!r}; registered: {sorted(QUANT_METHODS)}")
    return QUANT_METHODS[name]


# ------------------------------------------------------------------------- shared pieces


def reciprocal(n: int) -> jax.Array:
    """float32(1 / n) as a constant: scales are products of float32 numbers, never divisions,
    so every path (jit or not, any XLA rewrite of x / n) computes the same float32 value."""
    return jnp.float32(np.float32(1.0 / n))


def _f32(x: Any) -> jax.Array:
    return jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))


def _none(lp: LayerPrecision, x: jax.Array) -> dict:
    return {}


def _symmetric_odd(bits: int) -> GridSpec:
    """2 x_q - 1 on 2^b levels: q = 2 code - (2^b - 1) (1 bit: {-1, +1})."""
    return 2**bits, 2, 2**bits - 1


def _unsigned(bits: int, signed: bool = False) -> GridSpec:
    return 2**bits, 1, 0


def _qkd_grid(bits: int, signed: bool = True) -> GridSpec:
    """Signed: 2^(b-1) - 1 positive levels, zero and their negatives (1 bit: {-1, +1})."""
    if not signed:
        return 2**bits, 1, 0
    if bits == 1:
        return 2, 2, 1
    return 2**bits - 1, 1, 2 ** (bits - 1) - 1


def _qkd_scale(interval: Any, bits: int, signed: bool) -> jax.Array:
    """|I| / (number of positive steps): 2^b - 1 unsigned, 2^(b-1) - 1 signed (1 bit: |I|)."""
    steps = (2**bits - 1) if not signed else (2 ** (bits - 1) - 1 if bits > 1 else 1)
    s = positive_width(_f32(interval))
    return s * reciprocal(steps) if steps > 1 else s


def _odd_scale(lp: LayerPrecision, q: Params, w_hat: jax.Array) -> jax.Array:
    return reciprocal(2**lp.w_bits - 1)


def _unsigned_input_scale(lp: LayerPrecision, q: Params) -> jax.Array:
    return reciprocal(2**lp.a_bits - 1)


def _dorefa_weight_scale(lp: LayerPrecision, q: Params, w_hat: jax.Array) -> jax.Array:
    """1 / (2^b - 1); 1 bit: E = mean|W|, read off w_hat (= +-E)."""
    if lp.w_bits > 1:
        return reciprocal(2**lp.w_bits - 1)
    return jnp.max(jnp.abs(_f32(w_hat)))


def _dorefa_weight_grid(bits: int) -> GridSpec:
    return _symmetric_odd(bits) if bits > 1 else (2, 2, 1)


def _dorefa_w(lp, w, q, delta=0.0, hook=None):
    return dorefa_weight(w, lp.w_bits, delta=delta, grid_hook=hook)


# ------------------------------------------------------------------------------- records


def _interval_calibrate_weight(lp: LayerPrecision, w: jax.Array) -> dict:
    s = positive_or_one(3.0 * sample_std(w))
    return {"w_lower": -s, "w_upper": s}


def _interval_calibrate_input(lp: LayerPrecision, x: jax.Array) -> dict:
    lower = jnp.min(x)
    upper = 3.0 * sample_std(x) / HALF_NORMAL
    upper = jnp.where(upper > lower, upper, jnp.max(x))
    return {"a_lower": lower, "a_upper": jnp.where(upper > lower + EPS, upper, lower + 1.0)}


INTERVAL = register(QuantMethod(
    name="interval",
    weight_params={"w_lower": -1.0, "w_upper": 1.0},
    input_params={"a_lower": 0.0, "a_upper": 1.0},
    quantize_weight=lambda lp, w, q, delta=0.0, hook=None: interval_quantize(
        w, q["w_lower"], q["w_upper"], lp.w_bits, signed=True, delta=delta, grid_hook=hook),
    quantize_input=lambda lp, x, q, delta=0.0, hook=None: interval_quantize(
        x, q["a_lower"], q["a_upper"], lp.a_bits, signed=False, delta=delta, grid_hook=hook),
    calibrate_weight=_interval_calibrate_weight,
    calibrate_input=_interval_calibrate_input,
    weight_grid=_symmetric_odd,
    input_grid=_unsigned,
    weight_scale=_odd_scale,
    input_scale=_unsigned_input_scale,
    input_sign="offset",
    output_scale=True,
))


def _pact_calibrate_input(lp: LayerPrecision, x: jax.Array) -> dict:
    """The rule's constant, else 3 std(x) / sqrt(1 - 2/pi) unsigned (3 sigma of a half-normal)
    or |mean(x)| + 3 std(x) signed (mean +- 3 std inside [-alpha, alpha]; 3 sigma of a
    zero-mean normal)."""
    if lp.pact_alpha is not None:
        return {"a_alpha": jnp.asarray(lp.pact_alpha, jnp.float32)}
    if lp.a_signed:
        return {"a_alpha": positive_or_one(jnp.abs(jnp.mean(x)) + 3.0 * sample_std(x))}
    return {"a_alpha": positive_or_one(3.0 * sample_std(x) / HALF_NORMAL)}


def _pact_input_scale(lp: LayerPrecision, q: Params) -> jax.Array:
    """|alpha| / (2^b - 1) unsigned, |alpha| / (2^(b-1) - 1) signed (1 bit: |alpha|)."""
    return _qkd_scale(q["a_alpha"], lp.a_bits, lp.a_signed)


PACT = register(QuantMethod(
    name="pact",
    weight_params={},
    input_params={"a_alpha": 6.0},
    quantize_weight=_dorefa_w,
    quantize_input=lambda lp, x, q, delta=0.0, hook=None: pact(x, q["a_alpha"], lp.a_bits, delta=delta,
                                                                grid_hook=hook, signed=lp.a_signed),
    calibrate_weight=_none,
    calibrate_input=_pact_calibrate_input,
    weight_grid=_dorefa_weight_grid,
    input_grid=_qkd_grid,
    weight_scale=_dorefa_weight_scale,
    input_scale=_pact_input_scale,
    input_sign="grid",
))

def _lsq_grid(bits: int, signed: bool = True) -> GridSpec:
    """LSQ's integers r in [-Q_N, Q_P] as codes r + Q_N (1-bit signed: {-1, +1})."""
    if not signed:
        return 2**bits, 1, 0
    if bits == 1:
        return 2, 2, 1
    return 2**bits, 1, lsq_bounds(bits, True)[0]


def _lsq_step(x: jax.Array, bits: int, signed: bool) -> jax.Array:
    return positive_or_one(2.0 * jnp.mean(jnp.abs(x)) / math.sqrt(lsq_bounds(bits, signed)[1]))


LSQ = register(QuantMethod(
    name="lsq",
    weight_params={"w_step": 1.0},
    input_params={"a_step": 1.0},
    quantize_weight=lambda lp, w, q, delta=0.0, hook=None: lsq(w, q["w_step"], lp.w_bits, signed=True,
                                                                delta=delta, grid_hook=hook),
    quantize_input=lambda lp, x, q, delta=0.0, hook=None: lsq(x, q["a_step"], lp.a_bits, signed=lp.a_signed,
                                                               delta=delta, grid_hook=hook),
    calibrate_weight=lambda lp, w: {"w_step": _lsq_step(w, lp.w_bits, True)},
    calibrate_input=lambda lp, x: {"a_step": _lsq_step(x, lp.a_bits, lp.a_signed)},
    weight_grid=_lsq_grid,
    input_grid=_lsq_grid,
    weight_scale=lambda lp, q, w_hat: positive_width(_f32(q["w_step"])),
    input_scale=lambda lp, q: positive_width(_f32(q["a_step"])),
    input_sign="grid",
))


DOREFA = register(QuantMethod(
    name="dorefa",
    weight_params={},
    input_params={},
    quantize_weight=_dorefa_w,
    quantize_input=lambda lp, x, q, delta=0.0, hook=None: dorefa_activation(x, lp.a_bits, delta=delta,
                                                                             grid_hook=hook, signed=lp.a_signed),
    calibrate_weight=_none,
    calibrate_input=_none,
    weight_grid=_dorefa_weight_grid,
    input_grid=_qkd_grid,
    weight_scale=_dorefa_weight_scale,
    input_scale=lambda lp, q: _qkd_scale(1.0, lp.a_bits, lp.a_signed),
    input_sign="grid",
))


QKD = register(QuantMethod(
    name="qkd",
    weight_params={"w_interval": 1.0},
    input_params={"a_interval": 1.0},
    quantize_weight=lambda lp, w, q, delta=0.0, hook=None: qkd_interval(w, q["w_interval"], lp.w_bits, signed=True,
                                                                         delta=delta, grid_hook=hook),
    quantize_input=lambda lp, x, q, delta=0.0, hook=None: qkd_interval(x, q["a_interval"], lp.a_bits,
                                                                        signed=lp.a_signed, delta=delta,
                                                                        grid_hook=hook),
    calibrate_weight=lambda lp, w: {"w_interval": positive_or_one(mse_interval(w, lp.w_bits))},
    calibrate_input=lambda lp, x: {"a_interval": positive_or_one(jnp.max(jnp.abs(x)) if lp.a_signed
                                                                 else jnp.max(x))},
    weight_grid=_qkd_grid,
    input_grid=_qkd_grid,
    weight_scale=lambda lp, q, w_hat: _qkd_scale(q["w_interval"], lp.w_bits, True),
    input_scale=lambda lp, q: _qkd_scale(q["a_interval"], lp.a_bits, lp.a_signed),
    input_sign="grid",
))


# The released SQAKD Tiny-ImageNet (MQBench) records register themselves on import.
from qkd_jax.quant import released_methods  # noqa: E402,F401
