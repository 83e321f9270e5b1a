"""Tests of the gradient estimators (qkd_jax/quant/estimators.py, docs/method.md section 12).

Expected backward rules are NumPy transcriptions of the papers' surrogates, checked once more
against central finite differences of the surrogate itself; STE / EWGS against the legacy
discretizer (the same numbers as before estimators existed); the stochastic forwards against
their distributions; every estimator under jit, vmap, grad, shard_map and reverse-over-reverse.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from qkd_jax.quant import estimators as E
from qkd_jax.quant.discretize import discretize, discretize_index

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy 2 renamed trapz (1.26 is the lowest bound)

LEVELS = [2, 4, 16]
DETERMINISTIC = ["ste", "ewgs", "dsq", "approxsign", "reste"]


def _x(levels, n=200, seed=0):
    return np.random.default_rng(seed + levels).uniform(0.0, 1.0, n).astype(np.float32)


def _cell_np(x_n, levels):
    u = np.float64(x_n) * (levels - 1)
    return 2.0 * (u - np.floor(u)) - 1.0


# ------------------------------------------------- surrogates (index units: r(u) on one cell)


def _dsq_phi(u, alpha):
    """MQBench dsq.py: floor(u) + 1/2 + s tanh(k (frac(u) - 1/2)) / 2."""
    s = 1.0 / (1.0 - alpha)
    k = np.log(2.0 / alpha - 1.0)
    return np.floor(u) + 0.5 + 0.5 * s * np.tanh(k * (u - np.floor(u) - 0.5))


def _approxsign(t):
    """Bi-Real Net's ApproxSign F(t): 2t + t^2 (t < 0), 2t - t^2 (t >= 0), on [-1, 1]."""
    return np.where(t < 0, 2 * t + t * t, 2 * t - t * t)


def _reste(t, o):
    return np.sign(t) * np.abs(t) ** (1.0 / o)


def _surrogate(name, u, opts):
    """r(u) of the estimator's surrogate within the cell of u (t = 2 frac(u) - 1)."""
    t = 2.0 * (u - np.floor(u)) - 1.0
    if name == "dsq":
        return _dsq_phi(u, opts["alpha"])
    if name == "approxsign":
        return np.floor(u) + (_approxsign(t) + 1.0) / 2.0
    return np.floor(u) + (_reste(t, opts["power"]) + 1.0) / 2.0


def _expected(name, g, x_n, x_q, levels, opts):
    t = _cell_np(x_n, levels)
    if name == "ste":
        return g
    if name == "ewgs":
        return g * (1.0 + opts["delta"] * np.sign(g) * (x_n - x_q))
    if name == "dsq":
        a = opts["alpha"]
        s, k = 1.0 / (1.0 - a), np.log(2.0 / a - 1.0)
        return g * 0.5 * s * k * (1.0 - np.tanh(k * t / 2.0) ** 2)
    if name == "approxsign":
        return g * (2.0 - 2.0 * np.abs(t))
    if name == "reste":
        o, thr = opts["power"], opts["threshold"]
        with np.errstate(divide="ignore"):
            slope = np.where(t != 0, (1.0 / o) * np.abs(t) ** (1.0 / o - 1.0), np.inf)
        return g * np.minimum(slope, thr)
    raise AssertionError(name)


OPTIONS = {"ste": {}, "ewgs": {"delta": 0.3}, "dsq": {"alpha": 0.3}, "approxsign": {},
           "reste": {"power": 2.0, "threshold": 1.5}}


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_backward_matches_closed_form(name, levels):
    est = E.make(name, OPTIONS[name])
    x = _x(levels)
    g = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    out, vjp = jax.vjp(lambda v: discretize(v, levels, estimator=est), jnp.asarray(x))
    x_q = np.round(x * np.float32(levels - 1)) / np.float32(levels - 1)
    np.testing.assert_allclose(np.asarray(out), x_q, atol=1e-7)  # the hard forward
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]),
                               _expected(name, g.astype(np.float64), x, x_q, levels, OPTIONS[name]),
                               rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("levels", [2, 4])
