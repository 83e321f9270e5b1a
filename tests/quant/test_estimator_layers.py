"""Estimators in quantized layers and in the config (docs/method.md section 12).

A layer's rule carries its estimator; the stochastic training forward runs only when apply gets a
'quantize' PRNG stream (the train step's), so evaluation and export see the hard rounding; the
config names any registered estimator, validates its options in one line and records them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.quant import estimators as E
from qkd_jax.quant.layers import QUANTIZE_RNG, QDense
from qkd_jax.quant.rules import LayerPrecision, Rule, rule_set
from qkd_jax.run import build
from qkd_jax.run.config_schema import ConfigError, base_config, validate
from qkd_jax.run.estimator_config import parse_options
from qkd_jax.run.record import quant_record

KEY = functools.partial(jax.random.key, impl="unsafe_rbg")


def _layer(estimator, method="lsq"):
    lp = LayerPrecision(method=method, w_bits=2, a_bits=2, a_signed=True, estimator=estimator)
    return QDense(features=3, rules=lp)


def _setup(method="lsq"):
    x = jax.random.normal(KEY(0), (5, 4))
    variables = _layer(None, method).init(KEY(1), x)
    return x, variables


@pytest.mark.parametrize("name", ["noise", "stochastic"])
def test_stochastic_forward_only_with_the_quantize_stream(name):
    x, variables = _setup()
    hard = _layer(None).apply(variables, x)
    est = E.make(name)
    # no 'quantize' stream (evaluation, export): exactly the hard forward
    np.testing.assert_array_equal(np.asarray(_layer(est).apply(variables, x)), np.asarray(hard))
    noisy = _layer(est).apply(variables, x, rngs={QUANTIZE_RNG: KEY(2)})
    assert np.all(np.isfinite(np.asarray(noisy))) and not np.allclose(np.asarray(noisy), np.asarray(hard))
    again = _layer(est).apply(variables, x, rngs={QUANTIZE_RNG: KEY(2)})
    np.testing.assert_array_equal(np.asarray(again), np.asarray(noisy))  # the key decides the draw


def test_noise_training_forward_is_the_plain_layer_on_the_noised_operands():
    """The off-grid training forward skips the integer factorisation: y = x_hat @ w_hat + b with
    the noised operands the layer records in 'intermediates'."""
    x, variables = _setup()
    y, state = _layer(E.make("noise")).apply(variables, x, rngs={QUANTIZE_RNG: KEY(3)},
                                             mutable=["intermediates"])
    inter = state["intermediates"]
    w_hat, a_hat = inter["w_hat"][0], inter["a_hat"][0]
    step = float(variables["params"]["quant"]["a_step"])
    assert not np.allclose(np.asarray(a_hat) / step, np.round(np.asarray(a_hat) / step))  # off the grid
    expected = np.asarray(a_hat) @ np.asarray(w_hat) + np.asarray(variables["params"]["bias"])
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)


def test_layer_gradient_follows_the_rules_estimator():
    """d y / d x of a DoReFa-activation layer: the ApproxSign slope 2 - 2|t| on the 1-bit grid
    (x_n = clip(x, 0, 1), t = 2 x_n - 1), times W summed over outputs; STE gives 1."""
    x = jnp.asarray([[0.1, 0.4, 0.55, 0.9]])
    lp = LayerPrecision(method="dorefa", w_bits=None, a_bits=1, estimator=E.make("approxsign"))
    layer = QDense(features=2, rules=lp)
    variables = layer.init(KEY(0), x)
    grad = jax.grad(lambda v: jnp.sum(layer.apply(variables, v)))(x)
    w = np.asarray(variables["params"]["kernel"])
    t = 2 * np.asarray(x)[0] - 1
    np.testing.assert_allclose(np.asarray(grad)[0], (2 - 2 * np.abs(t)) * w.sum(1), rtol=1e-5, atol=1e-6)


def test_rules_carry_the_estimator_per_layer():
    dsq = E.make("dsq", {"alpha": 0.4})
    rules = rule_set(Rule(pattern="a", method="lsq", w_bits=2, a_bits=2, estimator=dsq),
                     Rule(pattern=".*", method="lsq", w_bits=2, a_bits=2))
    assert rules.match("a").estimator == dsq and rules.match("b").estimator is None
    with pytest.raises(ValueError, match="Rule estimator must be an Estimator"):
        Rule(pattern=".*", method="lsq", w_bits=2, a_bits=2, estimator="dsq")


# --------------------------------------------------------------------------------- config


def _config(**quant):
    c = base_config()
    c.dataset.name, c.model.name = "qkd_digits", "resnet20"
    for key, value in quant.items():
        c.quant[key] = value
    return c


@pytest.mark.parametrize("method", ["interval", "lsq", "pact", "dorefa", "qkd"])
def test_config_estimator_reaches_every_quantized_layer(method):
    c = _config(method=method, estimator="reste", estimator_options="power=2,threshold=1.2")
    validate(c)
    rules = build.student_rules(c)
    quantized = [r.precision() for r in rules.rules if not r.full_precision]
    assert quantized and all(lp.estimator == E.ReSTE(power=2.0, threshold=1.2) for lp in quantized)


def test_legacy_names_keep_the_quant_delta_path_and_released_variant_takes_estimators():
    for name in ("ste", "ewgs", "hessian"):
        assert all(r.estimator is None for r in build.student_rules(_config(estimator=name)).rules)
    c = _config(method="lsq", variant="released", preset="mqbench_academic", w_bits=4, a_bits=4,
                estimator="approxsign")
    validate(c)
    inner = build.student_rules(c).rules[-1].precision()
    assert inner.method == "lsq_released" and isinstance(inner.estimator, E.ApproxSign)


@pytest.mark.parametrize("quant,match", [
    ({"estimator": "newton"}, r"config\.quant\.estimator='newton' is invalid: unknown gradient estimator; "
                              r"registered: \['approxsign', 'dsq', 'ewgs', 'hessian', 'noise', 'reste', 'ste', "
                              r"'stochastic'\]"),
    ({"estimator": "dsq", "estimator_options": "beta=1"}, r"quant\.estimator_options='beta=1' is invalid: "
                                                           r"estimator 'dsq' has no option\(s\) \['beta'\]"),
    ({"estimator": "dsq", "estimator_options": "alpha"}, r"'alpha' is not key=value"),
    ({"estimator": "dsq", "estimator_options": "alpha=big"}, r"the value 'big' is not a number"),
    ({"estimator": "noise", "estimator_options": "rate=2"}, r"rate=2.0 must be in \[0, 1\]"),
    ({"estimator": "hessian", "estimator_options": "delta=1"}, r"estimator 'hessian' takes no estimator_options"),
])
def test_config_errors_are_one_line(quant, match):
    with pytest.raises(ConfigError, match=match) as err:
        validate(_config(**quant))
    assert "\n" not in str(err.value)


def test_options_parse_and_are_recorded_only_when_set():
    assert parse_options(" alpha=0.3, delta=None ,") == {"alpha": 0.3, "delta": None}
    assert "quant.estimator_options" not in quant_record(_config(estimator="dsq"))
    record = quant_record(_config(estimator="dsq", estimator_options="alpha=0.3"))
    assert record["quant.estimator"] == "dsq" and record["quant.estimator_options"] == "alpha=0.3"


def test_config_json_written_before_estimators_existed_loads_with_the_legacy_defaults(tmp_path):
    import json

    from qkd_jax.run.config_files import load_config

    values = json.loads(base_config().to_json())
    for key in ("estimator_options", "diagnostics_every_steps", "diagnostics_estimators"):
        del values["quant"][key]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    config = load_config(str(path))
    validate(config)
    assert (config.quant.estimator_options, config.quant.diagnostics_every_steps) == ("", 0)
