"""Integer codes of every quantizer: the grid each method's forward pass rounds onto.

Every quantizer of `qkd_jax.quant.quantizers` rounds a normalised value onto L uniform points
(`discretize`) and maps the grid index k in [0, L - 1] (the *code*) back to a real value. The
map back is affine in k. Written with a signed integer value q and a real scale s:

    q = multiplier * k - zero_point          (an exact integer)
    real value = s * q                        (s a positive real number)

    weights (always signed)             L                 multiplier, zero_point     s
      interval        w_hat = 2 x_q - 1      2^b               2, L - 1                1 / (L - 1)
      dorefa/pact b>1 w_hat = 2 x_q - 1      2^b               2, L - 1                1 / (L - 1)
      dorefa/pact b=1 w_hat = E (2 x_q - 1)  2                 2, 1                    E = mean|W|
      lsq         b>1 w_hat = step * r       2^b               1, 2^(b-1)  (k = r + Q_N)  step
      lsq         b=1 w_hat = step (2x_q-1)  2                 2, 1                    step
      qkd         b>1 I (2 x_q - 1)          2^b - 1           1, 2^(b-1) - 1          I / (2^(b-1) - 1)
      qkd         b=1 I (2 x_q - 1)          2                 2, 1                    I

    activations                          L                 multiplier, zero_point     s
      interval    a_hat = x_q                2^b               1, 0                    1 / (L - 1)
      pact        a_hat = alpha x_q          2^b               1, 0                    alpha / (L - 1)
      dorefa      a_hat = x_q                2^b               1, 0                    1 / (L - 1)
      pact signed  b>1 alpha (2 x_q - 1)     2^b - 1           1, 2^(b-1) - 1          alpha / (2^(b-1) - 1)
      pact signed  b=1 alpha (2 x_q - 1)     2                 2, 1                    alpha
      dorefa signed b>1 2 x_q - 1            2^b - 1           1, 2^(b-1) - 1          1 / (2^(b-1) - 1)
      dorefa signed b=1 2 x_q - 1            2                 2, 1                    1
      lsq unsigned step * r                  2^b               1, 0                    step
      lsq signed  b>1 step * r               2^b               1, 2^(b-1)              step
      lsq signed  b=1 step (2 x_q - 1)       2                 2, 1                    step
      qkd unsigned I x_q                     2^b               1, 0                    I / (L - 1)
      qkd signed  b>1 I (2 x_q - 1)          2^b - 1           1, 2^(b-1) - 1          I / (2^(b-1) - 1)
      qkd signed  b=1 I (2 x_q - 1)          2                 2, 1                    I

(x_q = k / (L - 1) is the discretizer output on [0, 1].) Each grid's scale is the float32 value
the quantized layer itself multiplies by (`layer_quant.weight_scale` / `input_scale`: products of
float32 numbers such as |step| * float32(1 / (L - 1)), never divisions), so the integer export's
s_a * s_w is bit-identical to the fake-quant layer's. The interval method's |output_scale| is
*not* folded into s: it stays a separate float32 factor applied after the bias, exactly where
QConv / QDense apply it.

Exactness in float32. `s * q` is the real value of a grid point; the quantizer's float32 result
is a rounding of it (k / (L - 1) is not a float32 number for L - 1 not a power of two), and
*which* rounding depends on how the expression is evaluated: op by op JAX divides by L - 1,
XLA-compiled code (jit, the way the student trains and evaluates) multiplies by the float32
reciprocal of L - 1 -- the two differ in the last bit for about a third of the codes at 3 bits
and more. So an export that promised "dequant = a formula" would be exact on one path only. The
export therefore keeps, per weight tensor, the *codebook* `levels[k]`: the float32 value the
compiled student uses for code k (read off its fake-quantized weights; <= 256 floats per layer,
codes absent from the tensor get fl32(s * q)). `dequantize(codes) = levels[codes]` is then exact
by construction, and the export checks that every element with code k had that one value and
that levels agree with s * q to float32 rounding (which validates the grid derivation above).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax.quant.layer_quant import input_scale, quantize_input, weight_scale
from qkd_jax.quant.methods import QUANT_METHODS, get_method
from qkd_jax.quant.precision import LayerPrecision

# Quantizer parameter names per method and side, from the method records.
ACTIVATION_PARAMS = {name: tuple(m.input_params) for name, m in QUANT_METHODS.items()}
WEIGHT_PARAMS = {name: tuple(m.weight_params) for name, m in QUANT_METHODS.items()}
METHODS = tuple(QUANT_METHODS)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The integer grid of one quantizer: codes k in [0, levels - 1], q = multiplier * k - zero_point,
    real value = scale * q."""

    levels: int
    multiplier: int
    zero_point: int
    scale: float

    @property
    def q_min(self) -> int:
        return -self.zero_point

    @property
    def q_max(self) -> int:
        return self.multiplier * (self.levels - 1) - self.zero_point

    @property
    def max_abs_q(self) -> int:
        return max(abs(self.q_min), abs(self.q_max))

    def q(self, codes):
        """Signed integer values of the codes (numpy int32 or jnp int32, following the input)."""
        if isinstance(codes, np.ndarray):
            return codes.astype(np.int32) * np.int32(self.multiplier) - np.int32(self.zero_point)
        return codes.astype(jnp.int32) * self.multiplier - self.zero_point

    def to_json(self) -> dict:
        return {"levels": self.levels, "multiplier": self.multiplier, "zero_point": self.zero_point,
                "scale": float(self.scale)}


