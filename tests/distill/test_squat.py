"""SQuaT (qkd_jax.distill.squat_feature): values and gradients against a float64 torch
transcription of the released loss, the teacher side's stop-gradient, each quantizer method's
teacher grid equal to its student grid, the declared taps, and the train step's wiring."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from qkd_jax import distill
from qkd_jax.distill.squat_feature import SQuaT, TapRecord, code_span, student_forward, tap_codes
from qkd_jax.quant import estimators
from qkd_jax.quant.layers import QConv
from qkd_jax.quant.methods import QUANT_METHODS, get_method
from qkd_jax.quant.precision import LayerPrecision
from qkd_jax.train.state import create_train_state
from qkd_jax.train.step import train_step
from tests.distill import torch_squat_released as ref

RTOL, ATOL = 2e-4, 2e-6


def _data(seed=0, n=4, c=3, classes=5):
    rng = np.random.default_rng(seed)
    x_s = np.maximum(rng.normal(size=(n, 2, 2, c)), 0.0)  # ReLU outputs, zeros included
    x_t = np.maximum(rng.normal(size=(n, 2, 2, c)) * 1.3, 0.0)
    return (rng.normal(size=(n, classes)), rng.normal(size=(n, classes)), rng.integers(0, classes, n), x_s, x_t)


def _jax_total(s_logits, x_s, q, *, t_logits, labels, x_t, lp, delta, gamma):
    objective = distill.squat(gamma=gamma, feature=SQuaT(tap="tap"))
    logit_loss, _ = objective(s_logits, t_logits, labels)
    q_s, q_t = tap_codes(TapRecord("tap", x_s, lp, q, delta), x_t)
    feature_loss, _ = objective.feature.loss({}, {}, [q_s], [q_t], rng=None)
    return logit_loss + objective.beta * feature_loss


@pytest.mark.parametrize("bits,delta,labels", [(2, 0.0, False), (2, 0.3, False), (1, 0.2, True), (4, 0.1, True)])
def test_loss_and_gradients_match_the_released_torch_code(bits, delta, labels):
    """KL_4 + MSE(q_s, q_t) (+ the CIFAR script's CE with labels=True) and its gradients w.r.t. the
    student's logits, tap input and interval bounds, against the float64 transcription."""
    s, t, y, x_s, x_t = _data(bits)
    lower, upper = 0.0, 1.7
    lp = LayerPrecision(method="interval", w_bits=bits, a_bits=bits, output_scale=True)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    total = functools.partial(_jax_total, t_logits=f32(t), labels=jnp.asarray(y), x_t=f32(x_t), lp=lp,
                              delta=delta, gamma=1.0 if labels else 0.0)
    q = {"a_lower": f32(lower), "a_upper": f32(upper)}
    value, (g_s, g_x, g_q) = jax.value_and_grad(total, argnums=(0, 1, 2))(f32(s), f32(x_s), q)

    ts, tx = torch.tensor(s, requires_grad=True), torch.tensor(x_s, requires_grad=True)
    tl = torch.tensor(lower, dtype=torch.float64, requires_grad=True)
    tu = torch.tensor(upper, dtype=torch.float64, requires_grad=True)
    expected = ref.squat_loss(ts, torch.tensor(t), torch.tensor(y), tx, torch.tensor(x_t), tl, tu,
                              levels=2**bits, delta=delta, ce=labels)
    expected.backward()
    np.testing.assert_allclose(value, expected.item(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g_s, ts.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g_x, tx.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g_q["a_lower"], tl.grad.item(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g_q["a_upper"], tu.grad.item(), rtol=RTOL, atol=ATOL)


def _method_case(name: str, bits: int, signed: bool):
    """(lp, calibrated params, student input, teacher input) for a method at a bit width."""
    method = get_method(name)
    lp = LayerPrecision(method=name, w_bits=bits, a_bits=bits, a_signed=signed, output_scale=method.output_scale)
    rng = np.random.default_rng(bits)
    x_s = jnp.asarray(rng.normal(size=(3, 4, 4, 5)) * 2.0, jnp.float32)
    x_t = jnp.asarray(rng.normal(size=(3, 4, 4, 5)) * 2.5 + 0.3, jnp.float32)
    if not signed:
        x_s, x_t = jnp.maximum(x_s, 0.0), jnp.maximum(x_t, 0.0)
    q = {k: jnp.asarray(v, jnp.float32) for k, v in method.input_params.items()}
    q.update({k: jnp.asarray(v, jnp.float32) for k, v in method.calibrate_input(lp, x_s).items()})
    return lp, q, x_s, x_t


# The released (MQBench) records take 2..8 bits.
METHOD_CASES = [(m, b, s) for m in sorted(QUANT_METHODS) for b in ((2, 4) if m.endswith("_released") else (1, 2, 4))
                for s in ((False, True) if QUANT_METHODS[m].signed_inputs else (False,))]


@pytest.mark.parametrize("name,bits,signed", METHOD_CASES)
def test_teacher_codes_lie_on_the_students_grid(name, bits, signed):
    """For every registered method: both codes times the span are integers on the method's input
    grid (multiplier * code - zero_point, code in 0..levels-1), and the teacher side applied to the
    student's own input gives the student's codes exactly (same quantizer, same parameters)."""
    lp, q, x_s, x_t = _method_case(name, bits, signed)
    levels, multiplier, zero_point = get_method(name).input_grid(bits, signed)
    span = code_span(lp)
    q_s, q_t = tap_codes(TapRecord("tap", x_s, lp, q, 0.0), x_t)
    for codes in (q_s, q_t):
        ints = np.asarray(codes, np.float64) * span
        np.testing.assert_allclose(ints, np.round(ints), atol=2e-3)
        grid_index = (np.round(ints) + zero_point) / multiplier
        np.testing.assert_array_equal(grid_index, np.round(grid_index))
        assert grid_index.min() >= 0 and grid_index.max() <= levels - 1
    same_s, same_t = tap_codes(TapRecord("tap", x_s, lp, q, 0.0), x_s)
    np.testing.assert_array_equal(same_s, same_t)
    assert len(np.unique(np.round(np.asarray(q_t) * span))) >= min(2, levels)


@pytest.mark.parametrize("name", sorted(n for n, m in QUANT_METHODS.items() if m.input_params))
def test_teacher_side_passes_no_gradient_to_the_quantizer(name):
    """d(sum w * q_t)/d theta == 0 exactly; d(sum w * q_s)/d theta != 0; and the SQuaT distance's
    gradient equals the one with the teacher's codes taken as constants."""
    lp, q, x_s, x_t = _method_case(name, 2, False)
    # Half the calibrated range, so that some inputs clip (PACT's alpha gets its gradient only there).
    q = jax.tree.map(lambda v: v * 0.5, q)
    w = jnp.asarray(np.random.default_rng(1).normal(size=x_s.shape), jnp.float32)
    side = lambda i: lambda q: jnp.sum(w * tap_codes(TapRecord("tap", x_s, lp, q, 0.0), x_t)[i])  # noqa: E731
    for leaf in jax.tree.leaves(jax.grad(side(1))(q)):
        assert float(leaf) == 0.0
    assert any(float(jnp.abs(g)) > 0 for g in jax.tree.leaves(jax.grad(side(0))(q)))

    crit = SQuaT(tap="tap")
    q_t_const = tap_codes(TapRecord("tap", x_s, lp, q, 0.0), x_t)[1]

    def through(q):
        q_s, q_t = tap_codes(TapRecord("tap", x_s, lp, q, 0.0), x_t)
        return crit.loss({}, {}, [q_s], [q_t], rng=None)[0]

    def constant(q):
        return crit.loss({}, {}, [tap_codes(TapRecord("tap", x_s, lp, q, 0.0), x_t)[0]], [q_t_const], rng=None)[0]

    for a, b in zip(jax.tree.leaves(jax.grad(through)(q)), jax.tree.leaves(jax.grad(constant)(q))):
        assert float(a) == float(b)


class _TapNet(nn.Module):
    """FP stem conv + ReLU, the quantized 'tap' conv, mean pool, FP classifier."""

    lp: LayerPrecision | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), padding=1, use_bias=False, name="stem")(x))
        x = QConv(4, (3, 3), padding=1, use_bias=False, rules=self.lp, name="tap")(x)
        return nn.Dense(5, name="classifier")(jnp.mean(x, axis=(1, 2)))


