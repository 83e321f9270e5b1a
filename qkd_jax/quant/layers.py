"""Quantized drop-ins for nn.Conv / nn.Dense, driven by per-layer precision rules.

    conv, dense = quantized_layers(sqakd_cifar('interval', 2, 2))
    student = Model(num_classes=10, conv=conv, dense=dense)

`QConv` / `QDense` subclass nn.Conv / nn.Dense: same constructor arguments, same 'kernel' and
'bias' params (same shapes, same paths), so a teacher's params copy into the student by path.
Each layer finds its path ('/'.join(self.path), e.g. 'layer1_0/conv1') and asks its `rules`
for its precision. The computation of a quantized layer is

    y = layer(a_hat, w_hat)                     (the plain nn.Conv / nn.Dense, bias included)
    y = y * |output_scale|                      (when the rule has an output scale: 'interval')

with w_hat = quantize_weight(W), a_hat = quantize_input(x) (see `layer_quant`). When both
weights and inputs are quantized, layer(a_hat, w_hat) is computed as
layer(q_a, q_w) * (s_a * s_w) + bias on the integers q = a_hat / s_a, w_hat / s_w: the same
value and gradients, but exact and processor-independent (see `layer_quant`, "Integer
factorisation"). A layer whose rule says full precision is exactly nn.Conv / nn.Dense.

Collections a quantized layer uses (paths relative to the layer):
    params         'kernel', 'bias' (as nn.Conv), 'quant' {learnable quantizer parameters}
    quant_delta    'w', 'a': EWGS delta scalars, created by init (0.0). When the collection is not
                   passed to apply, delta = 0 (STE).
    perturbations  'w_q', 'a_q': zero perturbations added to the discretizer outputs. NOT created
                   by init; create them with apply(..., mutable=['perturbations']) on the batch
                   to probe, then pass them in to get dL/dx_q as their gradient. Without the
                   collection the hook is a no-op.
    quant_calibration  written only when apply names that collection as mutable (mutable=True
                   does not count); see `calibration`. When apply also names
                   'quant_calibration_fp_inputs', each layer outputs its full-precision result
                   (`released_methods.full_range_transforms`) so that every layer calibrates on
                   full-precision inputs.
    intermediates  'w_hat', 'a_hat' (tuples, flax `sow`): the fake-quantized weights and inputs,
                   recorded only when apply is given mutable=['intermediates'].

Gradient estimator (`LayerPrecision.estimator`, docs/method.md section 12): None, 'ste' and 'ewgs'
use the 'quant_delta' collection as above. A stochastic estimator (stochastic rounding, uniform
noise) runs its training forward only when apply is given a 'quantize' PRNG stream (the train step
passes one; evaluation, calibration and the export do not, so they see the hard rounding). An
off-grid training forward (uniform noise) skips the integer factorisation for that call.

Compute dtype (the nn.Conv / nn.Dense field `dtype`, set model-wide by the models' `dtype`): the
conv / matmul runs in it; params, quantizer parameters, the quantizers and their scales stay
float32, so w_hat and a_hat land on the same float32 grids in bfloat16 and float32 compute.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from qkd_jax.quant import calibration as calib
from qkd_jax.quant.layer_quant import (
    CALIBRATION_COLLECTION,
    DELTA_COLLECTION,
    QUANT,
    add_bias,
    combined_scale,
    input_scale,
    integer_valued,
    placeholder_params,
    quantize_input,
    quantize_weight,
    weight_scale,
)
from qkd_jax.quant.estimators import is_ewgs_family, legacy_delta
from qkd_jax.quant.methods import get_method
from qkd_jax.quant.released_methods import full_range_transforms
from qkd_jax.quant.rules import FULL_PRECISION, LayerPrecision, RuleSet

INTERMEDIATES = "intermediates"
#: The flax PRNG stream stochastic estimators draw from (given by the train step only).
QUANTIZE_RNG = "quantize"
RulesLike = Union[RuleSet, LayerPrecision, None]
PlainOp = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


def layer_precision(module: nn.Module, rules: RulesLike) -> LayerPrecision:
    """The precision of a bound layer: its rule set matched against '/'.join(module.path)."""
    if rules is None:
        return FULL_PRECISION
    if isinstance(rules, LayerPrecision):
        return rules
    return rules.match("/".join(module.path))


def _delta(module: nn.Module, side: str):
    """The layer's EWGS delta for 'w' or 'a' (0.0 when the collection is absent)."""
    if module.has_variable(DELTA_COLLECTION, side) or module.is_mutable_collection(DELTA_COLLECTION):
        return module.variable(DELTA_COLLECTION, side, lambda: jnp.zeros((), jnp.float32)).value
    return 0.0


