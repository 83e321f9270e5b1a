"""Calibration sets the closed forms of docs/method.md section 4, recomputed here in NumPy.

The NumPy forward pass calibrates layer by layer: each quantized layer's statistics are taken on
its input as produced by the already-calibrated quantized layers before it.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from qkd_jax.quant.calibration import (
    DeadLayerError,
    UnsignedInputError,
    calibrate,
    calibrate_with_report,
    raise_on_calibration_problems,
    raise_on_dead_layers,
)
from qkd_jax.quant.layers import quantized_layers
from qkd_jax.quant.rules import Rule, rule_set, with_signed_inputs
from tests.quant.test_interval_search import np_search
from tests.quant.test_layers import np_conv, np_fake_quant

# unsafe_rbg keys: the default threefry RNG costs seconds of XLA compile per shape on CPU
KEY = functools.partial(jax.random.key, impl="unsafe_rbg")

BITS = 3
EPS_BN = 1e-5


class CalibNet(nn.Module):
    """stem (FP) -> relu -> q1 (bias) -> BN -> relu -> q2 (stride 2) -> relu -> pool -> classifier."""

    conv: type = nn.Conv
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(self.conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="stem")(x))
        x = self.conv(6, (3, 3), padding=((1, 1), (1, 1)), use_bias=True, name="q1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS_BN, name="bn1")(x)
        x = nn.relu(x)
        x = nn.relu(self.conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False, name="q2")(x))
        return self.dense(3, name="classifier")(x.mean(axis=(1, 2)))


def _rules(method, **kw):
    quantized = Rule(pattern=".*", method=method, w_bits=BITS, a_bits=BITS, **kw)
    return rule_set(Rule(pattern="stem", fp=True), quantized)


def closed_form(method, w, x, pact_alpha=None):
    """docs/method.md section 4 (std with ddof=1, as torch.std)."""
    w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
    if method == "interval":
        s = 3 * w.std(ddof=1)
        return {"w_lower": -s, "w_upper": s, "a_lower": x.min(),
                "a_upper": 3 * x.std(ddof=1) / math.sqrt(1 - 2 / math.pi)}
    if method == "lsq":
        return {"w_step": 2 * np.abs(w).mean() / math.sqrt(2 ** (BITS - 1) - 1),
                "a_step": 2 * np.abs(x).mean() / math.sqrt(2**BITS - 1)}
    if method == "qkd":
        # the least-MSE candidate of the NumPy search (float64); an argmin tie within float32 rounding
        # between two candidates of these 100-200 element kernels is not expected
        cands, errors = np_search(w, BITS)
        return {"w_interval": cands[np.argmin(errors)], "a_interval": x.max()}
    if method == "pact":
        alpha = pact_alpha if pact_alpha is not None else 3 * x.std(ddof=1) / math.sqrt(1 - 2 / math.pi)
        return {"a_alpha": alpha}
    return {}


def _layer(method, w, b, x, fwd, pact_alpha=None):
    """Calibrated params and output of one quantized layer; fwd(a, w, b) is the plain layer."""
    q = closed_form(method, w, x, pact_alpha)
    w_hat, a_hat, _ = np_fake_quant(method, w, x, {**q, "output_scale": 1.0}, BITS, BITS)
    y = fwd(a_hat, w_hat, b)
    if method == "interval":
        q["output_scale"] = np.abs(fwd(x, w, b)).mean() / np.abs(y).mean()
        y = y * q["output_scale"]
    return q, y


def reference(method, variables, x, train=True, pact_alpha=None, quantize_q1=True):
    """NumPy forward pass of CalibNet that calibrates each quantized layer on its input."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    conv = lambda s: (lambda a, w, b: np_conv(a, w, b, stride=s, pad=1))
    h = np.maximum(np_conv(np.asarray(x, np.float64), p["stem"]["kernel"]), 0)
    out = {}
    if quantize_q1:
        out["q1"], y = _layer(method, p["q1"]["kernel"], p["q1"]["bias"], h, conv(1), pact_alpha)
    else:
        y = np_conv(h, p["q1"]["kernel"], p["q1"]["bias"])
    if train:
        mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    else:
        mean, var = (np.asarray(variables["batch_stats"]["bn1"][k], np.float64) for k in ("mean", "var"))
    h = np.maximum((y - mean) / np.sqrt(var + EPS_BN) * p["bn1"]["scale"] + p["bn1"]["bias"], 0)
    out["q2"], y = _layer(method, p["q2"]["kernel"], None, h, conv(2), pact_alpha)
    h = np.maximum(y, 0).mean(axis=(1, 2))
    dense = lambda a, w, b: a @ w + b
    out["classifier"], _ = _layer(method, p["classifier"]["kernel"], p["classifier"]["bias"], h, dense, pact_alpha)
    return out