def test_train_step_distils_the_recorded_taps_with_a_frozen_teacher_side():
    """One SGD step of squat(beta=2) on a toy net: the 'squat' metric is MSE of the interval codes of
    relu(stem(x)) in student and teacher (computed here by hand), and the interval bounds move by
    -lr * the gradient of KL + 2 * MSE with the teacher's codes held constant."""
    lp = LayerPrecision(method="interval", w_bits=2, a_bits=2)
    student, teacher = _TapNet(lp), _TapNet(None)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 6, 3)), jnp.float32)
    s_vars = student.init(jax.random.key(0), x)
    s_vars = {**s_vars, "params": {**s_vars["params"], "tap": {**s_vars["params"]["tap"],
                                                              "quant": {"a_lower": jnp.float32(0.0), "a_upper": jnp.float32(1.2),
                                                                        "w_lower": jnp.float32(-0.3), "w_upper": jnp.float32(0.3)}}}}
    t_vars = teacher.init(jax.random.key(1), x)
    lr = 0.1
    objective = distill.squat(beta=2.0, feature=SQuaT(tap="tap"))
    state = create_train_state(apply_fn=student.apply, variables=s_vars, tx=optax.sgd(lr), rng=jax.random.key(2),
                               teacher_apply_fn=teacher.apply, teacher_variables=t_vars)
    new_state, metrics = jax.jit(functools.partial(train_step, objective=objective, axis_name=None))(
        state, {"image": x, "label": jnp.zeros(4, jnp.int32)})

    def codes(tap_in, lower, upper, ste):
        x_n = (tap_in - lower) / (upper - lower)
        # the released clamp: gradient 1 inside, bounds included (jnp.clip splits it at a tie)
        x_n = jnp.where(x_n < 0.0, jax.lax.stop_gradient(0.0 * x_n), jnp.where(x_n > 1.0, 1.0 + 0.0 * jax.lax.stop_gradient(x_n), x_n))
        rounded = jnp.round(x_n * 3.0) / 3.0
        return x_n + jax.lax.stop_gradient(rounded - x_n) if ste else rounded

    stem = lambda params: nn.relu(nn.Conv(4, (3, 3), padding=1, use_bias=False).apply({"params": params}, x))  # noqa: E731
    q_t = np.asarray(codes(stem(t_vars["params"]["stem"]), 0.0, 1.2, False))
    t_logits = teacher.apply(t_vars, x)

    def reference(params):
        quant = params["tap"]["quant"]
        q_s = codes(stem(params["stem"]), quant["a_lower"], quant["a_upper"], True)
        kl = jnp.mean(distill.kl_divergence(student.apply({"params": params}, x), t_logits, 4.0))
        return kl + 2.0 * jnp.mean((q_s - q_t) ** 2), jnp.mean((q_s - q_t) ** 2)

    (_, mse), grads = jax.value_and_grad(reference, has_aux=True)(s_vars["params"])
    np.testing.assert_allclose(metrics["squat"], mse, rtol=1e-5, atol=1e-7)
    for k in ("a_lower", "a_upper"):
        moved = s_vars["params"]["tap"]["quant"][k] - new_state.params["tap"]["quant"][k]
        np.testing.assert_allclose(moved, lr * grads["tap"]["quant"][k], rtol=1e-4, atol=1e-7)
        assert abs(float(grads["tap"]["quant"][k])) > 0


