"""Data-dependent initialisation of quantizer parameters on one batch (docs/method.md section 4).

    new_variables = calibrate(student, variables, images, train=True)

`variables` is the student holding the teacher's weights (and batch statistics). One forward
pass is run with the 'quant_calibration' collection mutable: each quantized layer then computes
its parameters from its own kernel W and its own input x *during the call*, writes them there,
and uses them at once for its output. So layers are calibrated in order and every layer sees its
input as produced by the already-calibrated quantized layers before it (the official EWGS
code's init flag does the same in its first forward pass). With `fp_inputs=True` every layer
instead passes its full-precision output on, so every layer calibrates on full-precision inputs
(the released MQBench code: observers on, fake quantization off; released PACT / DoReFa layers
keep their transforms, `released_methods.full_range_transforms`). The function returns a new variables
dict in which every params[...]['quant'] leaf is replaced; all other collections (batch_stats
included) are returned unchanged.

BatchNorm: whatever `**apply_kwargs` select. `train=True` (the recommended setting, as in the
EWGS code whose init runs in the first training step) normalises with the calibration batch's
statistics; the running statistics that pass updates are thrown away (the teacher's are kept).
`train=False` uses the teacher's running statistics.

Closed forms, one per method record (`qkd_jax.quant.methods`; std is the unbiased sample std,
ddof=1, as torch.Tensor.std in the official code; x = the layer's input, W = its kernel, Q_P
from `lsq_bounds`):
    interval: w_upper = 3 std(W), w_lower = -3 std(W);
              a_upper = 3 std(x) / sqrt(1 - 2/pi), a_lower = min(x)
              output_scale = mean|layer(x, W)| / mean|layer(a_hat, w_hat)|, the bias included in
              both (the official code computes F.conv2d(..., self.bias) in both)
    lsq:      w_step = 2 mean|W| / sqrt(Q_P(w_bits, signed)), a_step = 2 mean|x| / sqrt(Q_P(a_bits, a_signed))
    qkd:      w_interval = the least-MSE candidate max|W| k / 100 on the weight grid
              (`interval_search.mse_interval`); a_interval = max(x) (unsigned) or max|x| (signed)
    pact:     a_alpha = the rule's constant `pact_alpha` if set, else 3 std(x) / sqrt(1 - 2/pi)
              (the interval method's a_upper: a clipping level of the same statistic); signed
              input: |mean(x)| + 3 std(x)
    dorefa:   nothing to calibrate
Degenerate batches are guarded: a positive quantity whose statistic is <= EPS (all-zero input or
kernel) becomes 1, an interval whose upper does not exceed its lower bound gets upper = max(x)
(and lower + 1 when that is no wider than EPS), and
output_scale is 1 when mean|layer(a_hat, w_hat)| is 0.

Dead layers. A quantized layer whose quantized output layer(a_hat, w_hat) (without bias) is
identically zero on the calibration batch while its float output layer(x, W) is not, passes
no signal and gets no gradient through its kernel or quantizer parameters. Each layer records
that flag during calibration; `calibrate` raises `DeadLayerError` naming every such layer (under
`jit` the flags cannot be read: use `calibrate_with_report` and `raise_on_calibration_problems`).

Signed inputs. Each quantized layer whose input is declared unsigned (a_signed False, see
`rules.with_signed_inputs`) records the minimum of its input; a negative minimum means its
unsigned grid would clip every negative value to zero, so `calibrate` raises
`UnsignedInputError` naming the layer, the minimum and the fix (declare the layer signed).
Post-ReLU inputs are exactly >= 0, so a correct declaration never trips it. The check applies to
every method, the interval method included (its lower bound would cover the negatives, but the
declaration must hold whichever method a config picks).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from qkd_jax.quant.layer_quant import CALIBRATION_COLLECTION, QUANT
from qkd_jax.quant.methods import get_method
from qkd_jax.quant.precision import LayerPrecision
from qkd_jax.quant.statistics import EPS  # noqa: F401  (re-exported: calibration.EPS)

DEAD = "dead_output"  # the per-layer flag written next to the parameters while calibrating
INPUT_MIN = "unsigned_input_min"  # min of the input of a layer declared unsigned, written likewise
#: Named as mutable (never written) to make every layer pass its full-precision output on.
FP_INPUTS_COLLECTION = "quant_calibration_fp_inputs"


class DeadLayerError(ValueError):
    """Calibration left a quantized layer whose quantized output is identically zero."""


class UnsignedInputError(ValueError):
    """A layer declared unsigned received a negative input at calibration."""


class CalibrationChecks(NamedTuple):
    """Per-layer measurements of one calibration pass (arrays; a pytree, so it leaves `jit`).

    dead: {layer path: True when its quantized output is identically zero}.
    unsigned_input_min: {layer path: min of its input}, for layers whose input grid is unsigned.
    """

    dead: dict[str, Any]
    unsigned_input_min: dict[str, Any]


def weight_params(lp: LayerPrecision, w: jax.Array) -> dict[str, jax.Array]:
    """Weight-side quantizer parameters from the kernel W (the method record's closed form)."""
    if not lp.quantized or lp.w_bits is None:
        return {}
    return get_method(lp.method).calibrate_weight(lp, jax.lax.stop_gradient(jnp.asarray(w, jnp.float32)))


def input_params(lp: LayerPrecision, x: jax.Array) -> dict[str, jax.Array]:
    """Activation-side quantizer parameters from the layer input x (the method record's closed form)."""
    if not lp.quantized or lp.a_bits is None:
        return {}
    return get_method(lp.method).calibrate_input(lp, jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)))