def _params32(q: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Per-tensor (scalar) quantizer parameters as float32 NumPy scalars."""
    out = {}
    for name, value in q.items():
        value = np.asarray(value, np.float32)
        if value.size != 1:
            raise ValueError(f"quantizer parameter {name!r} has shape {value.shape}; the export handles "
                             f"per-tensor (scalar) parameters")
        out[name] = value.reshape(())
    return out


def _f32(value) -> float:
    """A float32 scale as a Python float (exactly the float32 value the layer multiplies by)."""
    return float(np.float32(np.asarray(value)))


def weight_grid(lp: LayerPrecision, q: Mapping[str, object], w_hat: np.ndarray | None = None) -> Grid:
    """Grid of the layer's weight quantizer (the method record's grid and float32 scale). 1-bit
    DoReFa/PACT needs `w_hat` (its scale E = mean|W| is computed inside the forward pass;
    |w_hat| = E for every element)."""
    if lp.w_bits is None:
        raise ValueError("weights are full precision: no weight grid")
    method = get_method(lp.method)
    params = _params32({k: v for k, v in q.items() if k in method.weight_params})
    if method.weight_grid(lp.w_bits)[0] == 2 and not method.weight_params:  # 1-bit DoReFa: E from w_hat
        if w_hat is None:
            raise ValueError("1-bit DoReFa weights: the scale E is read from the fake-quantized weights")
        e = np.abs(np.asarray(w_hat, np.float32))
        if e.size == 0 or e.min() != e.max():
            raise ValueError("1-bit DoReFa weights do not all have the same magnitude E")
    levels, multiplier, zero_point = method.weight_grid(lp.w_bits)
    return Grid(levels, multiplier, zero_point, _f32(weight_scale(lp, params, w_hat)))


def activation_grid(lp: LayerPrecision, q: Mapping[str, object]) -> Grid:
    """Grid of the layer's input (activation) quantizer (the method record's grid and float32 scale)."""
    if lp.a_bits is None:
        raise ValueError("activations are full precision: no activation grid")
    method = get_method(lp.method)
    params = _params32({k: v for k, v in q.items() if k in method.input_params})
    levels, multiplier, zero_point = method.input_grid(lp.a_bits, lp.a_signed)
    return Grid(levels, multiplier, zero_point, _f32(input_scale(lp, params)))


@dataclasses.dataclass(frozen=True)
class WeightCodes:
    """Codes of one weight tensor (uint8, the kernel's shape), its grid and float32 codebook."""

    codes: np.ndarray
    grid: Grid
    levels: np.ndarray


def encode_weight(lp: LayerPrecision, q: Mapping[str, object], w_hat: np.ndarray) -> WeightCodes:
    """Codes of the fake-quantized weights `w_hat` (as the student computed them).

    k = rint((w_hat / s + zero_point) / multiplier): w_hat = fl32(s * q) within a few float32
    ulps, so the estimate is within ~1e-4 of the integer k (|q| <= 255) and rounding recovers it.

    Raises ValueError when a value is off the grid, or when one code would need two float32 values
    (then no codebook could reproduce w_hat).
    """
    w_hat = np.asarray(w_hat, np.float32)
    grid = weight_grid(lp, q, w_hat)
    estimate = (w_hat.astype(np.float64) / grid.scale + grid.zero_point) / grid.multiplier
    codes = np.rint(estimate)
    off_grid = np.abs(estimate - codes).max(initial=0.0) > 1e-2
    if off_grid or codes.min(initial=0) < 0 or codes.max(initial=0) > grid.levels - 1:
        raise ValueError(
            f"{lp.method} W{lp.w_bits}: fake-quantized weights are not on the grid {grid} "
            f"(largest distance {np.abs(estimate - codes).max():.3g} code units)")
    codes = codes.astype(np.uint8)
    ideal = grid.scale * grid.q(np.arange(grid.levels, dtype=np.int64)).astype(np.float64)
    levels = ideal.astype(np.float32)  # codes absent from the tensor: fl32(s * q)
    flat_codes, flat_w = codes.reshape(-1), w_hat.reshape(-1)
    present, first = np.unique(flat_codes, return_index=True)
    levels[present] = flat_w[first]
    if not np.array_equal(levels[flat_codes], flat_w):
        raise ValueError(f"{lp.method} W{lp.w_bits}: elements with the same code have different float32 values")
    # The codebook is a float32 rounding of the ideal grid value (validates the derivation above).
    tol = 4 * np.finfo(np.float32).eps * max(np.abs(ideal).max(initial=0.0), float(np.finfo(np.float32).tiny))
    if np.abs(levels.astype(np.float64) - ideal).max() > tol:
        raise ValueError(f"{lp.method} W{lp.w_bits}: codebook {levels} is not scale * q for grid {grid}")
    return WeightCodes(codes=codes, grid=grid, levels=levels)


def activation_codes(lp: LayerPrecision, x: jax.Array, q: Mapping[str, jax.Array], grid: Grid) -> jax.Array:
    """Activation codes k (int32) of input `x`, computed by the layer's own activation quantizer.

    The quantizer runs exactly as in the student's forward pass (same function, same parameters,
    delta irrelevant in the forward pass); its discretizer output x_q = k / (L - 1), within a float32
    rounding, is captured with `grid_hook` and k = round(x_q * (L - 1)) read off it.
    """
    captured: list[jax.Array] = []

    def hook(x_q):
        captured.append(x_q)
        return x_q

    quantize_input(lp, x, q, 0.0, hook)
    if len(captured) != 1:
        raise RuntimeError("activation quantizer did not reach its discretizer exactly once")
    return jnp.round(captured[0] * (grid.levels - 1)).astype(jnp.int32)
