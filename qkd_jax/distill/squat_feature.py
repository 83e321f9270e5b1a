"""SQuaT's feature term: the student's quantized tap against the teacher's, quantized alike.

SQuaT (lcdbsa522/SQuaT) adds to SQAKD's KL a distance between two features at one layer, the
*tap* (by default the input of the last conv of the last residual block, declared per model in
``qkd_jax.models.registry.squat_tap``):

    q_s = code(quantize_input(lp, x_s, theta, delta))                 student, differentiable
    q_t = sg(code(quantize_input(lp, x_t, sg(theta), 0)))             frozen FP teacher
    L   = gamma * CE(y, s) + alpha * KL_T(s, sg(t)) + beta * distance(q_s, q_t)

``x_s`` / ``x_t`` are the tap layer's inputs in the student and the teacher, ``lp`` and ``theta``
the student's precision and CURRENT quantizer parameters at that layer, ``quantize_input`` the
method's own input quantizer read from its registry record (``qkd_jax.quant.methods``), so the
teacher's feature lands on exactly the student's grid for every method. ``code`` maps a quantizer
output to the unit-width code domain, ``a_hat / (s_a * span)`` with ``s_a`` the method's input
scale (a_hat = s_a * integer) and ``span = multiplier * (levels - 1)`` its grid's integer width:
for the 'interval' (EWGS) quantizer this is the released ``[0, 1]`` code before ``output_scale``.
The teacher side is wrapped in ``stop_gradient`` (the release copies ``lA, uA`` as floats), so the
student's quantizer parameters get a gradient only through ``q_s``.

The train step (``qkd_jax.train.step``) records both taps with flax method interception
(:meth:`SQuaT.teacher_forward`, :meth:`SQuaT.student_forward`): no model code changes, any layer path
works. The runner fills an empty ``tap`` with the model's declared one (``run/plan.py``).
Distances: 'mse' (the released ``--distill_loss L2``, ``nn.MSELoss``: the mean over all elements)
and 'l1' (the released argparse default ``L1``, mean |q_s - q_t|: on a unit-width grid it is the
mean number of levels apart over ``levels - 1``, and its gradient does not fade as the codes
agree, where the MSE's shrinks with the gap; docs/method.md, "SQuaT").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qkd_jax.distill.feature_kd import FeatureKD, register_feature
from qkd_jax.quant.layer_quant import DELTA_COLLECTION, QUANT, input_scale, quantize_input
from qkd_jax.quant.layers import layer_precision
from qkd_jax.quant.methods import get_method
from qkd_jax.quant.precision import LayerPrecision

Array = jax.Array
DISTANCES: dict[str, Callable[[Array, Array], Array]] = {
    "mse": lambda s, t: jnp.mean(jnp.square(s - t)),
    "l1": lambda s, t: jnp.mean(jnp.abs(s - t)),
}


class TapRecord(NamedTuple):
    """What a student forward saw at the tap: path, input, precision, quantizer params, EWGS delta."""

    path: str
    x: Array
    lp: Optional[LayerPrecision]
    q: Any
    delta: Any


def _matches(context: Any, tap: str) -> bool:
    path = "/".join(context.module.path)
    return context.method_name == "__call__" and bool(path) and re.fullmatch(tap, path) is not None


def _last(records: list, tap: str, side: str):
    if not records:
        raise ValueError(f"SQuaT tap {tap!r} matched no layer of the {side}; set the phase's "
                         f"feature_options.tap to a regex fully matching a conv / dense path (e.g. 'layer3_2/conv2')")
    return records[-1]


def _interceptor(tap: str, records: list, student: bool):
    """Flax method interceptor recording the input (and, on the student, the quantizer) of every
    call of a layer whose path matches ``tap``; the last record is the tap."""

    def intercept(next_fun, args, kwargs, context):
        if _matches(context, tap):
            module = context.module
            x = jnp.asarray(args[0], jnp.float32)
            if student:
                rules = getattr(module, "rules", None)
                lp = layer_precision(module, rules) if rules is not None else None
                q = module.get_variable("params", QUANT) if module.has_variable("params", QUANT) else {}
                delta = (module.get_variable(DELTA_COLLECTION, "a")
                         if module.has_variable(DELTA_COLLECTION, "a") else 0.0)
                records.append(TapRecord("/".join(module.path), x, lp, q, delta))
            else:
                records.append(TapRecord("/".join(module.path), x, None, None, None))
        return next_fun(*args, **kwargs)

    return intercept


def teacher_tap(apply_fn: Callable, variables: dict, images: Array, tap: str) -> tuple[Array, Array]:
    """(logits, tap input) of the frozen teacher in inference mode, both stop-gradient'ed."""
    records: list = []
    with nn.intercept_methods(_interceptor(tap, records, student=False)):
        logits = apply_fn(variables, images, train=False)
    return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(_last(records, tap, "teacher").x)


