"""A layer with quantized weights and inputs computes layer(q_a, q_w) * (s_a * s_w) + bias on
integers held in float32: exact, so independent of summation order (any processor, any XLA
vectorisation), and equal to an int64 NumPy convolution of the same integers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.quant.layers import QConv, QDense
from qkd_jax.quant.rules import LayerPrecision
from tests.quant.test_layers import KNOWN, _with_quant, np_conv, np_fake_quant

KEY = functools.partial(jax.random.key, impl="unsafe_rbg")
EPS32 = float(np.finfo(np.float32).eps)
W_BITS, A_BITS = 3, 3


def _np_scales(method, q, w_hat, a_signed):
    """(s_w, s_a) from the grids (float64): hat / s is an integer."""
    lw, la = 2**W_BITS - 1, 2**A_BITS - 1
    la_in = 2 ** (A_BITS - 1) - 1 if a_signed else la  # signed grids: 2^(b-1) - 1 positive steps
    s = {"interval": (1 / lw, 1 / la), "dorefa": (1 / lw, 1 / la_in),
         "pact": (1 / lw, q.get("a_alpha", 0) / la_in),
         "lsq": (q.get("w_step"), q.get("a_step")),
         "qkd": (q.get("w_interval", 0) / (2 ** (W_BITS - 1) - 1),
                 q.get("a_interval", 0) / ((2 ** (A_BITS - 1) - 1) if a_signed else la))}
    return s[method]


def _layer_and_vars(method, x, a_signed=False):
    lp = LayerPrecision(method=method, w_bits=W_BITS, a_bits=A_BITS, a_signed=a_signed,
                        output_scale=method == "interval")
    layer = QConv(5, (3, 3), padding=((1, 1), (1, 1)), rules=lp)
    v = layer.init(KEY(1), x)
    v = _with_quant(v, KNOWN[method])
    flat = dict(v["params"])
    flat["bias"] = jnp.asarray(np.random.default_rng(2).normal(size=5), jnp.float32)
    return layer, {**v, "params": flat}


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(KEY(0), (2, 5, 5, 16)) * 1.3 + 0.2


@pytest.mark.parametrize("method, a_signed", [(m, False) for m in sorted(KNOWN)] +
                         [("lsq", True), ("qkd", True), ("pact", True), ("dorefa", True)])
def test_quantized_conv_is_an_exact_integer_convolution(x, method, a_signed):
    layer, v = _layer_and_vars(method, x, a_signed)
    w = np.asarray(v["params"]["kernel"], np.float64)
    b = np.asarray(v["params"]["bias"], np.float64)
    w_hat, a_hat, out_scale = np_fake_quant(method, w, x, KNOWN[method], W_BITS, A_BITS, a_signed)
    s_w, s_a = _np_scales(method, KNOWN[method], w_hat, a_signed)
    q_w, q_a = np.rint(w_hat / s_w), np.rint(a_hat / s_a)
    assert np.abs(w_hat / s_w - q_w).max() < 1e-6 and np.abs(a_hat / s_a - q_a).max() < 1e-6  # on the grid
    acc = np_conv(q_a, q_w).astype(np.int64)  # exact: small integers in float64
    scale = np.float32(np.float32(s_a) * np.float32(s_w))
    want = (acc.astype(np.float32) * scale + b.astype(np.float32)).astype(np.float64) * out_scale
    got = np.asarray(jax.jit(layer.apply)(v, x), np.float64)
    # Exact integer sum; what remains is the float32 rounding of the scale product, bias add and
    # output scale (and the float32 scales vs their float64 values): a few ulps of each term.
    tol = 8 * EPS32 * (np.abs(acc) * float(scale) + np.abs(b) + 1e-30) * out_scale
    assert np.all(np.abs(got - want) <= tol), np.abs(got - want).max()


@pytest.mark.parametrize("method", sorted(KNOWN))
def test_summation_order_does_not_change_a_single_bit(x, method):
    """Permuting the input channels of x and of the kernel together permutes the terms of every
    sum: with exact integer sums the output is bit-identical (a float32 sum of non-integers is
    not, in general)."""
    layer, v = _layer_and_vars(method, x)
    perm = np.random.default_rng(5).permutation(x.shape[-1])
    v_perm = {**v, "params": {**v["params"], "kernel": v["params"]["kernel"][:, :, perm, :]}}
    f = jax.jit(layer.apply)
    np.testing.assert_array_equal(f(v, x), f(v_perm, x[..., perm]))


def test_dense_with_an_8bit_fan_in_beyond_2_24_still_matches_floats():
    """Exactness holds while fan_in * max|q_a| * max|q_w| <= 2^24; beyond it (here 300 * 255 * 255)
    the sum is a float32 rounding of the integer sum, within float32 accumulation error."""
    lp = LayerPrecision(method="lsq", w_bits=8, a_bits=8, a_signed=True)
    layer = QDense(4, rules=lp)
    xs = jax.random.normal(KEY(3), (3, 300))
    v = _with_quant(layer.init(KEY(4), xs), {"w_step": 0.0004, "a_step": 0.008})
    w = np.asarray(v["params"]["kernel"], np.float64)
    w_hat, a_hat, _ = np_fake_quant("lsq", w, xs, {"w_step": 0.0004, "a_step": 0.008}, 8, 8, True)
    want = a_hat @ w_hat + np.asarray(v["params"]["bias"])
    got = np.asarray(layer.apply(v, xs), np.float64)
    bound = 300 * EPS32 * (np.abs(a_hat) @ np.abs(w_hat)) + 4 * EPS32 * np.abs(want)  # gamma_n bound
    assert np.all(np.abs(got - want) <= bound + 1e-12)