def _rounding(module: nn.Module, lp: LayerPrecision, side: str):
    """What the layer's quantizers get in their `delta` slot: the EWGS delta (legacy estimators), the
    estimator, or the estimator keyed for its training forward (a 'quantize' stream was given)."""
    est = lp.estimator
    if is_ewgs_family(est):
        delta = _delta(module, side)
        return delta if est is None else legacy_delta(est, delta)
    if est.stochastic and _noisy(module, lp):
        return est.keyed(module.make_rng(QUANTIZE_RNG))
    return est


def _noisy(module: nn.Module, lp: LayerPrecision) -> bool:
    """The layer's estimator runs its stochastic training forward in this call."""
    est = lp.estimator
    return (est is not None and est.stochastic and not module.is_initializing()
            and module.has_rng(QUANTIZE_RNG))


def _hook(module: nn.Module, name: str):
    """grid_hook attaching a flax perturbation `name` to x_q (none while initialising)."""
    if module.is_initializing():
        return None
    return lambda x_q: module.perturb(name, x_q)


def _calibrating(module: nn.Module) -> bool:
    """True when apply named 'quant_calibration' as mutable (not at init, not with mutable=True,
    so a caller making every collection mutable does not recalibrate by accident)."""
    if module.is_initializing() or not module.is_mutable_collection(CALIBRATION_COLLECTION):
        return False
    return module.scope is not None and module.scope.mutable is not True


def _sow(module: nn.Module, name: str, value: jax.Array) -> None:
    """Records w_hat / a_hat in 'intermediates' when the caller made it mutable (not at init)."""
    if not module.is_initializing() and module.is_mutable_collection(INTERMEDIATES):
        module.sow(INTERMEDIATES, name, value)


def _plain(module: nn.Module, base: type, use_bias: bool) -> nn.Module:
    """An unbound `base` (nn.Conv / nn.Dense) with the same settings as `module`."""
    skip = ("parent", "name")
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(base) if f.init and f.name not in skip}
    fields["use_bias"] = use_bias
    return base(**fields, parent=None)


def _plain_op(module: nn.Module, base: type) -> PlainOp:
    """(x, kernel, bias) -> the plain layer's output with these params."""

    def op(x, kernel, bias):
        params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
        return _plain(module, base, bias is not None).apply({"params": params}, x)

    return op