@pytest.mark.parametrize("name", ["dsq", "approxsign", "reste"])
def test_backward_is_the_surrogates_derivative(name, levels):
    """Central differences of the per-cell surrogate r(u) (float64), away from cell edges and from
    ReSTE's clipped centre: d x_q / d x_n = dr/du for u = x_n (L - 1)."""
    est = E.make(name, OPTIONS[name])
    x = _x(levels, 100, seed=7).astype(np.float64)
    t = _cell_np(x, levels)
    keep = (np.abs(t) < 0.98) & (np.abs(t) > (0.3 if name == "reste" else 0.02))
    x = x[keep]
    u, h = x * (levels - 1), 1e-6
    fd = (_surrogate(name, u + h, OPTIONS[name]) - _surrogate(name, u - h, OPTIONS[name])) / (2 * h)
    got = jax.grad(lambda v: jnp.sum(discretize(v, levels, estimator=est)))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), fd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["dsq", "approxsign", "reste"])
def test_surrogate_slopes_average_to_one_per_cell(name):
    """Each surrogate climbs one grid step per cell: the mean slope over a cell is 1 (as the STE's).
    ReSTE's clip at T removes the area above T near the centre: with t* = (T o)^(o / (1 - o)) the
    slope reaches T, the mean is 1 - (t*^(1/o) - T t*)."""
    est = E.make(name, OPTIONS[name])
    x = (np.arange(200001) / 200000.0).astype(np.float32)  # one cell of the 2-level grid
    slope = jax.grad(lambda v: jnp.sum(discretize(v, 2, estimator=est)))(jnp.asarray(x))
    mean = float(_trapezoid(np.asarray(slope, np.float64), x.astype(np.float64)))
    expected = 1.0
    if name == "reste":
        o, thr = OPTIONS[name]["power"], OPTIONS[name]["threshold"]
        t_star = (thr * o) ** (o / (1.0 - o))
        expected = 1.0 - (t_star ** (1.0 / o) - thr * t_star)  # 5/6 for o = 2, T = 1.5
    assert mean == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("levels", [3, 4, 16])
@pytest.mark.parametrize("delta", [0.0, 0.25])
def test_ste_and_ewgs_records_give_the_legacy_numbers(levels, delta):
    """estimator=EWGS(delta) is the legacy discretize(x, L, delta) bit for bit, forward and backward,
    and EWGS(delta=None) takes the caller's (layer's) delta; 'ste' is delta 0."""
    x = jnp.asarray(_x(levels))
    g = jnp.asarray(np.random.default_rng(3).normal(size=x.shape).astype(np.float32))

    def pull(fn):
        out, vjp = jax.vjp(fn, x)
        return np.asarray(out), np.asarray(vjp(g)[0])

    legacy = pull(lambda v: discretize(v, levels, delta))
    for fn in (lambda v: discretize(v, levels, estimator=E.make("ewgs", {"delta": delta})),
               lambda v: discretize(v, levels, delta, estimator=E.make("ewgs")),
               lambda v: discretize(v, levels, E.make("ewgs", {"delta": delta}))):
        got = pull(fn)
        np.testing.assert_array_equal(got[0], legacy[0])
        np.testing.assert_array_equal(got[1], legacy[1])
    ste = pull(lambda v: discretize(v, levels, 0.7, estimator=E.make("ste")))
    np.testing.assert_array_equal(ste[1], np.asarray(g))
    legacy_index = pull(lambda v: discretize_index(v * (levels - 1), levels, delta))
    got_index = pull(lambda v: discretize_index(v * (levels - 1), levels, estimator=E.make("ewgs", {"delta": delta})))
    np.testing.assert_array_equal(got_index[1], legacy_index[1])