def test_the_models_declared_taps_are_the_last_conv_of_the_last_block():
    """The runner fills an empty tap from the registry, and each declared regex's last match in
    forward order is the released layer (last block's conv2; conv3 / project by the same rule)."""
    from qkd_jax.distill.squat_feature import _interceptor
    from qkd_jax.models import get_model
    from qkd_jax.models.registry import squat_tap
    from qkd_jax.run.plan import with_model_tap

    expected = {"resnet20": "layer3_2/conv2", "resnet32": "layer3_4/conv2", "resnet18": "layer4_1/conv2",
                "resnet34": "layer4_2/conv2", "resnet50": "layer4_2/conv3", "mobilenet_v2": "block17/project"}
    for model_name, path in expected.items():
        model, records = get_model(model_name, 10), []
        x = jnp.zeros((1, 32, 32, 3), jnp.float32)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
        with nn.intercept_methods(_interceptor(squat_tap(model_name), records, student=False)):
            jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
        assert records[-1].path == path, model_name
    objective = with_model_tap(distill.squat(), "resnet20")
    assert objective.feature.tap == squat_tap("resnet20") and objective.name == "squat"
    with pytest.raises(ValueError, match="feature_options.tap"):
        squat_tap("vgg8")


def test_student_tap_takes_the_train_steps_quantize_stream():
    """A stochastic estimator at the tap (additive noise on every element) noises the student's
    forward when the train step's 'quantize' stream reaches it, and only then: without the stream
    the logits are the hard forward's (model.apply with no stream). The distance itself reads
    the hard codes of the recorded tap input (on the 2-bit grid either way)."""
    lp = LayerPrecision(method="interval", w_bits=2, a_bits=2, estimator=estimators.make("noise", {"rate": 1.0}))
    student = _TapNet(lp)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 3)), jnp.float32)
    s_vars = student.init(jax.random.key(0), x)
    feature = SQuaT(tap="tap")
    t_in = jnp.zeros((2, 5, 5, 4), jnp.float32)

    def forward(rngs):
        logits, _, (q_s,), _ = student_forward(student.apply, s_vars, x, rngs=rngs, feature=feature, teacher_input=t_in)
        return np.asarray(logits), np.asarray(q_s) * 3.0

    hard_logits, hard_codes = forward({"dropout": jax.random.key(1)})
    noised_logits, noised_codes = forward({"dropout": jax.random.key(1), "quantize": jax.random.key(2)})
    np.testing.assert_allclose(hard_logits, np.asarray(student.apply(s_vars, x, train=True)), rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(noised_logits - hard_logits)) > 1e-3
    for codes in (hard_codes, noised_codes):
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-5)
