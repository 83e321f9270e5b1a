"""The released SQAKD Tiny-ImageNet (MQBench) quantizers against independent references.

References: a NumPy re-implementation of torch's per-tensor affine fake quantization written
from the PyTorch kernel (forward `(clamp(nearbyint(x * (1/s)), qmin, qmax)) * s`, gradient mask
on the rounded value), of `torch._fake_quantize_learnable_per_tensor_affine`'s scale gradient,
and of MQBench's dorefa.py / pact.py / LSQObserver; and torch itself where installed.

Tolerances: outputs are s * (an integer) with |integer| <= 128, computed as one float32
multiply on both sides, compared exactly on codes and to 1 float32 ulp on values. The x-gradient
is s * (1/s), within 1 ulp of 1 (rtol 2^-23). Scale gradients are float32 sums of up to a few
thousand terms in different orders: within 1e-5 of the sum of the terms' magnitudes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.quant import released_quantizers as rq
from qkd_jax.quant.methods import get_method
from qkd_jax.quant.precision import LayerPrecision

EPS32 = float(np.finfo(np.float32).eps)


def np_fake_quant(x: np.ndarray, scale: np.float32, bits: int):
    """(output, codes, x-gradient mask) of torch.fake_quantize_per_tensor_affine(x, s, 0, qmin, qmax)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    inv = np.float32(1.0) / np.float32(scale)
    r = np.rint(x.astype(np.float32) * inv)  # nearbyint: half to even
    mask = (r >= qmin) & (r <= qmax)
    q = np.clip(r, qmin, qmax)
    return (q * np.float32(scale)).astype(np.float32), q, mask.astype(np.float32)