def output_scale(y_fp: jax.Array, y_q: jax.Array) -> jax.Array:
    """mean|y_fp| / mean|y_q| (1 when the quantized output is all zero)."""
    num = jnp.mean(jnp.abs(jax.lax.stop_gradient(y_fp).astype(jnp.float32)))
    den = jnp.mean(jnp.abs(jax.lax.stop_gradient(y_q).astype(jnp.float32)))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)


ApplyFn = Callable[..., Any]


def dead_output(y_q: jax.Array, y_fp: jax.Array) -> jax.Array:
    """True when the quantized output (without bias) is all zero while the float one is not."""
    return jnp.logical_and(jnp.all(jax.lax.stop_gradient(y_q) == 0), jnp.any(jax.lax.stop_gradient(y_fp) != 0))


def calibrate_with_report(
    model: Union[nn.Module, ApplyFn],
    variables: Mapping[str, Any],
    *args: Any,
    mutable: Sequence[str] = ("batch_stats",),
    fp_inputs: bool = False,
    **apply_kwargs: Any,
) -> tuple[dict[str, Any], CalibrationChecks]:
    """`calibrate` without its checks: (new variables, CalibrationChecks).

    Works under `jit`; pass the checks to `raise_on_calibration_problems` outside it.
    """
    apply_fn = model.apply if isinstance(model, nn.Module) else model
    mutable = [CALIBRATION_COLLECTION, *[m for m in mutable if m != CALIBRATION_COLLECTION]]
    if fp_inputs:
        mutable.append(FP_INPUTS_COLLECTION)
    _, written = apply_fn(variables, *args, mutable=mutable, **apply_kwargs)
    calib = traverse_util.flatten_dict(unfreeze(written.get(CALIBRATION_COLLECTION, {})))
    dead = {"/".join(k[:-1]): v for k, v in calib.items() if k[-1] == DEAD}
    input_min = {"/".join(k[:-1]): v for k, v in calib.items() if k[-1] == INPUT_MIN}
    calib = {k: v for k, v in calib.items() if k[-1] not in (DEAD, INPUT_MIN)}
    params = traverse_util.flatten_dict(unfreeze(variables["params"]))
    expected = {k for k in params if QUANT in k[:-1]}
    missing = sorted("/".join(k) for k in expected - set(calib))
    if missing:
        raise ValueError(f"calibration did not reach these quantizer parameters (layer not called?): {missing}")
    for key, value in calib.items():
        if key not in params:
            raise ValueError(f"calibration wrote {'/'.join(key)}, which is not in params")
        params[key] = jnp.asarray(value, jnp.asarray(params[key]).dtype).reshape(jnp.shape(params[key]))
    new = {k: v for k, v in unfreeze(variables).items()}
    new["params"] = traverse_util.unflatten_dict(params)
    return new, CalibrationChecks(dead=dead, unsigned_input_min=input_min)


