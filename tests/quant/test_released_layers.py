"""The released (MQBench) preset, full-range layers, FP-input calibration and integer export."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.models import get_model
from qkd_jax.quant import export as qexport
from qkd_jax.quant.calibration import calibrate
from qkd_jax.quant.layers import quantized_layers
from qkd_jax.quant.released_rules import FullRangeRule, mqbench_academic
from qkd_jax.quant.rules import Rule, resolve, rule_set


def _paths(model_name):
    model = get_model(model_name, 200)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    return shapes["params"]


@pytest.mark.parametrize("model_name,n_layers", [("resnet18", 21), ("mobilenet_v2", 53)])
@pytest.mark.parametrize("method", ["pact_released", "lsq_released", "dorefa_released"])
def test_mqbench_academic_resolution(model_name, n_layers, method):
    """'stem' and 'classifier' are the released 32-bit layers (full range for PACT / DoReFa, FP
    for LSQ), every other conv / dense is the method at W4A3."""
    resolved = resolve(mqbench_academic(method, 4, 3), _paths(model_name))
    assert len(resolved) == n_layers
    for path, lp in resolved.items():
        if path in ("stem", "classifier"):
            if method == "lsq_released":
                assert not lp.quantized
            else:
                assert (lp.method, lp.full_range, lp.w_bits, lp.a_bits) == (method, True, 32, 32)
        else:
            assert (lp.method, lp.full_range, lp.w_bits, lp.a_bits) == (method, False, 4, 3), path


def test_mqbench_academic_and_full_range_rule_refuse_bad_input():
    with pytest.raises(ValueError, match="released method"):
        mqbench_academic("pact", 4, 4)
    with pytest.raises(ValueError, match="method must be one of"):
        FullRangeRule(pattern="stem", method="lsq_released")
    with pytest.raises(ValueError, match="takes only a pattern and a method"):
        FullRangeRule(pattern="stem", method="pact_released", w_bits=4)


class Mlp(nn.Module):
    """dense1 -> ReLU -> dense2 -> ReLU -> dense3, each layer quantized by the rules."""

    dense: object

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(self.dense(16, name="d1")(x))
        x = nn.relu(self.dense(16, name="d2")(x))
        return self.dense(4, name="d3")(x)


def _mlp(rules, seed=0):
    _, dense = quantized_layers(rules)
    model = Mlp(dense)
    x = jnp.asarray(np.random.default_rng(seed).normal(0, 3, (32, 8)), jnp.float32)
    return model, x, model.init(jax.random.key(seed), x)


def _np_dense(x, p):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def test_fp_input_calibration_lsq():
    """fp_inputs=True: every layer's step is 2 mean|x| / sqrt(Q_P) of its full-precision input;
    False: of the quantized predecessors' output (a different value)."""
    model, x, v = _mlp(uniform_rules("lsq_released", 4))
    p = jax.device_get(v["params"])
    h1 = np.maximum(_np_dense(np.asarray(x, np.float64), p["d1"]), 0)
    h2 = np.maximum(_np_dense(h1, p["d2"]), 0)
    fp = calibrate(model, v, x, fp_inputs=True)["params"]
    for name, inp in (("d1", np.asarray(x, np.float64)), ("d2", h1), ("d3", h2)):
        want = 2 * np.abs(inp).mean() / math.sqrt(7)
        assert float(fp[name]["quant"]["a_released_step"]) == pytest.approx(want, rel=1e-5)
        w = np.asarray(p[name]["kernel"], np.float64)
        assert float(fp[name]["quant"]["w_released_step"]) == pytest.approx(2 * np.abs(w).mean() / math.sqrt(7),
                                                                            rel=1e-5)
    seq = calibrate(model, v, x)["params"]
    assert float(seq["d1"]["quant"]["a_released_step"]) == pytest.approx(float(fp["d1"]["quant"]["a_released_step"]))
    assert abs(float(seq["d3"]["quant"]["a_released_step"]) / float(fp["d3"]["quant"]["a_released_step"]) - 1) > 1e-4


def uniform_rules(method, bits):
    return rule_set(Rule(pattern=".*", method=method, w_bits=bits, a_bits=bits))


