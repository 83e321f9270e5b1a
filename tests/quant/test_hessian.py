"""Hessian-vector products, Hutchinson traces and the EWGS delta (docs/method.md section 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax import quant
from tests.x64 import enable_x64

N = 6


def sym_matrix(seed=0, n=N):
    b = np.random.default_rng(seed).normal(size=(n, n))
    return ((b + b.T) / 2).astype(np.float32)


def quadratic(a):
    a = jnp.asarray(a)
    return lambda x: 0.5 * x @ a @ x


# ----------------------------------------------------------------------------- hutchinson


def test_hutchinson_trace_of_quadratic_form_within_statistical_tolerance():
    """For f = 0.5 x^T A x, H = A. One Rademacher probe gives v^T A v = Tr(A) + sum_{i!=j} A_ij v_i v_j,
    whose variance is 2 * sum_{i!=j} A_ij^2 (the products v_i v_j, i < j, are uncorrelated +-1).
    The mean of P probes has standard deviation sigma = sqrt(2 sum_{i!=j} A_ij^2 / P); the estimate
    must lie within 4 sigma (a 6e-5 two-sided chance for a fixed key, and the key is fixed)."""
    a = sym_matrix()
    probes = 2000
    est, n = quant.hutchinson_trace(quadratic(a), jnp.zeros(N), jax.random.key(0), max_probes=probes, rtol=0.0)
    off = a - np.diag(np.diag(a))
    sigma = np.sqrt(2 * np.sum(off**2) / probes)
    assert int(n) == probes  # rtol = 0 never stops early
    assert abs(float(est) - np.trace(a)) < 4 * sigma
    # the off-diagonal part matters: one probe is not the trace
    one, _ = quant.hutchinson_trace(quadratic(a), jnp.zeros(N), jax.random.key(0), max_probes=1)
    assert abs(float(one) - np.trace(a)) > 1e-3


def test_hutchinson_trace_diagonal_is_exact_and_stops_after_two_probes():
    """With a diagonal H every probe gives exactly Tr(H); the running mean does not move."""
    d = np.float32([1.5, -0.5, 2.0, 3.0, 0.25, 1.0])
    est, n = quant.hutchinson_trace(quadratic(np.diag(d)), jnp.ones(N), jax.random.key(3))
    np.testing.assert_allclose(float(est), d.sum(), rtol=1e-6)
    assert int(n) == 2


def test_hutchinson_trace_respects_max_probes():
    a = sym_matrix(1)
    _, n = quant.hutchinson_trace(quadratic(a), jnp.zeros(N), jax.random.key(1), max_probes=7, rtol=1e-9)
    assert 2 <= int(n) <= 7
    _, n = quant.hutchinson_trace(quadratic(a), jnp.zeros(N), jax.random.key(1))
    assert int(n) <= 50


def test_hutchinson_trace_under_jit_matches_eager():
    a = sym_matrix(2)
    fn = quadratic(a)
    key = jax.random.key(7)
    eager = quant.hutchinson_trace(fn, jnp.zeros(N), key, max_probes=40, rtol=0.0)
    jitted = jax.jit(lambda x, k: quant.hutchinson_trace(fn, x, k, max_probes=40, rtol=0.0))(jnp.zeros(N), key)
    np.testing.assert_allclose(float(jitted[0]), float(eager[0]), rtol=1e-6)
    assert int(jitted[1]) == int(eager[1]) == 40


@pytest.mark.parametrize("max_probes", [0, -3])
def test_hutchinson_trace_rejects_no_probes(max_probes):
    with pytest.raises(ValueError, match="max_probes"):
        quant.hutchinson_trace(quadratic(np.eye(2)), jnp.zeros(2), jax.random.key(0), max_probes=max_probes)


# ----------------------------------------------------------------------------- through a quantizer

LOWER, UPPER, BITS, DELTA = -1.0, 1.0, 2, 0.6
STEPS = 2**BITS - 1


def points_inside_cells(seed, dtype):
    """x whose x_n * (L - 1) lies 0.1 to 0.4 away from the nearest rounding boundary (and from the
    clip bounds), plus two points beyond the clip range. Within one rounding cell dL/dx is affine
    in x, so central differences of the gradient are exact up to round-off."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, STEPS, size=10)
    frac = rng.uniform(0.1, 0.4, size=10) * rng.choice([-1, 1], size=10) + 0.5
    u = np.clip(k + frac, 0.1, STEPS - 0.1)
    x_n = u / STEPS
    x = LOWER + x_n * (UPPER - LOWER)
    return np.concatenate([x, [LOWER - 0.5, UPPER + 0.5]]).astype(dtype)


