"""Objectives: values vs closed forms, label/teacher requirements, stop-gradients and co-studying."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax import distill
from tests.distill.test_losses import np_ce, np_kl

B, C = 8, 5


@pytest.fixture
def batch():
    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.normal(size=(B, C)) * 2, jnp.float32)
    t = jnp.asarray(rng.normal(size=(B, C)) * 2, jnp.float32)
    y = jnp.asarray(rng.integers(0, C, size=B))
    return s, t, y


def test_sqakd_value_and_requirements(batch):
    s, t, _ = batch
    obj = distill.sqakd(alpha=3.0, temperature=4.0)
    assert obj.needs_teacher and not obj.needs_labels and not obj.trains_teacher
    loss, aux = obj(s, t)
    np.testing.assert_allclose(loss, 3.0 * np.mean(np_kl(s, t, 4.0)), rtol=1e-5)
    assert set(aux) == {"kl", "loss"}
    np.testing.assert_allclose(aux["kl"], np.mean(np_kl(s, t, 4.0)), rtol=1e-5)


def test_sqakd_never_touches_labels(batch):
    s, t, y = batch
    obj = distill.sqakd()

    def value_and_grads(labels):
        return jax.value_and_grad(lambda a: obj(a, t, labels)[0])(s)

    l0, g0 = value_and_grads(None)
    l1, g1 = value_and_grads(y)
    l2, g2 = value_and_grads((y + 1) % C)
    l3, g3 = value_and_grads(jnp.full((3, 7), -1.0))  # garbage labels are not even inspected
    for loss, grad in ((l1, g1), (l2, g2), (l3, g3)):
        assert loss == l0
        np.testing.assert_array_equal(grad, g0)


def test_teacher_logits_get_no_gradient(batch):
    s, t, y = batch
    for obj in (distill.sqakd(), distill.tutoring(), distill.kd()):
        g_t = jax.grad(lambda b: obj(s, b, y)[0])(t)
        np.testing.assert_array_equal(g_t, 0.0)


def test_task_needs_labels_not_teacher(batch):
    s, _, y = batch
    obj = distill.task(label_smoothing=0.1)
    assert obj.needs_labels and not obj.needs_teacher
    loss, aux = obj(s, None, y)
    np.testing.assert_allclose(loss, np.mean(np_ce(s, np.asarray(y), 0.1)), rtol=1e-5)
    assert set(aux) == {"ce", "loss"}
    with pytest.raises(ValueError, match="labels"):
        obj(s)


def test_kd_is_gamma_ce_plus_alpha_kl(batch):
    s, t, y = batch
    obj = distill.kd(gamma=0.5, alpha=2.0, temperature=3.0, label_smoothing=0.1)
    loss, aux = obj(s, t, y)
    ce, kl = np.mean(np_ce(s, np.asarray(y), 0.1)), np.mean(np_kl(s, t, 3.0))
    np.testing.assert_allclose(aux["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(aux["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * ce + 2.0 * kl, rtol=1e-5)
    assert aux["loss"] == loss
    no_kd = distill.kd(gamma=1.0, alpha=0.0)
    assert not no_kd.needs_teacher and no_kd.needs_labels
    with pytest.raises(ValueError, match="no terms"):
        distill.kd(gamma=0.0, alpha=0.0)


def test_missing_teacher_raises(batch):
    s, _, y = batch
    with pytest.raises(ValueError, match="teacher"):
        distill.tutoring()(s, None, y)
    with pytest.raises(ValueError, match="teacher"):
        distill.sqakd()(s)


def test_qkd_presets_values(batch):
    s, t, y = batch
    assert distill.self_study().needs_labels and not distill.self_study().needs_teacher
    loss, _ = distill.self_study()(s, None, y)
    np.testing.assert_allclose(loss, np.mean(np_ce(s, np.asarray(y), 0.0)), rtol=1e-5)
    tu = distill.tutoring(temperature=2.0)
    assert tu.needs_labels and tu.needs_teacher and not tu.trains_teacher
    loss, _ = tu(s, t, y)
    ref = np.mean(np_ce(s, np.asarray(y), 0.0)) + np.mean(np_kl(s, t, 2.0))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_co_study_value_and_aux(batch):
    s, t, y = batch
    obj = distill.co_study(temperature=2.0)
    assert obj.needs_labels and obj.needs_teacher and obj.trains_teacher
    loss, aux = obj(s, t, y)
    yn = np.asarray(y)
    ls = np.mean(np_ce(s, yn, 0.0)) + np.mean(np_kl(s, t, 2.0))
    lt = np.mean(np_ce(t, yn, 0.0)) + np.mean(np_kl(t, s, 2.0))
    np.testing.assert_allclose(aux["student/loss"], ls, rtol=1e-5)
    np.testing.assert_allclose(aux["teacher/loss"], lt, rtol=1e-5)
    np.testing.assert_allclose(loss, ls + lt, rtol=1e-5)
    assert set(aux) == {"student/ce", "student/kl", "student/loss", "teacher/ce", "teacher/kl", "teacher/loss", "loss"}


def test_co_study_each_network_gets_only_its_own_gradient(batch):
    s, t, y = batch
    temp = 2.0
    obj = distill.co_study(temperature=temp)
    g_s, g_t = jax.grad(lambda a, b: obj(a, b, y)[0], argnums=(0, 1))(s, t)

    # independent references: L_S with t constant, L_T with s constant
    def l_s(a):
        return jnp.mean(distill.cross_entropy(a, y)) + jnp.mean(distill.kl_divergence(a, t, temp))

    def l_t(b):
        return jnp.mean(distill.cross_entropy(b, y)) + jnp.mean(distill.kl_divergence(b, s, temp))

    np.testing.assert_allclose(g_s, jax.grad(l_s)(s), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g_t, jax.grad(l_t)(t), rtol=1e-6, atol=1e-7)

    # without the stop-gradients the summed loss would leak a cross term into each network
    def unstopped(a, b):
        return l_s_free(a, b) + l_s_free(b, a)

    def l_s_free(a, b):
        return jnp.mean(distill.cross_entropy(a, y)) + jnp.mean(distill.kl_divergence(a, b, temp))

    g_leak = jax.grad(unstopped)(s, t)
    assert not np.allclose(g_leak, g_s, atol=1e-4)


def test_mask_weights_examples(batch):
    s, t, y = batch
    mask = jnp.array([1, 1, 1, 0, 1, 0, 0, 1], jnp.float32)
    keep = np.asarray(mask, bool)
    obj = distill.kd(gamma=1.0, alpha=1.0, temperature=4.0)
    loss, _ = obj(s, t, y, mask=mask)
    ref, _ = obj(s[keep], t[keep], y[keep])
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    zero_loss, grads = jax.value_and_grad(lambda a: obj(a, t, y, mask=jnp.zeros(B))[0])(s)
    assert zero_loss == 0.0 and np.all(np.isfinite(np.asarray(grads)))
    with pytest.raises(ValueError, match="mask"):
        obj(s, t, y, mask=jnp.ones(B + 1))


def test_objectives_jit(batch):
    s, t, y = batch
    obj = distill.co_study()
    loss, aux = jax.jit(lambda a, b, c: obj(a, b, c))(s, t, y)
    np.testing.assert_allclose(loss, obj(s, t, y)[0], rtol=1e-6)


def test_get_objective_registry():
    for name in ("sqakd", "task", "kd", "self_study", "tutoring", "co_study"):
        assert distill.get_objective(name).name.startswith(name)
    assert distill.get_objective("sqakd", alpha=100.0).terms[0].weight == 100.0
    with pytest.raises(ValueError, match="known:.*sqakd"):
        distill.get_objective("nope")
    with pytest.raises(ValueError, match="unknown argument.*beta"):
        distill.get_objective("sqakd", beta=1.0)


def test_term_and_objective_validation():
    with pytest.raises(ValueError, match="unique"):
        distill.Objective((distill.ce_term(), distill.ce_term()))
    with pytest.raises(ValueError, match="weight"):
        distill.kl_term(float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        distill.sqakd(temperature=-1.0)