@pytest.fixture(scope="module")
def batch():
    return jax.random.normal(KEY(0), (3, 8, 8, 3))


def _student(method, batch, **kw):
    conv, dense = quantized_layers(_rules(method, **kw))
    model = CalibNet(conv=conv, dense=dense)
    variables = model.init(KEY(1), batch)
    # non-trivial running statistics, as a teacher would have
    variables["batch_stats"]["bn1"] = {"mean": jnp.linspace(-0.2, 0.3, 6), "var": jnp.linspace(0.5, 2.0, 6)}
    return model, variables


def _assert_quant_equal(variables, want):
    for layer, q in want.items():
        got = variables["params"][layer].get("quant", {})
        assert sorted(got) == sorted(q), layer
        for name, value in q.items():
            np.testing.assert_allclose(float(got[name]), value, rtol=2e-4, atol=1e-6, err_msg=f"{layer}/{name}")


@pytest.mark.parametrize("method", ["interval", "lsq", "qkd", "pact", "dorefa"])
def test_calibration_matches_closed_forms(method, batch):
    model, variables = _student(method, batch)
    new = jax.jit(lambda v, x: calibrate(model, v, x, train=True))(variables, batch)
    _assert_quant_equal(new, reference(method, variables, batch, train=True))
    # everything but the quantizer parameters is returned unchanged (running stats included)
    keep = lambda v: {k: a for k, a in traverse_util.flatten_dict(v).items() if "quant" not in k}
    jax.tree.map(np.testing.assert_array_equal, keep(new), keep(variables))


def test_calibration_in_eval_mode_uses_running_statistics(batch):
    model, variables = _student("interval", batch)
    new = calibrate(model, variables, batch, train=False, mutable=())
    _assert_quant_equal(new, reference("interval", variables, batch, train=False))


def test_calibration_is_sequential(batch):
    """q2 sees q1's quantized (calibrated) output, not the full-precision one."""
    model, variables = _student("interval", batch)
    new = calibrate(model, variables, batch, train=True)
    seq = reference("interval", variables, batch)["q2"]["a_upper"]
    fp_input = reference("interval", variables, batch, quantize_q1=False)["q2"]["a_upper"]
    assert abs(seq - fp_input) > 1e-3 * abs(seq)  # the test can tell the two apart
    np.testing.assert_allclose(float(new["params"]["q2"]["quant"]["a_upper"]), seq, rtol=2e-4)


def test_pact_constant_alpha(batch):
    model, variables = _student("pact", batch, pact_alpha=4.0)
    assert float(variables["params"]["q1"]["quant"]["a_alpha"]) == 4.0  # the placeholder too
    new = calibrate(model, variables, batch, train=True)
    _assert_quant_equal(new, reference("pact", variables, batch, pact_alpha=4.0))


def test_calibrated_student_runs_and_differs_from_placeholders(batch):
    model, variables = _student("lsq", batch)
    new = calibrate(model, variables, batch, train=True)
    assert float(new["params"]["q2"]["quant"]["w_step"]) != float(variables["params"]["q2"]["quant"]["w_step"])
    out = model.apply(new, batch)
    assert out.shape == (3, 3) and bool(jnp.all(jnp.isfinite(out)))


def test_calibration_raises_when_a_layer_did_not_run(batch):
    model, variables = _student("lsq", batch)
    params = dict(variables["params"])
    params["ghost"] = {"kernel": jnp.ones((2, 2)), "quant": {"w_step": jnp.float32(1.0)}}
    with pytest.raises(ValueError, match="ghost/quant/w_step"):
        calibrate(model, {**variables, "params": params}, batch, train=True)


def test_mutable_true_does_not_recalibrate(batch):
    model, variables = _student("lsq", batch)
    out, written = model.apply(variables, batch, train=False, mutable=True)
    assert "quant_calibration" not in written
    np.testing.assert_array_equal(out, model.apply(variables, batch, train=False))


