"""qkd_jax/quant/diagnostics.py on a two-layer quantized MLP: kernel gradient norms and cosines against
gradients taken directly with each estimator's model, the first layer's input gradient norm against
the gradient with respect to the model input, the clip fractions against NumPy on the quantizers'
bounds, and the descent check's bookkeeping (no step: never a descent)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qkd_jax.quant import estimators as E
from qkd_jax.quant.diagnostics import estimator_diagnostics, with_estimator
from qkd_jax.quant.layers import QDense
from qkd_jax.quant.rules import Rule, rule_set

KEY = functools.partial(jax.random.key, impl="unsafe_rbg")
RULES = rule_set(Rule(pattern="fc1", method="interval", w_bits=2, a_bits=2),
                 Rule(pattern="fc2", method="lsq", w_bits=2, a_bits=None))


class MLP(nn.Module):
    rules: object

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(QDense(16, rules=self.rules, name="fc1")(x))
        return QDense(5, rules=self.rules, name="fc2")(x)


def _setup():
    x = jax.random.normal(KEY(0), (32, 8))
    labels = jnp.arange(32) % 5
    variables = MLP(RULES).init(KEY(1), x)
    params = jax.tree.map(lambda v: v, variables["params"])
    params["fc1"]["quant"]["w_lower"] = jnp.float32(-0.3)
    params["fc1"]["quant"]["w_upper"] = jnp.float32(0.3)
    return {**variables, "params": params}, x, labels


def model_for(est):
    return MLP(with_estimator(RULES, est) if est is not None else RULES)


def _direct_grads(est, variables, x, labels):
    """Kernel gradients of both layers, taken directly with the estimator's model."""
    model = model_for(est)

    def loss(p):
        logits = model.apply({**variables, "params": p}, x, train=False)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    g = jax.jit(jax.grad(loss))(variables["params"])
    return {layer: np.asarray(g[layer]["kernel"], np.float64) for layer in ("fc1", "fc2")}


def _input_grad(est, variables, x, labels):
    """dL/dx at the model input, which is fc1's input."""
    model = model_for(est)

    def loss(v):
        logits = model.apply(variables, v, train=False)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return np.asarray(jax.jit(jax.grad(loss))(x), np.float64)


def test_report_against_direct_gradients_and_closed_forms():
    variables, x, labels = _setup()
    ests = {"ste": None, "dsq": E.make("dsq", {"alpha": 0.3}), "approxsign": E.make("approxsign")}
    report = estimator_diagnostics(model_for, RULES, variables, x, labels, ests, step_sizes=(0.0, 0.5))
    assert report["layers"] == ["fc1", "fc2"]
    direct = {n: _direct_grads(e, variables, x, labels) for n, e in ests.items()}
    for layer in ("fc1", "fc2"):
        g = {n: direct[n][layer] for n in ests}
        for n in ests:
            assert report["grad_norm"][n][layer] == pytest_approx(np.linalg.norm(g[n]))
        cos = g["ste"].ravel() @ g["dsq"].ravel() / (np.linalg.norm(g["ste"]) * np.linalg.norm(g["dsq"]))
        assert report["cosine"][layer]["ste|dsq"] == pytest_approx(cos)
        assert -1.0 <= report["cosine"][layer]["dsq|approxsign"] <= 1.0
    for n, e in ests.items():
        assert report["act_grad_norm"][n]["fc1"] == pytest_approx(np.linalg.norm(_input_grad(e, variables, x, labels)))
        assert report["act_grad_norm"][n]["fc2"] > 0
    # fc1's interval activation quantizer (a_lower 0, a_upper 1 at init) clips the input outside [0, 1];
    # fc2 keeps full-precision inputs
    xs = np.asarray(x)
    assert report["act_clip_fraction"]["fc1"] == pytest_approx(np.mean((xs < 0) | (xs > 1)))
    assert report["act_clip_fraction"]["fc2"] == 0.0
    # the estimators differ where the rounding sits (fc1 rounds weights and inputs)
    assert report["grad_norm"]["dsq"]["fc1"] != report["grad_norm"]["ste"]["fc1"]
    # interval weights clip outside [-0.3, 0.3]; LSQ outside [-2 s, s] for its step s (W2: Q_N 2, Q_P 1)
    w1 = np.asarray(variables["params"]["fc1"]["kernel"])
    assert report["clip_fraction"]["fc1"] == pytest_approx(np.mean(np.abs(w1) > 0.3))
    w2, s = np.asarray(variables["params"]["fc2"]["kernel"]), float(variables["params"]["fc2"]["quant"]["w_step"])
    assert report["clip_fraction"]["fc2"] == pytest_approx(np.mean((w2 / s < -2) | (w2 / s > 1)))
    # a step of size 0 never lowers the loss: at most half of the (layer, eta) pairs descend
    for n in ests:
        assert [d[0] for d in report["descent_detail"][n].values()] == [False, False]
        assert report["descent"][n] == sum(d[1] for d in report["descent_detail"][n].values()) / 4


def pytest_approx(v):
    import pytest

    return pytest.approx(float(v), rel=1e-5, abs=1e-7)
