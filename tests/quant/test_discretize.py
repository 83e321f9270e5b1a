"""Tests of the unified discretizer (docs/method.md section 1) and round_ste.

Every expected value is written here with NumPy from the formulas:

    forward : x_q = round(x_n * (L - 1)) / (L - 1)       (round half to even)
    backward: dL/dx_n = g * (1 + delta * sign(g) * (x_n - x_q)),  no gradient to delta

The NumPy forward mirrors the float32 arithmetic (one multiply, one round, one divide), so
ties that are exact in float32 are exact in both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.quant import discretize, levels_for_bits, round_ste

LEVELS = [2, 3, 4, 16, 256]


def np_discretize(x_n, levels):
    steps = np.float32(levels - 1)
    return (np.round(np.asarray(x_n, np.float32) * steps) / steps).astype(np.float32)


def np_ewgs(g, x_n, x_q, delta):
    return g * (1.0 + delta * np.sign(g) * (x_n - x_q))


def exact_ties(levels):
    """x_n = (k + 0.5) / (L - 1) for every k whose float32 product x_n * (L - 1) is exactly k + 0.5."""
    steps = levels - 1
    k = np.arange(steps)
    x_n = ((k + 0.5) / steps).astype(np.float32)
    exact = x_n * np.float32(steps) == (k + 0.5)
    return x_n[exact], k[exact]


def inputs(levels, seed=0):
    rng = np.random.default_rng(seed + levels)
    ties, _ = exact_ties(levels)
    grid = (np.arange(levels) / (levels - 1)).astype(np.float32)  # on-grid points, x_n = x_q
    x = np.concatenate([rng.uniform(0.0, 1.0, 40).astype(np.float32), ties[:20], grid[:10],
                        np.float32([0.0, 1.0])])
    return x


@pytest.mark.parametrize("levels", LEVELS)
def test_ties_exist_in_test_data(levels):
    """Guards the tie tests below: x_n = 0.5 / (L - 1) (k = 0) is an exact float32 tie."""
    ties, k = exact_ties(levels)
    assert 0 in k and len(ties) >= 1


@pytest.mark.parametrize("levels", LEVELS)
def test_forward_matches_closed_form(levels):
    x = inputs(levels)
    out = np.asarray(discretize(jnp.asarray(x), levels, 0.0))
    assert out.dtype == np.float32
    # the grid index must match exactly; the value up to the last bit of the final division
    index = np.round(np.asarray(x, np.float32) * np.float32(levels - 1))
    np.testing.assert_array_equal(np.round(out.astype(np.float64) * (levels - 1)), index)
    np.testing.assert_allclose(out, np_discretize(x, levels), rtol=0, atol=1.2e-7)


@pytest.mark.parametrize("levels", LEVELS)
def test_exact_ties_round_half_to_even(levels):
    """On x_n = (k + 0.5)/(L - 1) the index is k when k is even and k + 1 when k is odd."""
    ties, k = exact_ties(levels)
    out = np.asarray(discretize(jnp.asarray(ties), levels))
    expected_index = np.where(k % 2 == 0, k, k + 1)
    np.testing.assert_allclose(out * (levels - 1), expected_index, atol=1e-4)
    if levels == 2:
        # the single tie x_n = 0.5 goes down to 0 (away-from-zero rounding would give 1)
        assert out[0] == 0.0


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("delta", [0.0, 0.3, 1.7])
def test_backward_ewgs_formula(levels, delta):
    rng = np.random.default_rng(levels)
    x = inputs(levels)
    g = rng.normal(size=x.shape).astype(np.float32)
    g[:3] = 0.0  # sign(0) = 0: a zero cotangent stays zero
    out, vjp = jax.vjp(lambda v: discretize(v, levels, delta), jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    x_q = np_discretize(x, levels)
    np.testing.assert_allclose(np.asarray(out), x_q, rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(np.asarray(dx), np_ewgs(g, x, x_q, delta), rtol=1e-6, atol=1e-7)
    if delta == 0.0:
        np.testing.assert_array_equal(np.asarray(dx), g)  # STE: the gradient passes unchanged


@pytest.mark.parametrize("levels", [2, 4])
def test_backward_on_ties_uses_rounding_direction(levels):
    """At a tie |x_n - x_q| = 0.5/(L-1); its sign follows the half-to-even direction."""
    ties, k = exact_ties(levels)
    g = np.ones_like(ties)
    delta = 1.0
    (dx,) = jax.vjp(lambda v: discretize(v, levels, delta), jnp.asarray(ties))[1](jnp.asarray(g))
    err = np.where(k % 2 == 0, 0.5, -0.5) / (levels - 1)  # rounded down: x_n - x_q > 0
    np.testing.assert_allclose(np.asarray(dx), 1.0 + delta * err, rtol=1e-6)


def test_ewgs_scales_up_when_signs_agree():
    """x_n above x_q with a positive gradient: factor > 1; with a negative gradient: |factor| < 1."""
    x = jnp.float32([0.4])  # L=2: x_q = 0, x_n - x_q = 0.4
    (up,) = jax.vjp(lambda v: discretize(v, 2, 0.5), x)[1](jnp.float32([1.0]))
    (down,) = jax.vjp(lambda v: discretize(v, 2, 0.5), x)[1](jnp.float32([-1.0]))
    np.testing.assert_allclose(np.asarray(up), [1.2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(down), [-0.8], rtol=1e-6)


@pytest.mark.parametrize("delta", [0.0, 0.7])
def test_no_gradient_to_delta(delta):
    x = jnp.asarray(inputs(4))
    g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape).astype(np.float32))
    d_delta = jax.grad(lambda d: jnp.vdot(g, discretize(x, 4, d)))(jnp.float32(delta))
    assert float(d_delta) == 0.0


@pytest.mark.parametrize("delta", [0.3, 2.0])
def test_delta_changes_only_the_gradient(delta):
    x = jnp.asarray(inputs(8))
    np.testing.assert_array_equal(np.asarray(discretize(x, 8, delta)), np.asarray(discretize(x, 8, 0.0)))


def test_per_element_delta_broadcasts():
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(5, 3)).astype(np.float32)
    g = rng.normal(size=(5, 3)).astype(np.float32)
    delta = np.float32([0.0, 0.5, 2.0])
    (dx,) = jax.vjp(lambda v: discretize(v, 4, jnp.asarray(delta)), jnp.asarray(x))[1](jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(dx), np_ewgs(g, x, np_discretize(x, 4), delta), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(4, 1, 2), (2, 4, 3), (2,)])
def test_delta_shape_that_does_not_broadcast_raises(shape):
    """delta may not change the shape of x_n (incompatible, or broadcasting x_n up)."""
    with pytest.raises(ValueError, match="delta of shape"):
        discretize(jnp.zeros((4, 3)), 4, jnp.zeros(shape))


@pytest.mark.parametrize("levels", [1, 0, 2.0, True, None])
def test_invalid_levels_raise(levels):
    with pytest.raises(ValueError, match="levels"):
        discretize(jnp.zeros(3), levels)


def test_integer_input_is_promoted_to_float():
    out = discretize(jnp.asarray([0, 1]), 4)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), [0.0, 1.0])


@pytest.mark.parametrize("bits", range(1, 9))
def test_levels_for_bits(bits):
    assert levels_for_bits(bits) == 2**bits


def test_round_ste_forward_and_gradient():
    x = np.float32([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 0.51, -3.7, 4.2])
    out = np.asarray(round_ste(jnp.asarray(x)))
    np.testing.assert_array_equal(out, [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 0.0, 1.0, -4.0, 4.0])
    g = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    (dx,) = jax.vjp(round_ste, jnp.asarray(x))[1](jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(dx), g)