def test_fp_input_calibration_passes_the_released_transforms_on():
    """In the FP-input pass a released DoReFa layer outputs layer(tanh-normalised x, tanh-normalised W)
    (MQBench: observers on, rounding off), a released PACT layer layer(clip(x, -6, 6), normalised W):
    the LSQ layer after it calibrates on that."""
    def norm(a):
        t = np.tanh(a)
        return t / (np.abs(t).max() + 1e-5)

    for first, transform_x in (("dorefa_released", norm), ("pact_released", lambda a: np.clip(a, -6, 6))):
        rules = rule_set(Rule(pattern="d1", method=first, w_bits=4, a_bits=4),
                         Rule(pattern="d2|d3", method="lsq_released", w_bits=4, a_bits=4))
        model, x, v = _mlp(rules, seed=1)
        p = jax.device_get(v["params"])
        w1 = norm(np.asarray(p["d1"]["kernel"], np.float64))
        h1 = np.maximum(transform_x(np.asarray(x, np.float64)) @ w1 + np.asarray(p["d1"]["bias"]), 0)
        got = calibrate(model, v, x, fp_inputs=True)["params"]["d2"]["quant"]["a_released_step"]
        assert float(got) == pytest.approx(2 * np.abs(h1).mean() / math.sqrt(7), rel=1e-5)


def test_full_range_layer_forward():
    """A FullRangeRule layer computes layer(transform(x), normalised W) + bias, no rounding."""
    rules = rule_set(FullRangeRule(pattern="d1|d3", method="dorefa_released"),
                     Rule(pattern="d2", method="dorefa_released", w_bits=4, a_bits=4))
    model, x, v = _mlp(rules, seed=2)
    p = jax.device_get(v["params"])
    y = np.asarray(model.apply(v, x))

    def norm(a):
        t = np.tanh(a)
        return t / (np.abs(t).max() + 1e-5)

    def q(a, bits=4):
        s = float(np.float32(1) / np.float32((2**bits - 1) / 2))
        return np.clip(np.rint(norm(a) / s), -8, 7) * s

    x64 = np.asarray(x, np.float64)
    h1 = np.maximum(norm(x64) @ norm(np.asarray(p["d1"]["kernel"], np.float64)) + np.asarray(p["d1"]["bias"]), 0)
    h2 = np.maximum(q(h1) @ q(np.asarray(p["d2"]["kernel"], np.float64)) + np.asarray(p["d2"]["bias"]), 0)
    want = norm(h2) @ norm(np.asarray(p["d3"]["kernel"], np.float64)) + np.asarray(p["d3"]["bias"])
    # float32 forward vs float64 reference: a code of layer 2 can flip only for an input within
    # ~1e-7 relative of a rounding boundary (none here, the check would be off by a grid step).
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["pact_released", "lsq_released", "dorefa_released"])
def test_integer_export_matches_the_fake_quantized_student(method):
    """Export and integer inference of the released records (DoReFa: activation codes computed per
    batch by the quantizer, as the student does): logits equal to float32 rounding."""
    from tests.quant.test_export import RTOL, Branches, _student

    specs = [(method, b) for b in (2, 4, 8)]
    names = tuple(f"{m.split('_')[0]}{b}" for m, b in specs)
    rules = rule_set(*(Rule(pattern=f"{n}_(c1|c2|fc)", method=m, w_bits=b, a_bits=b)
                       for n, (m, b) in zip(names, specs)))
    conv, dense = quantized_layers(rules)
    model = Branches(names, conv, dense, deep=True)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 8, 8, 3)), jnp.float32)
    variables, fake, _ = _student(model, x, seed=3)
    exported = qexport.export_variables(model, variables, (8, 8, 3))
    int_logits = np.asarray(qexport.IntegerModel(model, exported)(x))
    scale = np.abs(fake).max()
    np.testing.assert_allclose(int_logits, fake, rtol=0, atol=RTOL * scale)


def test_integer_export_refuses_full_range_layers():
    from tests.quant.test_export import Branches, _student

    rules = rule_set(FullRangeRule(pattern="a_c1", method="pact_released"),
                     Rule(pattern="a_(c2|fc)", method="pact_released", w_bits=4, a_bits=4))
    conv, dense = quantized_layers(rules)
    model = Branches(("a",), conv, dense, deep=True)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 8, 8, 3)), jnp.float32)
    variables, _, _ = _student(model, x, seed=4)
    with pytest.raises(qexport.ExportError, match="full-range"):
        qexport.export_variables(model, variables, (8, 8, 3))