def test_a_dead_quantized_layer_is_reported_by_name(batch):
    """A PACT clipping value far above every input puts each activation on the zero code: the
    quantized output of q1 is identically zero while the float one is not. Calibration names it
    instead of returning it silently. Later layers then see a constant input (BatchNorm of q1's
    bias, zero at init, through ReLU): their float outputs are zero too, so they are not blamed."""
    model, variables = _student("pact", batch, pact_alpha=1e4)
    with pytest.raises(DeadLayerError, match=r"layer\(s\) .*: q1\. ") as info:
        calibrate(model, variables, batch, train=True)
    assert "batch_size" in str(info.value)  # and says what to do
    # Under jit the flags come back for the caller to check (the runner does).
    _, checks = jax.jit(lambda v, x: calibrate_with_report(model, v, x, train=True))(variables, batch)
    assert {k for k, v in checks.dead.items() if bool(v)} == {"q1"}
    with pytest.raises(DeadLayerError):
        raise_on_dead_layers(jax.device_get(checks.dead))
    with pytest.raises(DeadLayerError):
        raise_on_calibration_problems(jax.device_get(checks))


def test_a_live_calibration_reports_no_dead_layer(batch):
    model, variables = _student("pact", batch)
    _, checks = calibrate_with_report(model, variables, batch, train=True)
    assert set(checks.dead) == {"q1", "q2", "classifier"} and not any(bool(v) for v in checks.dead.values())
    # every quantized input of CalibNet is a ReLU output: recorded, and exactly >= 0
    assert set(checks.unsigned_input_min) == {"q1", "q2", "classifier"}
    assert all(float(v) >= 0 for v in checks.unsigned_input_min.values())


class SignedNet(nn.Module):
    """stem (FP) -> 'q1' (its input is the stem's raw output: signed) -> relu -> 'q2' (unsigned)."""

    conv: type = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="stem")(x)
        x = nn.relu(self.conv(5, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="q1")(x))
        return self.conv(2, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="q2")(x)


def _signed_student(method, batch, signed=None):
    rules = with_signed_inputs(_rules(method), signed)
    model = SignedNet(conv=quantized_layers(rules)[0])
    return model, model.init(KEY(1), batch)


@pytest.mark.parametrize("method", ["interval", "lsq", "qkd", "pact", "dorefa"])
def test_an_undeclared_signed_input_raises_naming_the_layer_and_its_min(method, batch):
    """q1 reads the stem's output, which has negative values; declared unsigned, calibration
    refuses (the unsigned grid would clip them; the interval method too: the declaration must
    hold for every method) and names q1, its input minimum and the fix. Under jit the measured
    minima come back for the caller to check."""
    model, variables = _signed_student(method, batch)
    stem_out = np_conv(np.asarray(batch, np.float64), np.asarray(variables["params"]["stem"]["kernel"], np.float64))
    assert stem_out.min() < 0
    with pytest.raises(UnsignedInputError, match=r"q1 \(min -[0-9.e-]+\)") as info:
        calibrate(model, variables, batch, train=True)
    message = str(info.value)
    assert "q2" not in message and "registry" in message and "a_signed=True" in message
    reported = float(message.split("q1 (min ")[1].split(")")[0])
    np.testing.assert_allclose(reported, stem_out.min(), rtol=1e-3)  # 4 significant digits printed
    _, checks = jax.jit(lambda v, x: calibrate_with_report(model, v, x, train=True))(variables, batch)
    np.testing.assert_allclose(float(checks.unsigned_input_min["q1"]), stem_out.min(), rtol=1e-5, atol=1e-6)
    with pytest.raises(UnsignedInputError):
        raise_on_calibration_problems(jax.device_get(checks))


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_a_declared_signed_input_calibrates_on_the_signed_closed_form(method, batch):
    """Declared signed, q1 calibrates without error on the signed closed forms of docs/method.md
    section 4: LSQ a_step = 2 mean|x| / sqrt(2^(b-1) - 1), PACT a_alpha = |mean(x)| + 3 std(x)."""
    model, variables = _signed_student(method, batch, signed="q1")
    new = calibrate(model, variables, batch, train=True)
    x = np_conv(np.asarray(batch, np.float64), np.asarray(variables["params"]["stem"]["kernel"], np.float64))
    want = {"lsq": 2 * np.abs(x).mean() / math.sqrt(2 ** (BITS - 1) - 1),
            "pact": abs(x.mean()) + 3 * x.std(ddof=1)}[method]
    name = {"lsq": "a_step", "pact": "a_alpha"}[method]
    np.testing.assert_allclose(float(new["params"]["q1"]["quant"][name]), want, rtol=2e-4)