def student_forward(apply_fn: Callable, variables: dict, images: Array, *, rngs: dict,
                    feature: "SQuaT", teacher_input: Array) -> tuple[Array, Any, list, list]:
    """A train-mode student forward recording its tap: (logits, batch_stats, [q_s], [q_t]).
    `rngs`: the train step's PRNG streams ('dropout', and 'quantize' for stochastic estimators)."""
    records: list = []
    with nn.intercept_methods(_interceptor(feature.tap, records, student=True)):
        logits, mutated = apply_fn(variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
    q_s, q_t = tap_codes(_last(records, feature.tap, "student"), teacher_input)
    return logits, mutated.get("batch_stats", {}), [q_s], [q_t]


def code_span(lp: LayerPrecision) -> int:
    """The integer width multiplier * (levels - 1) of the method's input grid at this layer."""
    levels, multiplier, _ = get_method(lp.method).input_grid(lp.a_bits, lp.a_signed)
    return multiplier * (levels - 1)


def to_code(lp: LayerPrecision, a_hat: Array, q: Any) -> Array:
    """A quantizer output in the unit-width code domain: a_hat / (s_a * span)."""
    return a_hat / (input_scale(lp, q) * jnp.float32(code_span(lp)))


def tap_codes(record: TapRecord, teacher_input: Array) -> tuple[Array, Array]:
    """(q_s, q_t): the student's tap quantized as in its forward (its delta, gradients to its input
    and quantizer parameters) and the teacher's tap quantized with the same method, precision and
    stop-gradient'ed parameters (see the module docstring)."""
    lp = record.lp
    if lp is None or not lp.quantized or lp.a_bits is None:
        raise ValueError(f"SQuaT tap {record.path!r} has full-precision inputs in the student; set the phase's "
                         f"feature_options.tap to a layer whose inputs the student quantizes")
    if jnp.shape(teacher_input) != jnp.shape(record.x):
        raise ValueError(f"SQuaT tap {record.path!r}: student input {jnp.shape(record.x)} and teacher input "
                         f"{jnp.shape(teacher_input)} differ; distil between models of one family or set "
                         f"feature_options.tap to layers of equal shape")
    q_s = to_code(lp, quantize_input(lp, record.x, record.q, record.delta), record.q)
    frozen = jax.lax.stop_gradient(record.q)
    x_t = jax.lax.stop_gradient(jnp.asarray(teacher_input, jnp.float32))
    q_t = jax.lax.stop_gradient(to_code(lp, quantize_input(lp, x_t, frozen, 0.0), frozen))
    return q_s, q_t


@register_feature
@dataclasses.dataclass(frozen=True)
class SQuaT(FeatureKD):
    """SQuaT's feature criterion: ``distance(q_s, sg(q_t))`` at the tap (see the module docstring).

    ``tap``: regex of the tap layer's path ('' = the model's declared tap, filled in by the runner
    from ``qkd_jax.models.registry.squat_tap``); ``distance``: 'mse' (released) or 'l1'.
    """

    name: ClassVar[str] = "squat"
    needs_tap: ClassVar[bool] = True
    tap: str = ""
    distance: str = "mse"

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"squat distance {self.distance!r} is unknown; use one of {sorted(DISTANCES)}")
        if not isinstance(self.tap, str):
            raise ValueError(f"squat tap must be a regex string, got {self.tap!r}")
        try:
            re.compile(self.tap)
        except re.error as err:
            raise ValueError(f"squat tap {self.tap!r} is not a valid regex ({err}); give a layer path such as "
                             f"'layer3_2/conv2'") from None

    def teacher_forward(self, apply_fn: Callable, variables: dict, images: Array) -> tuple[Array, Array]:
        """The train step's frozen-teacher forward: (logits, tap input), see :func:`teacher_tap`."""
        return teacher_tap(apply_fn, variables, images, self.tap)

    def student_forward(self, apply_fn: Callable, variables: dict, images: Array, *, rngs: dict,
                        teacher_input: Array) -> tuple[Array, Any, list, list]:
        """The train step's student forward: (logits, batch_stats, [q_s], [q_t]), see :func:`student_forward`."""
        return student_forward(apply_fn, variables, images, rngs=rngs, feature=self, teacher_input=teacher_input)

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        if not self.tap:
            raise ValueError("squat has no tap; set feature_options.tap (the runner fills in the model's "
                             "declared one, qkd_jax.models.registry.squat_tap)")
        (q_s,), (q_t,) = feats_s, feats_t
        return DISTANCES[self.distance](q_s, jax.lax.stop_gradient(q_t)), state