def _forward(
    module: nn.Module, lp: LayerPrecision, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array], op: PlainOp
) -> jax.Array:
    """Quantized forward pass shared by QConv and QDense (calibrating when asked to)."""
    if not lp.quantized:
        return op(x, kernel, bias)
    # Mixed precision: the quantizers, their calibration and their scales see the input in float32
    # (a bfloat16 x / delta would land on the wrong code of an 8-bit grid); the conv / matmul `op`
    # then runs in the layer's compute dtype on the integer-valued operands, which bfloat16 holds
    # exactly for every grid of at most 8 bits (|q| <= 256; docs/method.md, "Mixed precision").
    x = jnp.asarray(x, jnp.float32)
    placeholders = placeholder_params(lp)
    q: dict[str, Any] = {}
    if placeholders:
        q = dict(module.param(QUANT, lambda _: {k: jnp.asarray(v, jnp.float32) for k, v in placeholders.items()}))
    calibrating = _calibrating(module)
    if calibrating:
        q.update(calib.weight_params(lp, kernel))
        q.update(calib.input_params(lp, x))
        if lp.a_bits is not None and not lp.a_signed and get_method(lp.method).input_sign != "always":
            # checked against the model's declaration afterwards (a grid that is always signed
            # clips nothing, so it needs no declaration)
            module.put_variable(CALIBRATION_COLLECTION, calib.INPUT_MIN,
                                jnp.min(jax.lax.stop_gradient(x)).astype(jnp.float32))
    # The float output without bias, computed once: the dead-layer flag compares with it and
    # the output scale with it plus the bias.
    y_fp = op(x, kernel, None) if calibrating else None
    w_hat = kernel
    if lp.w_bits is not None:
        w_hat = quantize_weight(lp, kernel, q, _rounding(module, lp, "w"), _hook(module, "w_q")).astype(kernel.dtype)
    a_hat = x
    if lp.a_bits is not None:
        a_hat = quantize_input(lp, x, q, _rounding(module, lp, "a"), _hook(module, "a_q"))
    _sow(module, "w_hat", w_hat)
    _sow(module, "a_hat", a_hat)
    off_grid = _noisy(module, lp) and not getattr(lp.estimator, "on_grid", True)
    if lp.w_bits is not None and lp.a_bits is not None and not lp.full_range and not off_grid:
        s_w, s_a = weight_scale(lp, q, w_hat), input_scale(lp, q)
        q_w = integer_valued(w_hat, s_w).astype(w_hat.dtype)
        y = op(integer_valued(a_hat, s_a), q_w, None)
        if calibrating:
            module.put_variable(CALIBRATION_COLLECTION, calib.DEAD, calib.dead_output(y, y_fp))
        y = add_bias(y * combined_scale(s_a, s_w).astype(y.dtype), bias)
    else:
        y = op(a_hat, w_hat, bias)
        if calibrating:
            module.put_variable(CALIBRATION_COLLECTION, calib.DEAD,
                                calib.dead_output(op(a_hat, w_hat, None), y_fp))
    if lp.output_scale:
        if calibrating:
            q["output_scale"] = calib.output_scale(add_bias(y_fp, bias), y)
        y = y * jnp.abs(q["output_scale"]).astype(y.dtype)
    if calibrating and q:
        module.put_variable(CALIBRATION_COLLECTION, QUANT, q)
    if calibrating and module.is_mutable_collection(calib.FP_INPUTS_COLLECTION):
        # Calibration on full-precision inputs: the next layer sees this layer's output computed
        # without rounding (only the released records' transforms), as MQBench's observer pass.
        fp = full_range_transforms(lp)
        return op(quantize_input(fp, x, q), quantize_weight(fp, kernel, q).astype(kernel.dtype), bias)
    return y


class QConv(nn.Conv):
    """nn.Conv with weight/input quantization chosen by `rules` (a RuleSet or a LayerPrecision).

    Same fields and params as nn.Conv (shared weights only; the mask, if any, is applied to the
    quantized kernel), plus params['quant'] and the 'quant_delta' collection when quantized.
    """

    rules: RulesLike = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        lp = layer_precision(self, self.rules)
        kernel_size = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        in_features = inputs.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"{in_features} input features not divisible by feature_group_count={self.feature_group_count}"
            )
        shape = kernel_size + (in_features // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        return _forward(self, lp, inputs, kernel, bias, _plain_op(self, nn.Conv))


class QDense(nn.Dense):
    """nn.Dense with weight/input quantization chosen by `rules`; same fields and params as nn.Dense."""

    rules: RulesLike = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        lp = layer_precision(self, self.rules)
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        return _forward(self, lp, inputs, kernel, bias, _plain_op(self, nn.Dense))


def quantized_layers(rules: RulesLike) -> tuple[Callable[..., QConv], Callable[..., QDense]]:
    """(conv, dense) factories for model injection: partial(QConv, rules=rules), partial(QDense, ...)."""
    return functools.partial(QConv, rules=rules), functools.partial(QDense, rules=rules)