def np_learnable_scale_grad(x, scale, bits, g):
    """d/ds of torch._fake_quantize_learnable_per_tensor_affine (zero point 0), grad_factor
    1 / sqrt(numel * qmax): round(u) - u inside, qmin / qmax outside."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    u = x.astype(np.float64) / scale
    r = np.rint(x.astype(np.float32) * (np.float32(1) / np.float32(scale))).astype(np.float64)
    inside = (r >= qmin) & (r <= qmax)
    per = np.where(inside, r - u, np.where(r < qmin, qmin, qmax)) * g / math.sqrt(x.size * qmax)
    return float(per.sum()), float(np.abs(per).sum())


def assert_sum_close(got: float, want: tuple[float, float]) -> None:
    """A float32 sum of n terms t_i is within ~log2(n) eps sum|t_i| of the exact one (pairwise
    summation; plain accumulation n eps): 1e-5 sum|t_i| covers n up to a few thousand."""
    value, magnitude = want
    assert abs(got - value) <= 1e-5 * magnitude, (got, value, magnitude)


def _away_from_ties(x, scale):
    u = np.asarray(x, np.float64) / float(scale)
    return np.abs(np.abs(u - np.floor(u)) - 0.5) > 1e-3


def _data(seed, n=2000, spread=8.0):
    return np.random.default_rng(seed).normal(0, spread, n).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_forward_and_mask(bits):
    scale = rq.pact_scale(bits)
    x = _data(bits)
    x = x[_away_from_ties(x, scale)]
    want, _, mask = np_fake_quant(x, scale, bits)
    got = np.asarray(rq.fake_quantize_signed(x, scale, bits))
    np.testing.assert_allclose(got, want, rtol=EPS32, atol=0)
    grad = np.asarray(jax.grad(lambda v: rq.fake_quantize_signed(v, scale, bits).sum())(jnp.asarray(x)))
    np.testing.assert_allclose(grad, mask, rtol=2 * EPS32, atol=0)
    assert 0 < mask.sum() < mask.size  # both sides of the range are exercised


def test_pact_scale_is_alpha_over_half_range():
    # MQBench: alpha / ((qmax - qmin) / 2); 0.8 at 4 bits (range [-6.4, 5.6]).
    assert rq.pact_scale(4) == np.float32(6.0) / np.float32(7.5)
    assert abs(float(rq.pact_scale(3)) - 12 / 7) < 1e-6
    x = np.array([-100.0, -6.4, -6.0, 5.6, 5.9, 6.0, 100.0], np.float32)
    np.testing.assert_allclose(np.asarray(rq.pact_signed(x, 4)), [-6.4, -6.4, -6.4, 5.6, 5.6, 5.6, 5.6], rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dorefa_signed_against_numpy(bits):
    x = _data(10 + bits, 600, 1.5)
    t = np.tanh(x.astype(np.float64))
    xn = (t / (np.abs(t).max() + 1e-5)).astype(np.float32)
    scale = np.float32(1.0) / np.float32((2**bits - 1) / 2)
    keep = _away_from_ties(xn, scale)
    want, _, _ = np_fake_quant(xn, scale, bits)
    got = np.asarray(rq.dorefa_signed(x, bits))
    np.testing.assert_allclose(got[keep], want[keep], rtol=EPS32, atol=0)
    # |X| < 1 puts u = X / s strictly inside (-(2^b - 1) / 2, (2^b - 1) / 2): the codes used are
    # -(2^(b-1) - 1) .. 2^(b-1) - 1 (code -2^(b-1) is never reached), the top one (2^(b-1) - 1) s < 1.
    top = (2 ** (bits - 1) - 1) * float(scale)
    assert got.max() == pytest.approx(top, rel=1e-6) and got.min() == pytest.approx(-top, rel=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_signed_forward_and_gradients_against_numpy(bits):
    x = _data(20 + bits, 1500, 2.0)
    step = np.float32(2 * np.abs(x).mean() / math.sqrt(2 ** (bits - 1) - 1))
    x = x[_away_from_ties(x, step)]
    g = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)
    want, _, mask = np_fake_quant(x, step, bits)

    def loss(v, s):
        return jnp.sum(rq.lsq_signed(v, s, bits) * g)

    got = np.asarray(rq.lsq_signed(x, step, bits))
    np.testing.assert_allclose(got, want, rtol=EPS32, atol=0)
    gx, gs = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.float32(step))
    np.testing.assert_allclose(np.asarray(gx), mask * g, rtol=2 * EPS32, atol=0)
    assert_sum_close(float(gs), np_learnable_scale_grad(x, step, bits, g))


def test_lsq_signed_negative_step_is_used_by_magnitude():
    """A static negative step is refused; a traced one is used as max(|s|, eps) (MQBench's abs_ / clamp_)."""
    x = _data(3, 100)
    with pytest.raises(ValueError):
        rq.lsq_signed(x, -0.5, 4)
    got = jax.jit(lambda s: rq.lsq_signed(x, s, 4))(jnp.float32(-0.5))
    np.testing.assert_allclose(np.asarray(got), np.asarray(rq.lsq_signed(x, 0.5, 4)), rtol=EPS32)


def test_full_range_transforms():
    x = np.array([[-9.0, -6.0, 0.3, 5.0, 7.0]], np.float32)
    np.testing.assert_allclose(np.asarray(rq.pact_clip(x)), [[-6.0, -6.0, 0.3, 5.0, 6.0]])
    g = np.asarray(jax.grad(lambda v: rq.pact_clip(v).sum())(jnp.asarray(x)))
    np.testing.assert_array_equal(g, [[0, 1, 1, 1, 0]])
    t = np.tanh(x.astype(np.float64))
    np.testing.assert_allclose(np.asarray(rq.dorefa_normalize(x)), t / (np.abs(t).max() + 1e-5), rtol=1e-6)


# ------------------------------------------------------------------------ against torch itself


def _torch():
    import torch  # the test extras install it (no skip: a missing torch fails)

    return torch


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_against_torch_fake_quantize(bits):
    torch = _torch()
    x = _data(30 + bits, 3000, 5.0)
    g = np.random.default_rng(31).normal(size=x.shape).astype(np.float32)
    for scale, fn in ((rq.pact_scale(bits), lambda v: rq.pact_signed(v, bits)),
                      (rq.dorefa_scale(bits), lambda v: rq.fake_quantize_signed(v, rq.dorefa_scale(bits), bits))):
        xt = torch.tensor(x, requires_grad=True)
        yt = torch.fake_quantize_per_tensor_affine(xt, float(scale), 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        (yt * torch.tensor(g)).sum().backward()
        y, vjp = jax.vjp(fn, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=EPS32, atol=0)
        np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), xt.grad.numpy(), rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_against_torch_learnable_fake_quantize(bits):
    torch = _torch()
    x = _data(40 + bits, 2000, 3.0)
    g = np.random.default_rng(41).normal(size=x.shape).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    step = np.float32(2 * np.abs(x).mean() / math.sqrt(qmax))  # MQBench LSQObserver
    xt = torch.tensor(x, requires_grad=True)
    st = torch.tensor([float(step)], requires_grad=True)
    zt = torch.tensor([0.0], requires_grad=True)
    yt = torch._fake_quantize_learnable_per_tensor_affine(xt, st, zt, -(2 ** (bits - 1)), qmax,
                                                         1.0 / math.sqrt(x.size * qmax))
    (yt * torch.tensor(g)).sum().backward()
    y, vjp = jax.vjp(lambda v, s: rq.lsq_signed(v, s, bits), jnp.asarray(x), jnp.float32(step))
    gx, gs = vjp(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=EPS32, atol=0)
    np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy(), rtol=2 * EPS32, atol=0)
    assert_sum_close(float(gs), (float(st.grad[0]), np_learnable_scale_grad(x, step, bits, g)[1]))


