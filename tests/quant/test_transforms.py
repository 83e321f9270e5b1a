"""Every quantizer under jit, vmap, grad, pmap (8 virtual CPU devices) and reverse-over-reverse.

The reference for each transformed computation is the same computation done eagerly, one
example (or one device shard) at a time, with jax.vjp; the transformed ones use jax.grad.
Inputs are random (no exact ties), so values that sit within an ulp of a rounding boundary do
not occur and compiled code may fuse operations freely.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax import quant
from tests.x64 import enable_x64

BITS, DELTA = 3, 0.4
SHAPE = (6, 4)
N_DEV = 8


def _lsq_span(signed):
    q_n, q_p = quant.lsq_bounds(BITS, signed)
    return q_n, q_n + q_p


# name -> (quantizer(x, params, bits, delta), per-tensor params, to_x(x_n, params))
CASES = {
    "interval_signed": (
        lambda x, p, b, d: quant.interval_quantize(x, p["lower"], p["upper"], b, signed=True, delta=d),
        {"lower": -0.7, "upper": 0.9}, lambda u, p: p["lower"] + u * (p["upper"] - p["lower"])),
    "interval_unsigned": (
        lambda x, p, b, d: quant.interval_quantize(x, p["lower"], p["upper"], b, signed=False, delta=d),
        {"lower": -0.2, "upper": 1.3}, lambda u, p: p["lower"] + u * (p["upper"] - p["lower"])),
    "pact": (
        lambda x, p, b, d: quant.pact(x, p["alpha"], b, delta=d),
        {"alpha": 1.7}, lambda u, p: u * p["alpha"]),
    "lsq_signed": (
        lambda x, p, b, d: quant.lsq(x, p["step"], b, signed=True, delta=d),
        {"step": 0.3}, lambda u, p: (u * _lsq_span(True)[1] - _lsq_span(True)[0]) * p["step"]),
    "lsq_unsigned": (
        lambda x, p, b, d: quant.lsq(x, p["step"], b, signed=False, delta=d),
        {"step": 0.3}, lambda u, p: u * _lsq_span(False)[1] * p["step"]),
    "dorefa_weight": (lambda x, p, b, d: quant.dorefa_weight(x, b, delta=d), {}, None),
    "dorefa_activation": (lambda x, p, b, d: quant.dorefa_activation(x, b, delta=d), {}, lambda u, p: u),
    "qkd_signed": (
        lambda x, p, b, d: quant.qkd_interval(x, p["interval"], b, signed=True, delta=d),
        {"interval": 1.1}, lambda u, p: (2 * u - 1) * p["interval"]),
    "qkd_unsigned": (
        lambda x, p, b, d: quant.qkd_interval(x, p["interval"], b, signed=False, delta=d),
        {"interval": 1.1}, lambda u, p: u * p["interval"]),
}
NAMES = list(CASES)


def params_of(name, batch=None):
    """float32 params; with `batch`, one slightly different set per example / device."""
    base = CASES[name][1]
    if batch is None:
        return {k: jnp.float32(v) for k, v in base.items()}
    factor = 1.0 + 0.05 * np.arange(batch)
    return {k: jnp.asarray(v * factor, jnp.float32) for k, v in base.items()}


def random_x(name, shape, seed=0):
    rng = np.random.default_rng(seed)
    to_x = CASES[name][2]
    if to_x is None:
        return jnp.asarray(rng.normal(scale=0.8, size=shape), jnp.float32)
    return jnp.asarray(to_x(rng.uniform(-0.3, 1.3, size=shape), CASES[name][1]), jnp.float32)


def cotangent(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def value_and_grads(name, x, p, g):
    """(out, (dL/dx, dL/dparams)) for L = sum(g * quantizer(x, p)), via jax.grad."""
    quantize = CASES[name][0]
    loss = lambda x, p: (jnp.vdot(g, quantize(x, p, BITS, DELTA)), quantize(x, p, BITS, DELTA))
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, p)
    return out, grads


def eager_vjp(name, x, p, g):
    """The eager reference: jax.vjp of the plain function."""
    out, vjp = jax.vjp(lambda x, p: CASES[name][0](x, p, BITS, DELTA), x, p)
    return out, vjp(g)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def per_example(name, xs, ps, gs, batched_params):
    outs = []
    for i in range(xs.shape[0]):
        p = jax.tree.map(lambda a: a[i], ps) if batched_params else ps
        outs.append(eager_vjp(name, xs[i], p, gs[i]))
    return jax.tree.map(lambda *a: jnp.stack(a), *outs)


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_grad_match_eager(name):
    x, p, g = random_x(name, SHAPE), params_of(name), cotangent(SHAPE)
    eager = eager_vjp(name, x, p, g)
    assert_trees_close(value_and_grads(name, x, p, g), eager)  # jax.grad, eager
    assert_trees_close(jax.jit(functools.partial(value_and_grads, name))(x, p, g), eager)


@pytest.mark.parametrize("batched_params", [False, True], ids=["shared_params", "per_example_params"])
@pytest.mark.parametrize("name", NAMES)
def test_vmap_matches_per_example_eager(name, batched_params):
    """vmap over a batch of x (parameters shared, or one set per example). Per example means the
    quantizer sees one example: LSQ's N and DoReFa's max|tanh w| are per example."""
    b = 3
    xs, gs = random_x(name, (b,) + SHAPE, seed=2), cotangent((b,) + SHAPE, seed=3)
    ps = params_of(name, b) if batched_params else params_of(name)
    mapped = jax.vmap(functools.partial(value_and_grads, name), in_axes=(0, 0 if batched_params else None, 0))
    assert_trees_close(mapped(xs, ps, gs), per_example(name, xs, ps, gs, batched_params))


@pytest.mark.parametrize("name", NAMES)
def test_pmap_over_eight_devices_matches_eager(name):
    assert jax.local_device_count() == N_DEV
    xs, gs = random_x(name, (N_DEV,) + SHAPE, seed=4), cotangent((N_DEV,) + SHAPE, seed=5)
    ps = params_of(name, N_DEV)
    out = jax.pmap(functools.partial(value_and_grads, name))(xs, ps, gs)
    assert_trees_close(out, per_example(name, xs, ps, gs, batched_params=True))


# ----------------------------------------------------------------------------- reverse-over-reverse


def cell_interior_x(name, seed):
    """x whose grid coordinate x_n * (L - 1) stays >= 0.1 from every rounding boundary and clip
    bound (float64), so a central difference of the gradient with a tiny step is valid."""
    rng = np.random.default_rng(seed)
    p = CASES[name][1]
    if name == "dorefa_weight":
        steps = 2**BITS - 1
        w = rng.normal(scale=0.8, size=SHAPE)
        w.flat[0] = 3.0  # unique max |w|
        for _ in range(100):
            t = np.tanh(w)
            u = (t / (2 * np.abs(t).max()) + 0.5) * steps
            bad = np.abs(u - np.round(u)) < 0.1
            bad.flat[0] = False
            if not bad.any():
                return w
            w[bad] = rng.normal(scale=0.8, size=bad.sum())
        raise AssertionError("could not draw weights away from the rounding boundaries")
    if name.startswith("lsq"):
        q_n, span = _lsq_span(name == "lsq_signed")
        steps = span
    elif name == "qkd_signed":
        steps = quant.qkd_levels(BITS, True) - 1
    else:
        steps = 2**BITS - 1
    k = rng.integers(0, steps, size=SHAPE)
    u = k + 0.5 + rng.uniform(0.1, 0.4, size=SHAPE) * rng.choice([-1, 1], size=SHAPE)
    return CASES[name][2](u / steps, p)


@pytest.mark.parametrize("name", NAMES)
def test_double_reverse_runs_and_matches_finite_differences(name):
    """H v = grad_x <grad_x L, v> (reverse over reverse through the custom_vjp) against the
    central difference of grad_x L along v, in float64, for L = sum(c * q^2 + g * q) with EWGS
    (delta > 0, so dL/dx depends on x inside a rounding cell). The x-block of this surrogate
    Jacobian is symmetric (elementwise, or J^T D J + sum h_j Hess(x_n_j) for DoReFa weights),
    so J^T v = J v. The parameter block of the double reverse must exist and be finite."""
    with enable_x64(True):
        quantize = CASES[name][0]
        rng = np.random.default_rng(11)
        x = jnp.asarray(cell_interior_x(name, 12))
        p = {k: jnp.float64(v) for k, v in CASES[name][1].items()}
        c, g, v = (jnp.asarray(rng.normal(size=SHAPE)) for _ in range(3))

        def loss(x, p):
            q = quantize(x, p, BITS, DELTA)
            return jnp.sum(c * q**2 + g * q)

        grad_x = jax.grad(loss)
        hv_x, hv_p = jax.grad(lambda x, p: jnp.vdot(grad_x(x, p), v), argnums=(0, 1))(x, p)
        assert hv_x.dtype == jnp.float64
        eps = 1e-6
        fd = (grad_x(x + eps * v, p) - grad_x(x - eps * v, p)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(hv_x), np.asarray(fd), rtol=1e-6, atol=1e-6)
        assert np.abs(np.asarray(hv_x)).max() > 0  # EWGS curvature is there
        assert all(np.isfinite(float(a)) for a in jax.tree.leaves(hv_p))


@pytest.mark.parametrize("name", NAMES)
def test_double_reverse_at_one_bit_and_with_ste(name):
    """Reverse-over-reverse also runs at 1 bit and with delta = 0 (STE: for the elementwise
    quantizers the surrogate gradient is constant in x inside a cell, so H v = 0)."""
    quantize = CASES[name][0]
    x, p, v = random_x(name, SHAPE, seed=6), params_of(name), cotangent(SHAPE, seed=7)
    for bits, delta in [(1, DELTA), (BITS, 0.0)]:
        loss = lambda x, p: jnp.sum(quantize(x, p, bits, delta) ** 2)
        hv = jax.grad(lambda x, p: jnp.vdot(jax.grad(loss)(x, p), v), argnums=(0, 1))(x, p)
        assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(hv))
        if delta == 0.0 and name != "dorefa_weight":
            np.testing.assert_array_equal(np.asarray(hv[0]), 0.0)
