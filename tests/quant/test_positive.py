"""Learnable widths kept positive: a step, interval, clipping value or interval width pushed
across zero by training leaves the quantizers finite (qkd_jax.quant.positive)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax import quant
from qkd_jax.quant.positive import MIN_WIDTH, effective_width, interval_width, positive_width
from tests.quant.test_layers import np_lsq, np_pact, np_qkd


def test_positive_width_is_the_identity_above_min_width():
    p = jnp.asarray([1e-3, 0.5, 7.0], jnp.float32)
    np.testing.assert_array_equal(positive_width(p), p)  # bit for bit: ordinary runs unchanged
    g = jax.grad(lambda v: jnp.sum(positive_width(v) * jnp.asarray([1.0, 2.0, 3.0])))(p)
    np.testing.assert_array_equal(g, [1.0, 2.0, 3.0])


def test_positive_width_mirrors_and_clamps_with_sign_gradient():
    p = jnp.asarray([-0.25, -1e-12, 1e-12], jnp.float32)
    np.testing.assert_allclose(positive_width(p), [0.25, MIN_WIDTH, MIN_WIDTH], rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(positive_width(v)))(p)
    np.testing.assert_array_equal(g, [-1.0, -1.0, 1.0])  # straight through the clamp: never stuck
    np.testing.assert_allclose(effective_width(np.asarray(p)), [0.25, MIN_WIDTH, MIN_WIDTH], rtol=1e-6)


def test_interval_width_clamps_with_identity_gradient():
    w = interval_width(jnp.float32(0.5), jnp.float32(0.2))
    assert float(w) == pytest.approx(MIN_WIDTH, rel=1e-6)
    g_lo, g_hi = jax.grad(lambda lo, hi: interval_width(lo, hi), argnums=(0, 1))(jnp.float32(0.5), jnp.float32(0.2))
    assert (float(g_lo), float(g_hi)) == (-1.0, 1.0)


X = np.random.default_rng(3).normal(size=41).astype(np.float32)  # no exact rounding ties


@pytest.mark.parametrize("name, fn, ref", [
    ("lsq", lambda x, p: quant.lsq(x, p, 3, signed=True), lambda x, p: np_lsq(x, p, 3, True)),
    ("pact", lambda x, p: quant.pact(x, p, 3), lambda x, p: np_pact(x, p, 3)),
    ("qkd", lambda x, p: quant.qkd_interval(x, p, 3, signed=True), lambda x, p: np_qkd(x, p, 3, True)),
])
def test_a_negative_traced_parameter_acts_as_its_magnitude(name, fn, ref):
    """Under jit (no static check), -p quantizes as |p| (float64 NumPy reference), and a zero
    parameter gives finite values and gradients."""
    got = jax.jit(fn)(X, jnp.float32(-0.6))
    np.testing.assert_allclose(got, ref(X.astype(np.float64), 0.6), rtol=1e-6, atol=1e-6)
    for p in (0.0, -0.0, 1e-30):
        value, grads = jax.jit(jax.value_and_grad(lambda x, v: jnp.sum(fn(x, v) ** 2), argnums=(0, 1)))(X, jnp.float32(p))
        assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads), (name, p)


def test_crossed_interval_bounds_stay_finite():
    f = jax.jit(lambda x, lo, hi: quant.interval_quantize(x, lo, hi, 2, signed=False))
    out = f(X, jnp.float32(0.3), jnp.float32(0.3))  # zero width: a step at `lower`
    np.testing.assert_array_equal(out, np.where(X > 0.3, 1.0, 0.0))
    grads = jax.grad(lambda lo, hi: jnp.sum(f(X, lo, hi)), argnums=(0, 1))(jnp.float32(0.3), jnp.float32(0.1))
    assert all(np.isfinite(float(g)) for g in grads)


def test_sgd_pushing_an_lsq_step_through_zero_keeps_training_finite():
    """Plain gradient descent with a rate large enough to throw the step below zero: the loss
    and every later value stay finite, and the step keeps moving (sign gradient, no dead clamp)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=256), jnp.float32)

    def loss(step):
        return jnp.mean(quant.lsq(x, step, 2, signed=True) ** 2)  # pulls the step towards zero

    step, crossed = jnp.float32(0.5), False
    for _ in range(20):
        g = jax.grad(loss)(step)
        step = step - 200.0 * g
        crossed |= float(step) < 0
        assert np.isfinite(float(step)) and np.isfinite(float(loss(step)))
    assert crossed, "the rate was meant to push the step across zero"
