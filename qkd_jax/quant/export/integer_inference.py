"""Reference integer inference of an export: the student's own flax graph with its quantized
layers swapped for integer arithmetic.

    model = load_model(exported)                    # or the flax student module itself
    logits = IntegerModel(model, exported)(images)

Approach. Writing a graph interpreter for arbitrary flax models is error-prone, so the flax
model runs unchanged under `flax.linen.intercept_methods`, and the interceptor replaces three
kinds of call, reading only from the export:

  * a quantized QConv / QDense (path in manifest.layers):
        k_a = the layer's activation quantizer's codes of the float input x (the library
              quantizer itself, with the exported parameters; codes.activation_codes)
        q_a = m_a k_a - z_a,  q_w = m_w k_w - z_w                     (exact integers)
        acc = conv_or_dot(q_a, q_w)   int32 operands, int32 accumulation
              (lax.conv_general_dilated / lax.dot_general with preferred_element_type=int32,
              through flax's own nn.Conv / nn.Dense so padding, strides, dilation and groups are
              the layer's)
        y   = (float32(acc) * (s_a s_w) + bias) * |output_scale|
    The real-valued layer is sum (s_a q_a)(s_w q_w) = s_a s_w sum q_a q_w, so only the final
    scale is float. With the codes k instead of q (a kernel working on unsigned codes), the
    zero points give correction terms, by linearity of the convolution:
        sum q_a q_w = m_a m_w conv(k_a, k_w) - m_a z_w conv(k_a, 1) - z_a m_w conv(1, k_w)
                      + z_a z_w conv(1, 1)
    where 1 is an all-ones input (zero-padded like k_a: padded taps are real zeros, q_a = 0) or
    kernel; conv(1, k_w) and conv(1, 1) depend on the input only through its shape.
    `zero_points='expand'` computes these four terms, `'fold'` (default) the one conv on q;
    both give the same int32 accumulator (tested). Layers with only one side quantized run in
    float: weights-only layers convolve x with the exact dequantized kernel levels[k_w],
    activations-only layers convolve the quantizer output with the stored FP kernel.
  * a BatchNorm (manifest.batchnorm): y = (x - mean) * mul + add, flax's own inference expression.
  * everything else (ReLU, pooling, residual adds, FP stem / classifier, ...) runs as written in
    the model, with the export's FP arrays as its variables.

Exactness. The int32 accumulator is the exact sum (|acc| <= accumulator_bound < 2^31, checked at
export). The fake-quant layer computes the same sum on the same integers held in float32
(`layer_quant`, "Integer factorisation"), exact while the sum stays below 2^24, and multiplies
by the same float32 scale s_a * s_w; the BatchNorms here evaluate flax's own expression. So on
identical inputs both paths give bit-identical layer outputs and activation codes wherever the
float32 sum is exact. What can still differ is rounding in the float ops that XLA compiles
separately for each graph (fused multiply-adds in the scaling, bias and BatchNorm, the FP stem):
an activation within about one float32 ulp of a rounding boundary of its quantizer can get the
neighbouring code. tests/e2e/test_export_digits.py checks that only such activations differ.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qkd_jax.quant.export import codes as qcodes
from qkd_jax.quant.export.exporter import ExportError, _bn_running_average
from qkd_jax.quant.export.fileformat import INT32_MAX, IntegerExport, layer_precision
from qkd_jax.quant.layer_quant import add_bias, combined_scale, quantize_input
from qkd_jax.quant.layers import layer_precision as module_precision
from qkd_jax.quant.rules import LayerPrecision

ZERO_POINT_MODES = ("fold", "expand")


@dataclasses.dataclass(frozen=True)
class _Layer:
    path: str
    kind: str
    lp: LayerPrecision
    w_grid: Optional[qcodes.Grid]
    a_grid: Optional[qcodes.Grid]
    has_bias: bool
    has_output_scale: bool


def _plain(mod: nn.Module, base: type, **overrides: Any) -> nn.Module:
    """An unbound `base` (nn.Conv / nn.Dense) with `mod`'s settings, overridden."""
    fields = {f.name: getattr(mod, f.name) for f in dataclasses.fields(base)
              if f.init and f.name not in ("parent", "name")}
    fields.update(overrides)
    return base(**fields, parent=None)


def _promote_int32(*args, dtype=None, inexact=True):
    """flax's promote_dtype for integer operands: everything to int32 (flax's own would cast to float)."""
    del dtype, inexact
    return [None if x is None else jnp.asarray(x, jnp.int32) for x in args]