@pytest.mark.parametrize("name", ["dsq", "approxsign", "reste"])
def test_index_form_matches_the_grid_form(name):
    """discretize_index (LSQ, released quantizers) applies the same rule: d round(u)/du = d x_q/d x_n."""
    est, levels = E.make(name, OPTIONS[name]), 8
    x = jnp.asarray(_x(levels))
    grid = jax.grad(lambda v: jnp.sum(discretize(v, levels, estimator=est)))(x)
    index = jax.grad(lambda u: jnp.sum(discretize_index(u, levels, estimator=est)))(x * (levels - 1))
    np.testing.assert_allclose(np.asarray(index), np.asarray(grid), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------- stochastic forwards


def test_stochastic_rounding_is_unbiased_and_on_neighbouring_levels():
    est, levels = E.make("stochastic"), 4
    x = jnp.asarray(_x(levels, 64))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: discretize(x, levels, est.keyed(k)))(keys)) * (levels - 1)
    u = np.asarray(x, np.float64) * (levels - 1)
    assert np.all((np.round(draws) == np.floor(u)) | (np.round(draws) == np.ceil(u)))
    assert np.allclose(draws, np.round(draws), atol=1e-5)  # on the grid
    # E[r] = u; the mean of 4000 Bernoulli draws is within 5 standard errors (<= 0.5 / sqrt(4000))
    assert np.max(np.abs(draws.mean(0) - u)) < 5 * 0.5 / np.sqrt(4000)
    # without a key: the hard rounding
    steps = np.float32(levels - 1)
    np.testing.assert_array_equal(np.asarray(discretize(x, levels, est)),
                                  np.round(np.asarray(x) * steps) / steps)


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_noise_is_one_uniform_grid_step_on_a_share_of_elements(rate):
    est, levels = E.make("noise", {"rate": rate}), 4
    x = jnp.asarray(_x(levels, 20000))
    out = np.asarray(discretize(x, levels, est.keyed(jax.random.key(1))), np.float64)
    err = (out - np.asarray(x, np.float64)) * (levels - 1)
    hard = np.isclose(out * (levels - 1), np.round(np.asarray(x, np.float64) * (levels - 1)), atol=1e-6)
    noised = err[~hard]
    assert np.all(np.abs(noised) <= 0.5 + 1e-5)
    assert np.mean(~hard) == pytest.approx(rate, abs=0.02)
    # U[-1/2, 1/2): mean 0, variance 1/12 (5 standard errors)
    n = noised.size
    assert abs(noised.mean()) < 5 * np.sqrt(1 / 12 / n)
    assert noised.var() == pytest.approx(1 / 12, abs=5 * np.sqrt(1 / 180 / n))
    # straight-through backward
    grad = jax.grad(lambda v: jnp.sum(discretize(v, levels, est.keyed(jax.random.key(1)))))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.ones(x.shape, np.float32))


# ----------------------------------------------------------------------------- transforms


# 'ewgs', 'approxsign' and 'reste' share their code paths with 'ste' / 'dsq' (legacy / generic rule).
@pytest.mark.parametrize("name", ["ste", "dsq", "stochastic", "noise"])
def test_jit_vmap_and_shard_map_agree_with_eager(name):
    est, levels = E.make(name, OPTIONS.get(name)), 4
    x = jnp.asarray(_x(levels, 8 * 16).reshape(8, 16))
    key = jax.random.key(2)

    def loss(v, k):
        return jnp.sum(jnp.sin(3.0 * discretize(v, levels, est.keyed(k))))

    eager = jax.grad(loss)(x, key)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss))(x, key)), np.asarray(eager), rtol=1e-5, atol=1e-6)
    rows = jax.vmap(jax.grad(loss), in_axes=(0, None))(x, key)
    assert rows.shape == x.shape and np.all(np.isfinite(np.asarray(rows)))
    if not est.stochastic:  # per-row keys draw different noise; deterministic rules agree row by row
        np.testing.assert_allclose(np.asarray(rows), np.asarray(eager), rtol=1e-5, atol=1e-6)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharded = jax.jit(jax.shard_map(lambda v: jax.lax.pmean(jax.grad(loss)(v, key), "data"), mesh=mesh,
                                    in_specs=P("data"), out_specs=P("data")))(x)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(eager), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ewgs", "dsq", "reste"])
