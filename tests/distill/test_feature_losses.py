"""Feature-distillation losses against NumPy float64 transcriptions of the released (NCHW, torch)
formulas, finite differences, finiteness at degenerate points and the teacher-side stop-gradient.

The NumPy references work on NCHW arrays as the released code does; the losses take NHWC.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from qkd_jax.distill import feature_losses as fl
from tests.x64 import enable_x64

# float32 rounding is ~6e-8 relative per operation; the losses chain O(10) operations and
# reductions of <= 1e3 terms, so 1e-4 relative leaves a wide margin on any correct evaluation.
F32_RTOL, F32_ATOL = 1e-4, 1e-7
F64_RTOL = 1e-10


# ----------------------------------------------------------------------------- NumPy references


def nchw(x: np.ndarray) -> np.ndarray:
    return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


def np_adaptive_pool(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch adaptive_avg_pool2d on NCHW: window [floor(i*H/o), ceil((i+1)*H/o))."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, out_h, out_w))
    for i in range(out_h):
        h0, h1 = (i * h) // out_h, -(-((i + 1) * h) // out_h)
        for j in range(out_w):
            w0, w1 = (j * w) // out_w, -(-((j + 1) * w) // out_w)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def np_match(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if s.shape[2] > t.shape[2]:
        s = np_adaptive_pool(s, t.shape[2], t.shape[2])
    elif s.shape[2] < t.shape[2]:
        t = np_adaptive_pool(t, s.shape[2], s.shape[2])
    return s, t


def np_normalize(x: np.ndarray, axis: int = 1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def np_at(s, t, p=2):
    s, t = np_match(nchw(s), nchw(t))
    a = lambda f: np_normalize((f**p).mean(1).reshape(f.shape[0], -1))  # noqa: E731
    return ((a(s) - a(t)) ** 2).mean()


def np_nst(s, t):
    s, t = np_match(nchw(s), nchw(t))
    s = np_normalize(s.reshape(s.shape[0], s.shape[1], -1), axis=2)
    t = np_normalize(t.reshape(t.shape[0], t.shape[1], -1), axis=2)

    def k(a, b):  # torch: (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)
        return ((a[:, None, :, :] * b[:, :, None, :]).sum(-1) ** 2).mean()

    return k(t, t) + k(s, s) - 2 * k(s, t)


def np_sp(s, t):
    n = s.shape[0]
    s, t = nchw(s).reshape(n, -1), nchw(t).reshape(n, -1)
    g_s, g_t = np_normalize(s @ s.T), np_normalize(t @ t.T)
    return ((g_t - g_s) ** 2).sum() / (n * n)


def np_smooth_l1(x, y):
    d = np.abs(x - y)
    return np.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def np_rkd(s, t, w_d=25.0, w_a=50.0):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)

    def pdist(e):
        sq = (e**2).sum(1)
        d = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * e @ e.T, 1e-12, None))
        np.fill_diagonal(d, 0.0)
        return d / d[d > 0].mean()

    def angle(e):
        diff = np_normalize(e[None, :, :] - e[:, None, :], axis=2)
        return np.stack([diff[i] @ diff[i].T for i in range(e.shape[0])]).reshape(-1)

    return w_d * np_smooth_l1(pdist(s), pdist(t)) + w_a * np_smooth_l1(angle(s), angle(t))


def np_cc(s, t):
    d = np.abs(np.asarray(s, np.float64) - np.asarray(t, np.float64))
    return np.mean((d[:-1] * d[1:]).sum(1))


def np_ft(s, t, p1=2, p2=1):
    s, t = np_match(nchw(s), nchw(t))
    f = lambda x: np_normalize((x**p1).mean(1).reshape(x.shape[0], -1))  # noqa: E731
    d = f(s) - f(t)
    return np.abs(d).mean() if p2 == 1 else (d**p2).mean()


def np_fsp(feats_s, feats_t):
    def mats(g):
        g = [nchw(x) for x in g]
        out = []
        for bot, top in zip(g[:-1], g[1:]):
            bot, top = np_match(bot, top)
            bot = bot.reshape(bot.shape[0], 1, bot.shape[1], -1)
            top = top.reshape(top.shape[0], top.shape[1], 1, -1)
            out.append((bot * top).mean(-1))
        return out

    return [((a - b) ** 2).mean() for a, b in zip(mats(feats_s), mats(feats_t))]


def np_vid(mu, target, log_scale, eps=1e-5):
    mu, target = nchw(mu), nchw(target)
    var = (np.log(1.0 + np.exp(np.asarray(log_scale, np.float64))) + eps).reshape(1, -1, 1, 1)
    return np.mean(0.5 * ((mu - target) ** 2 / var + np.log(var)))


def np_pkt(s, t, eps=1e-7):
    def probs(x):
        x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
        x = x / (np.sqrt((x**2).sum(1, keepdims=True)) + eps)
        sim = (x @ x.T + 1.0) / 2.0
        return sim / sim.sum(1, keepdims=True)

    p_s, p_t = probs(s), probs(t)
    return np.mean(p_t * np.log((p_t + eps) / (p_s + eps)))


def np_crd(v_s, v_t, mem_s, mem_t, idx, n_data, temp, z_s=None, z_t=None, eps=1e-7):
    v_s, v_t, mem_s, mem_t = (np.asarray(a, np.float64) for a in (v_s, v_t, mem_s, mem_t))
    n, k1 = idx.shape
    out_s = np.array([[np.exp(mem_t[idx[i, j]] @ v_s[i] / temp) for j in range(k1)] for i in range(n)])
    out_t = np.array([[np.exp(mem_s[idx[i, j]] @ v_t[i] / temp) for j in range(k1)] for i in range(n)])
    z_s = out_s.mean() * n_data if z_s is None else z_s
    z_t = out_t.mean() * n_data if z_t is None else z_t

    def contrast(x):
        m, pn = k1 - 1, 1.0 / n_data
        log_d1 = np.log(x[:, 0] / (x[:, 0] + m * pn + eps))
        log_d0 = np.log(m * pn / (x[:, 1:] + m * pn + eps))
        return -(log_d1.sum() + log_d0.sum()) / n

    return contrast(out_s / z_s) + contrast(out_t / z_t)


# ----------------------------------------------------------------------------- cases

rng = np.random.default_rng(0)
MAP_S = rng.normal(size=(4, 6, 6, 3))  # pooled to 4x4 (overlapping adaptive windows)
MAP_T = rng.normal(size=(4, 4, 4, 5))
MAP_SAME = rng.normal(size=(4, 4, 4, 5))
VEC_S = rng.normal(size=(5, 6))
VEC_T = rng.normal(size=(5, 6))
FSP_S = [rng.normal(size=(3, 8, 8, 2)), rng.normal(size=(3, 4, 4, 3)), rng.normal(size=(3, 4, 4, 4))]
FSP_T = [rng.normal(size=(3, 6, 6, 2)), rng.normal(size=(3, 6, 6, 3)), rng.normal(size=(3, 2, 2, 4))]
LOG_SCALE = rng.normal(size=(5,))

# name -> (jax loss of (student, teacher), numpy reference, student, teacher)
CASES: dict[str, tuple[Callable, Callable, object, object]] = {
    "attention": (fl.attention, np_at, MAP_S, MAP_T),
    "attention_p4": (lambda s, t: fl.attention(s, t, p=4), lambda s, t: np_at(s, t, 4), MAP_T, MAP_S),
    "nst": (fl.nst, np_nst, MAP_S, MAP_T),
    "similarity": (fl.similarity, np_sp, MAP_S, MAP_T),
    "rkd": (fl.rkd, np_rkd, VEC_S, VEC_T),
    "rkd_maps": (fl.rkd, np_rkd, MAP_S[:, :4, :4], MAP_T),
    "correlation": (fl.correlation, np_cc, VEC_S, VEC_T),
    "hint": (fl.hint, lambda s, t: np.mean((s - t) ** 2), MAP_SAME * 0.5, MAP_SAME),
    "factor_transfer": (fl.factor_transfer, np_ft, MAP_S, MAP_T),
    "factor_transfer_p2": (lambda s, t: fl.factor_transfer(s, t, p2=2), lambda s, t: np_ft(s, t, 2, 2), MAP_S, MAP_T),
    "fsp": (lambda s, t: sum(fl.fsp(s, t)), lambda s, t: sum(np_fsp(s, t)), FSP_S, FSP_T),
    "vid": (lambda s, t: fl.vid(s, t, LOG_SCALE), lambda s, t: np_vid(s, t, LOG_SCALE), MAP_SAME * 0.5, MAP_SAME),
    "pkt": (fl.pkt, np_pkt, VEC_S, VEC_T),
}


def cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


@pytest.fixture
def x64():
    with enable_x64(True):
        yield


@pytest.mark.parametrize("name", sorted(CASES))
def test_value_matches_numpy_float64(x64, name):
    loss, ref, s, t = CASES[name]
    got = loss(cast(s, jnp.float64), cast(t, jnp.float64))
    assert got.shape == () and got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), ref(s, t), rtol=F64_RTOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_value_float32_within_rounding(name):
    loss, ref, s, t = CASES[name]
    got = loss(cast(s, jnp.float32), cast(t, jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), ref(s, t), rtol=F32_RTOL, atol=F32_ATOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_matches_finite_differences(x64, name):
    loss, _, s, t = CASES[name]
    t64 = cast(t, jnp.float64)
    jax.test_util.check_grads(lambda a: loss(a, t64), (cast(s, jnp.float64),), order=1, modes=["rev"], eps=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_teacher_side_gets_no_gradient(name):
    loss, _, s, t = CASES[name]
    grads = jax.grad(loss, argnums=1)(cast(s, jnp.float32), cast(t, jnp.float32))
    for g in jax.tree_util.tree_leaves(grads):
        assert not np.any(np.asarray(g))


def test_fsp_returns_one_loss_per_pair_and_checks_channels():
    losses = fl.fsp(cast(FSP_S, jnp.float32), cast(FSP_T, jnp.float32))
    np.testing.assert_allclose(losses, np_fsp(FSP_S, FSP_T), rtol=F32_RTOL)
    with pytest.raises(ValueError, match="equal channel counts"):
        fl.fsp([jnp.zeros((1, 2, 2, 3))], [jnp.zeros((1, 2, 2, 4))])


def test_vid_pools_a_taller_target_and_its_initial_variance():
    mu, target = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 6, 6, 4))
    log_scale = np.full((4,), fl.vid_log_scale_init(5.0))
    pooled = np.transpose(np_adaptive_pool(nchw(target), 3, 3), (0, 2, 3, 1))
    got = fl.vid(jnp.asarray(mu, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(log_scale, jnp.float32))
    np.testing.assert_allclose(float(got), np_vid(mu, pooled, log_scale), rtol=F32_RTOL)
    # softplus(init) + eps == init_pred_var (the released parametrisation).
    np.testing.assert_allclose(np.log1p(np.exp(log_scale[0])) + 1e-5, 5.0, rtol=1e-12)


def test_teacher_grad_option_reaches_teacher_embedding():
    s, t = jnp.asarray(VEC_S, jnp.float32), jnp.asarray(VEC_T, jnp.float32)
    g = jax.grad(lambda b: fl.correlation(s, b, teacher_grad=True))(t)
    assert np.all(np.isfinite(g)) and np.any(np.asarray(g))


# ----------------------------------------------------------------------------- CRD


def crd_inputs(n=4, k=6, dim=8, n_data=20, seed=1):
    r = np.random.default_rng(seed)
    v_s = np_normalize(r.normal(size=(n, dim)))
    v_t = np_normalize(r.normal(size=(n, dim)))
    bound = 1.0 / math.sqrt(dim / 3)
    mem_s, mem_t = r.uniform(-bound, bound, size=(2, n_data, dim))
    idx = r.integers(0, n_data, size=(n, k + 1))
    idx[:, 0] = np.arange(n)
    return v_s, v_t, mem_s, mem_t, idx, n_data


def test_crd_memory_init_bounds():
    mem = np.asarray(fl.crd_memory_init(jax.random.key(0), 500, 12))
    bound = 1.0 / math.sqrt(12 / 3)
    assert mem.shape == (500, 12) and np.all(np.abs(mem) <= bound) and mem.max() > 0.9 * bound


def test_crd_matches_numpy_first_step_and_stored_normalizers(x64):
    v_s, v_t, mem_s, mem_t, idx, n_data = crd_inputs()
    args = cast((v_s, v_t, mem_s, mem_t), jnp.float64)
    got = fl.crd_nce(*args, jnp.asarray(idx), n_data=n_data, temperature=0.5)
    np.testing.assert_allclose(float(got), np_crd(v_s, v_t, mem_s, mem_t, idx, n_data, 0.5), rtol=F64_RTOL)
    got = fl.crd_nce(*args, jnp.asarray(idx), n_data=n_data, temperature=0.5, z_s=3.0, z_t=7.0)
    np.testing.assert_allclose(float(got), np_crd(v_s, v_t, mem_s, mem_t, idx, n_data, 0.5, 3.0, 7.0), rtol=F64_RTOL)
    z_s, z_t = fl.crd_normalizers(*args, jnp.asarray(idx), n_data=n_data, temperature=0.5)
    out_s = np.exp(np.einsum("nkd,nd->nk", mem_t[idx], v_s) / 0.5)
    np.testing.assert_allclose(float(z_s), out_s.mean() * n_data, rtol=F64_RTOL)
    assert float(z_t) > 0


def test_crd_float32_and_gradients(x64):
    v_s, v_t, mem_s, mem_t, idx, n_data = crd_inputs()
    ref = np_crd(v_s, v_t, mem_s, mem_t, idx, n_data, 0.07, 50.0, 60.0)
    got = fl.crd_nce(*cast((v_s, v_t, mem_s, mem_t), jnp.float32), jnp.asarray(idx), n_data=n_data, z_s=50.0, z_t=60.0)
    np.testing.assert_allclose(float(got), ref, rtol=F32_RTOL)

    m_s, m_t, v_t64 = cast((mem_s, mem_t, v_t), jnp.float64)

    def loss(a):
        return fl.crd_nce(a, v_t64, m_s, m_t, jnp.asarray(idx), n_data=n_data, temperature=0.5, z_s=3.0, z_t=7.0)

    jax.test_util.check_grads(loss, (jnp.asarray(v_s),), order=1, modes=["rev"], eps=1e-6)
    v_s64 = jnp.asarray(v_s)
    for argnum in (1, 2, 3):  # teacher embedding and both banks are constants
        g = jax.grad(lambda *a: fl.crd_nce(*a, jnp.asarray(idx), n_data=n_data, z_s=3.0, z_t=7.0), argnums=argnum)(
            v_s64, v_t64, m_s, m_t
        )
        assert not np.any(np.asarray(g))
    g = jax.grad(lambda b: fl.crd_nce(v_s64, b, m_s, m_t, jnp.asarray(idx), n_data=n_data, teacher_grad=True))(v_t64)
    assert np.any(np.asarray(g))


def test_crd_memory_update_matches_numpy():
    r = np.random.default_rng(3)
    mem = np.asarray(fl.crd_memory_init(jax.random.key(3), 10, 4), np.float64)
    v = r.normal(size=(3, 4))
    idx = np.array([7, 2, 5])
    got = fl.crd_memory_update(jnp.asarray(mem, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(idx), 0.5)
    expected = mem.copy()
    rows = mem[idx] * 0.5 + v * 0.5
    expected[idx] = rows / np.sqrt((rows**2).sum(1, keepdims=True))
    np.testing.assert_allclose(got, expected, rtol=F32_RTOL, atol=F32_ATOL)
    zero = fl.crd_memory_update(jnp.zeros((3, 4)), jnp.zeros((1, 4)), jnp.array([1]))
    assert np.all(np.isfinite(zero)) and not np.any(np.asarray(zero))


# ----------------------------------------------------------------------------- degenerate points


def degenerate_cases():
    """(name, loss of student only, student) at points where norms or distances vanish."""
    z_map, z_vec = np.zeros((4, 4, 4, 5)), np.zeros((5, 6))
    rows_equal = np.tile(VEC_S[:1], (5, 1))
    maps_equal = np.tile(MAP_SAME[:1], (4, 1, 1, 1))
    map_losses = {"attention": fl.attention, "nst": fl.nst, "similarity": fl.similarity, "hint": fl.hint,
                  "factor_transfer": fl.factor_transfer, "rkd": fl.rkd, "pkt": fl.pkt}
    vec_losses = {"rkd": fl.rkd, "correlation": fl.correlation, "pkt": fl.pkt, "similarity": fl.similarity}
    out = []
    for name, loss in map_losses.items():
        out += [(f"{name}-zero", loss, z_map, z_map), (f"{name}-equal", loss, MAP_SAME, MAP_SAME),
                (f"{name}-zero-vs-t", loss, z_map, MAP_SAME), (f"{name}-equal-rows", loss, maps_equal, MAP_SAME)]
    for name, loss in vec_losses.items():
        out += [(f"{name}-vec-zero", loss, z_vec, z_vec), (f"{name}-vec-equal", loss, VEC_S, VEC_S),
                (f"{name}-rows-equal", loss, rows_equal, VEC_T),
                (f"{name}-both-rows-equal", loss, rows_equal, rows_equal),
                (f"{name}-one-sample", loss, VEC_S[:1], VEC_T[:1])]
    fsp_zero = [np.zeros_like(f) for f in FSP_S]
    out += [("fsp-zero", lambda s, t: sum(fl.fsp(s, t)), fsp_zero, [np.zeros_like(f) for f in FSP_T])]
    out += [("vid-equal", lambda s, t: fl.vid(s, t, LOG_SCALE), MAP_SAME, MAP_SAME),
            ("vid-zero", lambda s, t: fl.vid(s, t, np.full((5,), -50.0)), z_map, z_map)]
    v = np.zeros((4, 8))
    idx = np.tile(np.arange(7), (4, 1))
    out += [("crd-zero", lambda s, t: fl.crd_nce(s, t, jnp.zeros((20, 8), s.dtype), jnp.zeros((20, 8), s.dtype),
                                                 jnp.asarray(idx), n_data=20), v, v)]
    return out


DEGENERATE = degenerate_cases()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", DEGENERATE, ids=[c[0] for c in DEGENERATE])
def test_finite_at_degenerate_points(case, dtype):
    _, loss, s, t = case
    with enable_x64(dtype == "float64"):
        s, t = cast(s, jnp.dtype(dtype)), cast(t, jnp.dtype(dtype))
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(s, t)
        assert np.isfinite(float(value))
        for g in jax.tree_util.tree_leaves(grads):
            assert np.all(np.isfinite(np.asarray(g)))


def test_degenerate_limits():
    """Closed forms at degenerate points: equal inputs give 0, and the chosen limits."""
    for loss in (fl.attention, fl.nst, fl.similarity, fl.hint, fl.factor_transfer, fl.pkt):
        assert abs(float(loss(jnp.asarray(MAP_SAME, jnp.float32), jnp.asarray(MAP_SAME, jnp.float32)))) < 1e-6
    for loss in (fl.rkd, fl.correlation):
        assert abs(float(loss(jnp.asarray(VEC_S, jnp.float32), jnp.asarray(VEC_S, jnp.float32)))) < 1e-5
    # A batch of one: RKD distances are all zero and CC has no consecutive pair -> 0.
    one_s, one_t = jnp.asarray(VEC_S[:1], jnp.float32), jnp.asarray(VEC_T[:1], jnp.float32)
    assert float(fl.correlation(one_s, one_t)) == 0.0
    assert abs(float(fl.rkd(one_s, one_t))) < 1e-6
    # Equal student rows: the released clamp makes their distance sqrt(1e-12) and their
    # difference vector normalises to 0, both reproduced.
    with enable_x64(True):
        same = jnp.tile(jnp.asarray(VEC_S[:1], jnp.float64), (3, 1))
        np.testing.assert_allclose(float(fl.rkd(same, same)), 0.0, atol=1e-12)