def test_against_torch_dorefa_module_formula():
    """MQBench dorefa.py: X = tanh(X); X = X.div(X.abs().max() + 1e-5); fake quantize; gradients
    flow through tanh and the max."""
    torch = _torch()
    bits = 4
    x = _data(50, 500, 1.0)
    g = np.random.default_rng(51).normal(size=x.shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    t = torch.tanh(xt)
    t = t.div(t.abs().max() + 1e-5)
    yt = torch.fake_quantize_per_tensor_affine(t, float(rq.dorefa_scale(bits)), 0, -8, 7)
    (yt * torch.tensor(g)).sum().backward()
    y, vjp = jax.vjp(lambda v: rq.dorefa_signed(v, bits), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=EPS32, atol=0)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), xt.grad.numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- the records


@pytest.mark.parametrize("name", ["pact_released", "lsq_released", "dorefa_released"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_records_outputs_are_scale_times_grid_integers(name, bits):
    """w_hat = s_w q and a_hat = s_a q with q in [-2^(b-1), 2^(b-1) - 1]: the integer grids."""
    m = get_method(name)
    lp = LayerPrecision(method=name, w_bits=bits, a_bits=bits)
    w = _data(60, 300, 0.2)
    x = _data(61, 300, 2.0)
    q = {**m.calibrate_weight(lp, jnp.asarray(w)), **m.calibrate_input(lp, jnp.asarray(x))}
    for side, v, quantize, scale, grid in (
            ("w", w, m.quantize_weight, m.weight_scale(lp, q, None), m.weight_grid(bits)),
            ("a", x, m.quantize_input, m.input_scale(lp, q), m.input_grid(bits, False))):
        out = np.asarray(quantize(lp, jnp.asarray(v), q), np.float64)
        ints = out / float(scale)
        np.testing.assert_allclose(ints, np.rint(ints), atol=1e-4)
        levels, multiplier, zero_point = grid
        assert (levels, multiplier, zero_point) == (2**bits, 1, 2 ** (bits - 1))
        assert np.rint(ints).min() >= -zero_point and np.rint(ints).max() <= levels - 1 - zero_point


def test_record_calibration_closed_forms():
    """LSQ: 2 mean|x| / sqrt(2^(b-1) - 1) on weights and inputs; PACT / DoReFa: no parameters."""
    lp = LayerPrecision(method="lsq_released", w_bits=4, a_bits=3)
    w, x = _data(70, 100, 0.1), np.abs(_data(71, 100))
    m = get_method("lsq_released")
    assert float(m.calibrate_weight(lp, jnp.asarray(w))["w_released_step"]) == pytest.approx(
        2 * np.abs(w).mean() / math.sqrt(7), rel=1e-6)
    assert float(m.calibrate_input(lp, jnp.asarray(x))["a_released_step"]) == pytest.approx(
        2 * np.abs(x).mean() / math.sqrt(3), rel=1e-6)
    for name in ("pact_released", "dorefa_released"):
        r = get_method(name)
        assert r.weight_params == {} and r.input_params == {}


def test_records_refuse_one_bit_and_full_range_lsq():
    for name in ("pact_released", "lsq_released", "dorefa_released"):
        with pytest.raises(ValueError, match="2..8 bits"):
            get_method(name).weight_grid(1)
    lp = LayerPrecision(method="lsq_released", w_bits=32, a_bits=32, full_range=True)
    with pytest.raises(ValueError, match="no full-range"):
        get_method("lsq_released").quantize_weight(lp, jnp.ones(3), {"w_released_step": 1.0})


def test_full_range_records_apply_only_the_transforms():
    w = _data(80, 50, 0.3)
    x = _data(81, 50, 5.0)
    tw = np.tanh(w.astype(np.float64))
    tx = np.tanh(x.astype(np.float64))
    for name, want_x in (("pact_released", np.clip(x, -6, 6)),
                         ("dorefa_released", tx / (np.abs(tx).max() + 1e-5))):
        lp = LayerPrecision(method=name, w_bits=32, a_bits=32, full_range=True)
        m = get_method(name)
        np.testing.assert_allclose(np.asarray(m.quantize_weight(lp, jnp.asarray(w), {})),
                                   tw / (np.abs(tw).max() + 1e-5), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(m.quantize_input(lp, jnp.asarray(x), {})), want_x, rtol=1e-6)