def test_reverse_over_reverse_matches_finite_differences_of_the_gradient(name):
    """The Hessian probe's H v (reverse-over-reverse) equals central differences of the estimator's
    gradient (points kept inside their cells so the hard forward does not move)."""
    est, levels = E.make(name, OPTIONS[name]), 4
    x = _x(levels, 64, seed=5)
    t = _cell_np(x, levels)
    x = jnp.asarray(x[(np.abs(t) > 0.35) & (np.abs(t) < 0.9)])
    w = jnp.linspace(0.5, 1.5, x.size)

    def f(v):
        return jnp.sum(w * discretize(v, levels, estimator=est) ** 2 + 0.5 * v ** 3)

    v = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], x.size).astype(np.float32))
    hv = jax.jit(jax.grad(lambda y: jnp.vdot(jax.grad(f)(y), v)))(x)
    h = 1e-3
    grad = jax.jit(jax.grad(f))
    fd = (grad(x + h * v) - grad(x - h * v)) / (2 * h)
    np.testing.assert_allclose(np.asarray(hv), np.asarray(fd), rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------------- registry and errors


def test_unknown_name_lists_the_registered_estimators():
    with pytest.raises(ValueError, match=r"unknown gradient estimator 'newton'; registered: \[.*'dsq'.*'ste'"):
        E.make("newton")


@pytest.mark.parametrize("name,options,match", [
    ("dsq", {"beta": 1.0}, r"estimator 'dsq' has no option\(s\) \['beta'\]; its options: \['alpha'\]"),
    ("dsq", {"alpha": 1.5}, r"alpha=1.5 must be in \(0, 1\)"),
    ("noise", {"rate": -0.1}, r"rate=-0.1 must be in \[0, 1\]"),
    ("reste", {"power": 0.5}, r"power=0.5 must be >= 1"),
    ("ewgs", {"delta": -1.0}, r"delta=-1.0 must be >= 0"),
])
def test_bad_options_fail_with_one_line(name, options, match):
    with pytest.raises(ValueError, match=match) as err:
        E.make(name, options)
    assert "\n" not in str(err.value)


def test_a_custom_estimator_registers_and_runs():
    @E.estimator_record
    class Clipped(E.Estimator):
        name: ClassVar[str] = "test_clipped"
        limit: float = 0.5

        def backward(self, g, x_n, x_q, levels):
            return jnp.clip(g, -self.limit, self.limit)

    E.register(Clipped)
    try:
        est = E.make("test_clipped", {"limit": 0.25})
        assert dataclasses.is_dataclass(est) and jax.tree.leaves(est) == [0.25]
        g = jax.grad(lambda v: jnp.sum(jnp.array([2.0, -0.1]) * discretize(v, 4, estimator=est)))(
            jnp.array([0.3, 0.6]))
        np.testing.assert_allclose(np.asarray(g), [0.25, -0.1])
        with pytest.raises(ValueError, match="already registered"):
            E.register(type("Other", (Clipped,), {"name": "test_clipped"}))
        again = type("Clipped", (Clipped,), {"__module__": Clipped.__module__, "__qualname__": Clipped.__qualname__})
        assert E.register(again) is again and E.ESTIMATORS["test_clipped"] is again  # a re-run cell
    finally:
        E.ESTIMATORS.pop("test_clipped")


def test_array_hyperparameters_are_leaves_that_get_no_gradient():
    """An annealed / learnable hyperparameter may be an array (a pytree leaf); the discretizer passes
    it no gradient and a traced value works under jit."""
    x = jnp.asarray(_x(4, 16))

    @jax.jit
    def grad_at(alpha):
        est = E.DSQ(alpha=alpha)
        return jax.grad(lambda v, a: jnp.sum(discretize(v, 4, estimator=E.DSQ(alpha=a))), argnums=(0, 1))(x, alpha), est

    (gx, ga), est = grad_at(jnp.float32(0.3))
    assert float(ga) == 0.0
    np.testing.assert_allclose(np.asarray(gx), np.asarray(jax.grad(
        lambda v: jnp.sum(discretize(v, 4, estimator=E.make("dsq", {"alpha": 0.3}))))(x)), rtol=1e-6)
    assert isinstance(est, E.DSQ)