def _int_op(mod: nn.Module, base: type):
    """(x_int, kernel_int) -> int32 accumulator of the layer's conv / matmul (no bias)."""
    if base is nn.Conv:
        layer = _plain(mod, base, use_bias=False, dtype=None, mask=None, conv_general_dilated_cls=None,
                       promote_dtype=_promote_int32,
                       conv_general_dilated=functools.partial(jax.lax.conv_general_dilated,
                                                              preferred_element_type=jnp.int32))
    else:
        layer = _plain(mod, base, use_bias=False, dtype=None, dot_general_cls=None, promote_dtype=_promote_int32,
                       dot_general=functools.partial(jax.lax.dot_general, preferred_element_type=jnp.int32))
    return lambda x, k: layer.apply({"params": {"kernel": k}}, x)


def _float_op(mod: nn.Module, base: type, use_bias: bool):
    layer = _plain(mod, base, use_bias=use_bias)

    def op(x, kernel, bias):
        params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
        return layer.apply({"params": params}, x)

    return op


class IntegerModel:
    """Runs an export with integer conv/dense layers inside the student's flax graph.

    Args:
      model: the flax student module the export came from (e.g. `load_model(exported)`).
      exported: the IntegerExport.
      zero_points: 'fold' (one int32 conv on signed integers q) or 'expand' (convs on the
        unsigned codes plus zero-point correction terms); identical accumulators.
      apply_kwargs: model.apply keyword arguments (default: the manifest's, {'train': False}).
    """

    def __init__(self, model: nn.Module, exported: IntegerExport, *, zero_points: str = "fold",
                 apply_kwargs: Optional[Mapping[str, Any]] = None):
        if zero_points not in ZERO_POINT_MODES:
            raise ValueError(f"zero_points must be one of {ZERO_POINT_MODES}, got {zero_points!r}")
        self.model = model
        self.exported = exported
        self.zero_points = zero_points
        self.apply_kwargs = dict(exported.manifest["model"]["apply_kwargs"] if apply_kwargs is None else apply_kwargs)
        self.layers: dict[str, _Layer] = {}
        runtime: dict[str, Any] = {"layers": {}, "bn": {}}
        for path, e in exported.layers.items():
            lp = layer_precision(e)
            w_grid = exported.weight_grid(path) if lp.w_bits is not None else None
            a_grid = exported.activation_grid(path) if lp.a_bits is not None else None
            info = _Layer(path, e["type"], lp, w_grid, a_grid, e["bias"] is not None, e["output_scale"] is not None)
            self.layers[path] = info
            arrs: dict[str, Any] = {}
            if w_grid is not None and a_grid is not None:
                codes = exported.weight_codes(path)
                arrs["w"] = jnp.asarray(w_grid.q(codes) if zero_points == "fold" else codes.astype(np.int32))
                arrs["scale"] = combined_scale(jnp.float32(a_grid.scale), jnp.float32(w_grid.scale))
                if zero_points == "expand":
                    fan_in = int(np.prod(e["kernel_shape"][:-1]))
                    # sum of the four terms' magnitudes (partial sums stay below it)
                    bound = (fan_in * (a_grid.multiplier * (a_grid.levels - 1) + a_grid.zero_point)
                             * (w_grid.multiplier * (w_grid.levels - 1) + w_grid.zero_point))
                    if bound > INT32_MAX:
                        raise ExportError(f"layer {path}: zero_points='expand' may overflow int32; use 'fold'")
            elif w_grid is not None:
                arrs["w_hat"] = jnp.asarray(exported.dequantize(path))
            else:
                arrs["kernel"] = jnp.asarray(exported.dequantize(path))
            if a_grid is not None:
                arrs["a_params"] = {k: jnp.float32(v) for k, v in e["activation"]["params"].items()}
            if e["bias"] is not None:
                arrs["bias"] = jnp.asarray(exported.arrays[e["bias"]["key"]])
            if e["output_scale"] is not None:
                arrs["output_scale"] = jnp.float32(e["output_scale"])
            runtime["layers"][path] = arrs
        self.norms = {p: tuple(e["axis"]) for p, e in exported.manifest["batchnorm"].items()}
        for path, e in exported.manifest["batchnorm"].items():
            runtime["bn"][path] = {k: jnp.asarray(exported.arrays[e[k]["key"]]) for k in ("mean", "mul", "add")}
        flat = {tuple(name.split("/")): jnp.asarray(exported.arrays[ref["key"]])
                for name, ref in exported.manifest["fp"].items()}
        runtime["fp"] = traverse_util.unflatten_dict(flat) if flat else {}
        runtime["fp"].setdefault("params", {})
        self.runtime = runtime
        self._jitted = jax.jit(self._forward, static_argnames="record")

    def __call__(self, images: jax.Array) -> jax.Array:
        return self._jitted(self.runtime, jnp.asarray(images))

    def with_layer_inputs(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits, {path: the float input each exported quantized layer received}), for checking
        activation codes layer by layer against the fake-quant model."""
        return self._jitted(self.runtime, jnp.asarray(images), record=True)

    def integer_layer(self, module: nn.Module, x: jax.Array) -> jax.Array:
        """The integer computation of one exported layer on input `x`, for a bound `module` (e.g.
        inside an interceptor of the fake-quant model: a layer-by-layer check on identical inputs)."""
        path = "/".join(module.path)
        if path not in self.layers:
            raise KeyError(f"layer {path!r} is not in the export")
        return self._quantized_layer(module, self.layers[path], self.runtime["layers"][path], x)

    # ------------------------------------------------------------------ the swapped layers

    def _quantized_layer(self, mod: nn.Module, info: _Layer, arrs: Mapping[str, Any], x: jax.Array) -> jax.Array:
        base = nn.Conv if info.kind == "conv" else nn.Dense
        if not isinstance(mod, base):
            raise ExportError(f"layer {info.path} is a {type(mod).__name__} in the model, a {info.kind} in the export")
        bias = arrs.get("bias")
        if info.w_grid is not None and info.a_grid is not None:
            k_a = qcodes.activation_codes(info.lp, x, arrs["a_params"], info.a_grid)
            op = _int_op(mod, base)
            if self.zero_points == "fold":
                acc = op(info.a_grid.q(k_a), arrs["w"])
            else:
                acc = self._expanded(op, k_a, arrs["w"], info.a_grid, info.w_grid)
            y = add_bias(acc.astype(jnp.float32) * arrs["scale"], bias)
        elif info.w_grid is not None:  # FP input, quantized weights: float conv on the exact levels
            y = _float_op(mod, base, bias is not None)(x, arrs["w_hat"], bias)
        else:  # quantized input, FP weights
            a_hat = quantize_input(info.lp, x, arrs["a_params"])
            y = _float_op(mod, base, bias is not None)(a_hat, arrs["kernel"], bias)
        if info.has_output_scale:
            y = y * jnp.abs(arrs["output_scale"]).astype(y.dtype)
        return y

    @staticmethod
    def _expanded(op, k_a, k_w, a: qcodes.Grid, w: qcodes.Grid) -> jax.Array:
        """sum (m_a k_a - z_a)(m_w k_w - z_w) from convs on the unsigned codes (see module doc)."""
        acc = (a.multiplier * w.multiplier) * op(k_a, k_w)
        if w.zero_point:
            acc = acc - (a.multiplier * w.zero_point) * op(k_a, jnp.ones_like(k_w))
        if a.zero_point:
            ones_a = jnp.ones_like(k_a)
            acc = acc - (a.zero_point * w.multiplier) * op(ones_a, k_w)
            if w.zero_point:
                acc = acc + (a.zero_point * w.zero_point) * op(ones_a, jnp.ones_like(k_w))
        return acc

    def _forward(self, runtime: Mapping[str, Any], images: jax.Array, record: bool = False):
        visited: set[str] = set()
        inputs: dict[str, jax.Array] = {}

        def interceptor(next_fun, args, kwargs, ctx):
            if ctx.method_name != "__call__":
                return next_fun(*args, **kwargs)
            mod = ctx.module
            path = "/".join(mod.path)
            if isinstance(mod, (nn.Conv, nn.Dense)):
                if path in self.layers:
                    visited.add(path)
                    if record:
                        inputs[path] = args[0]
                    return self._quantized_layer(mod, self.layers[path], runtime["layers"][path], args[0])
                rules = getattr(mod, "rules", None)
                if rules is not None and module_precision(mod, rules).quantized:
                    raise ExportError(f"layer {path} is quantized in the model but absent from the export")
            elif isinstance(mod, nn.BatchNorm) and path in self.norms:
                if not _bn_running_average(mod, args, kwargs):
                    raise ExportError(f"BatchNorm {path} would use batch statistics: run in inference mode")
                x = args[0]
                shape = [1] * x.ndim
                for ax in self.norms[path]:
                    shape[ax] = x.shape[ax]
                visited.add(path)
                bn = runtime["bn"][path]
                return (x - bn["mean"].reshape(shape)) * bn["mul"].reshape(shape) + bn["add"].reshape(shape)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            out = self.model.apply(runtime["fp"], images, **self.apply_kwargs)
        missing = sorted((set(self.layers) | set(self.norms)) - visited)
        if missing:
            raise ExportError(f"the model never called these exported layers: {missing[:8]} (wrong model?)")
        return (out, inputs) if record else out


def integer_apply(model: nn.Module, exported: IntegerExport, images: jax.Array, **kwargs: Any) -> jax.Array:
    """One-shot `IntegerModel(model, exported, **kwargs)(images)`."""
    return IntegerModel(model, exported, **kwargs)(images)