def quantized_loss(c):
    c = jnp.asarray(c)
    return lambda x: jnp.sum(c * quant.interval_quantize(x, LOWER, UPPER, BITS, signed=True, delta=DELTA) ** 2)


def closed_form_hessian_diag(x, c):
    """Signed interval, L = sum c q^2: g = dL/dx_q = 2 * 2 c q (out = 2 x_q - 1), and inside the
    clip range dL/dx = (g + DELTA |g| (x_n - x_q)) / r with x_q constant in a cell, so
    H = diag(DELTA |g| / r^2) inside, 0 outside."""
    r = UPPER - LOWER
    z = (x - LOWER) / r
    inside = (z >= 0) & (z <= 1)
    q = 2 * np.round(np.clip(z, 0, 1) * STEPS) / STEPS - 1
    g = 4 * c * q
    return np.where(inside, DELTA * np.abs(g) / r**2, 0.0)


def test_hvp_through_quantizer_matches_finite_differences_float64():
    with enable_x64(True):
        x = points_inside_cells(0, np.float64)
        rng = np.random.default_rng(1)
        c = rng.uniform(0.5, 2.0, size=x.shape)
        v = rng.normal(size=x.shape)
        fn = quantized_loss(c)
        hv = np.asarray(quant.hvp(fn, jnp.asarray(x), jnp.asarray(v)))
        assert hv.dtype == np.float64
        grad = jax.grad(fn)
        eps = 1e-4  # moves u by at most eps * |v| * STEPS / r < 0.01 < the 0.1 margin
        fd = (np.asarray(grad(jnp.asarray(x + eps * v))) - np.asarray(grad(jnp.asarray(x - eps * v)))) / (2 * eps)
        np.testing.assert_allclose(hv, fd, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(hv, closed_form_hessian_diag(x, c) * v, rtol=1e-10, atol=1e-12)
        assert np.all(hv[:-2] != 0) and np.all(hv[-2:] == 0)


def test_hvp_through_quantizer_float32_and_ste_has_no_curvature():
    x = points_inside_cells(2, np.float32)
    c = np.random.default_rng(3).uniform(0.5, 2.0, size=x.shape).astype(np.float32)
    v = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
    hv = np.asarray(quant.hvp(quantized_loss(c), jnp.asarray(x), jnp.asarray(v)))
    np.testing.assert_allclose(hv, closed_form_hessian_diag(x, c) * v, rtol=1e-5, atol=1e-6)
    ste = lambda x: jnp.sum(jnp.asarray(c) * quant.interval_quantize(x, LOWER, UPPER, BITS, signed=True) ** 2)
    np.testing.assert_array_equal(np.asarray(quant.hvp(ste, jnp.asarray(x), jnp.asarray(v))), 0.0)


def test_hutchinson_trace_through_quantizer_is_exact_for_its_diagonal_hessian():
    x = points_inside_cells(5, np.float32)
    c = np.random.default_rng(6).uniform(0.5, 2.0, size=x.shape).astype(np.float32)
    est, n = quant.hutchinson_trace(quantized_loss(c), jnp.asarray(x), jax.random.key(2))
    np.testing.assert_allclose(float(est), closed_form_hessian_diag(x, c).sum(), rtol=1e-5)
    assert int(n) == 2


# ----------------------------------------------------------------------------- ewgs_delta


def np_ewgs_delta(traces, grads, eps=1e-8):
    """max(0, mean_k[(Tr(H_k) / N) / (3 std(g_k) + eps)]); std is the sample standard deviation
    sqrt(sum((g - mean g)^2) / (N - 1)) over the N elements of batch k (torch's .std())."""
    k = len(traces)
    flat = np.asarray(grads, np.float64).reshape(k, -1)
    n = flat.shape[1]
    std = np.sqrt(np.sum((flat - flat.mean(axis=1, keepdims=True)) ** 2, axis=1) / (n - 1))
    return max(0.0, float(np.mean((np.asarray(traces) / n) / (3 * std + eps))))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_ewgs_delta_matches_formula(k):
    rng = np.random.default_rng(k)
    traces = rng.uniform(0.5, 3.0, size=k).astype(np.float32)
    grads = (rng.normal(size=(k, 4, 5)) * rng.uniform(0.1, 2.0, size=(k, 1, 1))).astype(np.float32)
    out = float(quant.ewgs_delta(jnp.asarray(traces), jnp.asarray(grads)))
    np.testing.assert_allclose(out, np_ewgs_delta(traces, grads), rtol=1e-5)
    assert out > 0


def test_ewgs_delta_averages_ratios_not_traces():
    """mean_k of the per-batch ratio: batches with different gradient spreads weigh differently."""
    traces = np.float32([2.0, 2.0])
    grads = np.stack([np.float32([1, -1, 1, -1]), np.float32([4, -4, 4, -4])])
    s1, s4 = np.sqrt(4 / 3), 4 * np.sqrt(4 / 3)  # sample std (ddof=1) of the two batches
    expected = 0.5 * ((2 / 4) / (3 * s1 + 1e-8) + (2 / 4) / (3 * s4 + 1e-8))
    np.testing.assert_allclose(float(quant.ewgs_delta(traces, grads)), expected, rtol=1e-6)


def test_ewgs_delta_zero_gradient_gives_zero_not_nan():
    out = quant.ewgs_delta(jnp.zeros(2), jnp.zeros((2, 3, 3)))
    assert float(out) == 0.0
    big = quant.ewgs_delta(jnp.ones(2), jnp.zeros((2, 3, 3)))
    assert np.isfinite(float(big))


@pytest.mark.parametrize("traces", [[-1.0, -2.0], [1.0, -5.0]])
def test_ewgs_delta_negative_mean_is_clamped_to_zero(traces):
    grads = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    assert np_ewgs_delta(traces, grads) == 0.0  # the mean ratio is negative for both
    assert float(quant.ewgs_delta(jnp.float32(traces), jnp.asarray(grads))) == 0.0


def test_ewgs_delta_mixed_signs_keep_positive_mean():
    grads = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    traces = np.float32([5.0, -1.0])
    np.testing.assert_allclose(float(quant.ewgs_delta(traces, grads)), np_ewgs_delta(traces, grads), rtol=1e-5)


def test_ewgs_delta_scalar_trace_single_batch():
    grads = np.random.default_rng(2).normal(size=(1, 10)).astype(np.float32)
    np.testing.assert_allclose(float(quant.ewgs_delta(3.0, grads)), np_ewgs_delta([3.0], grads), rtol=1e-5)


@pytest.mark.parametrize("traces, grads_shape", [((3,), (2, 4)), ((2,), (3, 2, 2)), ((2,), ())])
def test_ewgs_delta_shape_mismatch_raises(traces, grads_shape):
    with pytest.raises(ValueError, match="leading batch axis"):
        quant.ewgs_delta(jnp.ones(traces), jnp.ones(grads_shape))


# ----------------------------------------------------------------------------- per-layer probes

SIZES = (3, 4)  # two "layers" a (3 elements) and b (4 elements)


def coupled_matrix(seed=5):
    """Symmetric 7x7 A with diagonal diagonal blocks and dense cross-layer blocks."""
    rng = np.random.default_rng(seed)
    a = np.zeros((7, 7))
    a[np.arange(7), np.arange(7)] = rng.normal(size=7)
    cross = rng.normal(size=SIZES)
    a[:3, 3:], a[3:, :3] = cross, cross.T
    return a.astype(np.float32)


def two_layer_quadratic(a):
    a = jnp.asarray(a)
    return lambda t: 0.5 * jnp.concatenate([t["a"], t["b"]]) @ a @ jnp.concatenate([t["a"], t["b"]])


def zeros_tree():
    return {"a": jnp.zeros(SIZES[0]), "b": jnp.zeros(SIZES[1])}


def test_per_layer_probe_has_no_cross_layer_terms():
    """f = 0.5 z^T A z, z = (a, b), with diagonal blocks A_aa, A_bb: a per-layer probe gives
    v_a^T A_aa v_a = Tr(A_aa) exactly (so it stops after two probes), whereas one joint probe adds
    2 v_a^T A_ab v_b, which is not zero."""
    a = coupled_matrix()
    fn = two_layer_quadratic(a)
    traces, counts = quant.hutchinson_traces_per_leaf(fn, zeros_tree(), jax.random.key(0))
    np.testing.assert_allclose(float(traces["a"]), np.trace(a[:3, :3]), rtol=1e-6)
    np.testing.assert_allclose(float(traces["b"]), np.trace(a[3:, 3:]), rtol=1e-6)
    assert int(counts["a"]) == int(counts["b"]) == 2
    joint, _ = quant.hutchinson_traces(fn, zeros_tree(), jax.random.key(0), max_probes=1)
    assert abs(float(joint["a"]) - np.trace(a[:3, :3])) > 1e-3


def _block_sigmas(h, probes, cross: bool):
    """Std of the mean of `probes` Hutchinson probes for each block of the Hessian h. Per-layer: one
    probe v_l . H_ll v_l has variance 2 sum_{i != j in l} H_ij^2. Joint: v_l . (H v)_l has variance
    2 sum_{i != j in l} H_ij^2 + sum_{i in l, j not in l} H_ij^2, bounded by 2 sum_{i in l, j != i} H_ij^2
    (all columns), used here."""
    out, lo = [], 0
    for n in SIZES:
        rows = h[lo:lo + n]
        cols = rows if cross else rows[:, lo:lo + n]
        off = np.sum(cols**2) - np.sum(np.diag(h)[lo:lo + n] ** 2)
        out.append(np.sqrt(2.0 * off / probes))
        lo += n
    return out


def cubic(t):
    """A cubic with cross-layer coupling; its Hessian is computed by jax.hessian as the reference."""
    a, b = t["a"], t["b"]
    return jnp.sum(a**3) / 3 + 0.5 * jnp.dot(a, a) * jnp.sum(b) + jnp.sum(b[:-1] * b[1:] * a[0]) + jnp.sum(b**3) / 6


@pytest.mark.parametrize("probe", ["per_layer", "joint"])
def test_per_layer_and_joint_agree_in_expectation_on_a_coupled_cubic(probe):
    """Both estimators are unbiased for Tr(H_aa) and Tr(H_bb): each lies within 4 of its own standard
    deviations of the exact block traces (dense Hessian on 7 inputs, float64 NumPy)."""
    point = {"a": jnp.asarray([0.7, -1.2, 0.4]), "b": jnp.asarray([1.1, -0.3, 0.9, -1.5])}
    flat = jnp.concatenate([point["a"], point["b"]])
    h = np.asarray(jax.hessian(lambda z: cubic({"a": z[:3], "b": z[3:]}))(flat), np.float64)
    assert np.abs(h[:3, 3:]).max() > 0.5  # the layers are coupled
    probes = 3000
    traces, _ = quant.HESSIAN_PROBES[probe](cubic, point, jax.random.key(11), max_probes=probes, rtol=0.0)
    sig = _block_sigmas(h, probes, cross=probe == "joint")
    assert abs(float(traces["a"]) - np.trace(h[:3, :3])) < 4 * sig[0] + 1e-4
    assert abs(float(traces["b"]) - np.trace(h[3:, 3:])) < 4 * sig[1] + 1e-4


def test_per_layer_quadratic_within_statistical_tolerance_and_counts():
    """Dense blocks (the diagonal-block test above has zero variance): within 4 sigma, and rtol = 0
    spends max_probes on every leaf."""
    a = sym_matrix(9, n=7)
    probes = 2000
    traces, counts = jax.jit(lambda t, k: quant.hutchinson_traces_per_leaf(
        two_layer_quadratic(a), t, k, max_probes=probes, rtol=0.0))(zeros_tree(), jax.random.key(4))
    sig = _block_sigmas(a.astype(np.float64), probes, cross=False)
    assert abs(float(traces["a"]) - np.trace(a[:3, :3])) < 4 * sig[0]
    assert abs(float(traces["b"]) - np.trace(a[3:, 3:])) < 4 * sig[1]
    assert int(counts["a"]) == int(counts["b"]) == probes


def test_per_layer_rejects_no_probes():
    with pytest.raises(ValueError, match="max_probes"):
        quant.hutchinson_traces_per_leaf(two_layer_quadratic(coupled_matrix()), zeros_tree(), jax.random.key(0),
                                         max_probes=0)