def raise_on_signed_inputs(input_min: Mapping[str, Any]) -> None:
    """Raises UnsignedInputError naming every layer declared unsigned whose input had a negative
    value (concrete values only)."""
    bad = {path: float(np.asarray(v)) for path, v in sorted(input_min.items()) if float(np.asarray(v)) < 0}
    if bad:
        listed = ", ".join(f"{path} (min {v:.4g})" for path, v in bad.items())
        raise UnsignedInputError(
            f"{len(bad)} quantized layer(s) declared unsigned received negative inputs at calibration: "
            f"{listed}. Their unsigned activation grid would clip every negative value to 0. Declare "
            f"these layers' inputs signed (the model's signed_inputs in qkd_jax/models/registry.py, or "
            f"a precision rule with a_signed=True).")


def raise_on_calibration_problems(checks: CalibrationChecks) -> None:
    """`raise_on_signed_inputs`, then `raise_on_dead_layers` (concrete values only)."""
    raise_on_signed_inputs(checks.unsigned_input_min)
    raise_on_dead_layers(checks.dead)


def raise_on_dead_layers(flags: Mapping[str, Any]) -> None:
    """Raises DeadLayerError naming every layer whose flag is set (concrete values only)."""
    dead = sorted(path for path, flag in flags.items() if bool(np.asarray(flag)))
    if dead:
        raise DeadLayerError(
            f"calibration left {len(dead)} quantized layer(s) whose quantized output is identically "
            f"zero on the calibration batch although the float layer's is not: {', '.join(dead)}. Every "
            f"input activation of such a layer rounds to the zero code, so it passes no signal and its "
            f"kernel and quantizer parameters get no gradient. Calibrate on a larger or more varied batch "
            f"(config.phases.<calibrate phase>.batch_size), check that the teacher's layer before it is "
            f"not dead, or keep the layer at a higher precision with a precision rule.")


def calibrate(
    model: Union[nn.Module, ApplyFn],
    variables: Mapping[str, Any],
    *args: Any,
    mutable: Sequence[str] = ("batch_stats",),
    fp_inputs: bool = False,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Returns new variables with every quantizer parameter initialised from one batch.

    Args:
      model: the student module (or its `apply` function).
      variables: the student's variables ('params', 'batch_stats', 'quant_delta', ...).
      *args, **apply_kwargs: the forward call, e.g. `images, train=True`.
      mutable: further collections the forward pass writes (the default lets BatchNorm run in
        train mode); what it writes there is discarded.
      fp_inputs: calibrate every layer on full-precision inputs (each layer passes its float
        output on; released PACT / DoReFa layers apply their transforms without rounding), as
        the released MQBench observer pass; False: on the outputs of the quantized layers before.

    Raises:
      ValueError: when a layer holding quantizer parameters did not run in the forward pass.
      UnsignedInputError: when a layer declared unsigned received a negative input.
      DeadLayerError: when a quantized layer's output is identically zero after calibration
        (both checked when the values are concrete, i.e. not under `jit`).
    """
    new, checks = calibrate_with_report(model, variables, *args, mutable=mutable, fp_inputs=fp_inputs,
                                        **apply_kwargs)
    if not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(checks)):  # concrete: check now
        raise_on_calibration_problems(checks)
    return new
