"""Per-example KL and cross-entropy against NumPy closed forms (float64), stability and gradients."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from qkd_jax.distill import cross_entropy, kl_divergence
from tests.x64 import enable_x64


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(s: np.ndarray, t: np.ndarray, temp: float) -> np.ndarray:
    log_ps, log_pt = np_log_softmax(s / temp), np_log_softmax(t / temp)
    return temp**2 * np.sum(np.exp(log_pt) * (log_pt - log_ps), -1)


def np_ce(logits: np.ndarray, labels: np.ndarray, eps: float) -> np.ndarray:
    num_classes = logits.shape[-1]
    q = (1 - eps) * np.eye(num_classes)[labels] + eps / num_classes
    return -np.sum(q * np_log_softmax(logits), -1)


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 10)).astype(np.float32) * 3, rng.normal(size=(6, 10)).astype(np.float32) * 3


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kl_matches_numpy_per_example(logits, temp):
    s, t = logits
    got = kl_divergence(s, t, temp)
    assert got.shape == (6,)
    np.testing.assert_allclose(got, np_kl(s, t, temp), rtol=1e-5, atol=1e-6)


def test_kl_official_batch_mean_convention(logits):
    """Official: T^2 * (sum over batch and classes of p_t (log p_t - log p_s)) / batch size."""
    s, t = logits
    temp = 4.0
    ps = np.exp(np_log_softmax(s / temp))
    pt = np.exp(np_log_softmax(t / temp))
    official = np.sum(pt * (np.log(pt) - np.log(ps))) / s.shape[0] * temp**2
    np.testing.assert_allclose(jnp.mean(kl_divergence(s, t, temp)), official, rtol=1e-5)
    # the T^2 factor: the loss is T^2 times the plain KL of the softened distributions
    plain = np.sum(pt * (np.log(pt) - np.log(ps)), -1)
    np.testing.assert_allclose(kl_divergence(s, t, temp), temp**2 * plain, rtol=1e-5, atol=1e-6)


def test_kl_zero_iff_same_and_nonnegative(logits):
    s, t = logits
    np.testing.assert_allclose(kl_divergence(s, s, 2.0), 0.0, atol=1e-6)
    assert np.all(np.asarray(kl_divergence(s, t, 2.0)) > 0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_cross_entropy_matches_numpy(logits, eps):
    s, _ = logits
    labels = np.array([0, 3, 9, 2, 2, 5])
    got = cross_entropy(s, labels, label_smoothing=eps)
    assert got.shape == (6,)
    np.testing.assert_allclose(got, np_ce(s, labels, eps), rtol=1e-5, atol=1e-6)


def test_cross_entropy_batch_mean_is_torch_default(logits):
    """torch CrossEntropyLoss (reduction='mean') = mean of -log p_y."""
    s, _ = logits
    labels = np.array([1, 1, 4, 7, 0, 9])
    ref = -np.mean(np_log_softmax(s)[np.arange(6), labels])
    np.testing.assert_allclose(jnp.mean(cross_entropy(s, labels)), ref, rtol=1e-6)


def test_huge_logits_are_stable(logits):
    s, t = logits
    big_s, big_t = s * 1e4 / 3, t * 1e4 / 3 + 1e4  # magnitudes ~1e4, naive exp overflows
    kl = kl_divergence(big_s, big_t, 4.0)
    ce = cross_entropy(big_s, np.arange(6), 0.1)
    for value in (kl, ce):
        assert np.all(np.isfinite(np.asarray(value)))
    # equal to the computation on max-shifted logits (float64 reference on the same inputs)
    np.testing.assert_allclose(kl, np_kl(big_s, big_t, 4.0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ce, np_ce(big_s, np.arange(6), 0.1), rtol=1e-4, atol=1e-3)
    grads = jax.grad(lambda a, b: jnp.sum(kl_divergence(a, b, 4.0)), argnums=(0, 1))(big_s, big_t)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_bf16_inputs_computed_in_float32(logits):
    s, t = logits
    got = kl_divergence(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), 4.0)
    assert got.dtype == jnp.float32


def test_gradients_check_grads(logits):
    s, t = logits
    labels = jnp.array([0, 3, 9, 2, 2, 5])
    with enable_x64(True):
        s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
        jax.test_util.check_grads(lambda a, b: kl_divergence(a, b, 4.0), (s64, t64), order=1, modes=("rev",))
        jax.test_util.check_grads(lambda a: cross_entropy(a, labels, 0.1), (s64,), order=1, modes=("rev",))
        jax.test_util.check_grads(lambda a: cross_entropy(a, labels), (s64,), order=1, modes=("rev",))


def test_kl_gradient_closed_form(logits):
    """d/ds sum KL_T = T * (softmax(s/T) - softmax(t/T))."""
    s, t = logits
    temp = 4.0
    g = jax.grad(lambda a: jnp.sum(kl_divergence(a, t, temp)))(s)
    ref = temp * (np.exp(np_log_softmax(s / temp)) - np.exp(np_log_softmax(t / temp)))
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)


def test_invalid_arguments_raise(logits):
    s, t = logits
    with pytest.raises(ValueError, match="temperature"):
        kl_divergence(s, t, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(s, t[:, :5])
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(s, np.zeros(6, np.int32), 1.5)
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(s, np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="shape"):
        cross_entropy(s, np.zeros(5, np.int32))
