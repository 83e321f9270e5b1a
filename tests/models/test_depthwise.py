"""The shifted-product depthwise conv against XLA's grouped conv and a NumPy loop: values and
gradients, and MobileNetV2(depthwise='shifted') against the default."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.models import get_model
from qkd_jax.models.depthwise import depthwise_conv_general_dilated
from tests.x64 import enable_x64

DN = ("NHWC", "HWIO", "NHWC")


def _grouped(x, w, stride, pad):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=DN,
                                        feature_group_count=x.shape[-1])


def _shifted(x, w, stride, pad):
    return depthwise_conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=DN,
                                          feature_group_count=x.shape[-1])


def _numpy_depthwise(x, w, stride, pad):
    """Direct loop over outputs in float64: y[n, p, q, c] = sum_ij xpad[n, p s + i, q s + j, c] w[i, j, 0, c]."""
    xp = np.pad(x.astype(np.float64), ((0, 0), pad[0], pad[1], (0, 0)))
    k = w.shape[0]
    ho, wo = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    y = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    for p in range(ho):
        for q in range(wo):
            patch = xp[:, p * stride:p * stride + k, q * stride:q * stride + k, :]
            y[:, p, q, :] = np.einsum("nijc,ijc->nc", patch, w[:, :, 0, :].astype(np.float64))
    return y


@pytest.mark.parametrize("stride,pad,size",
                         [(1, ((1, 1), (1, 1)), 7), (2, ((1, 1), (1, 1)), 8), (2, ((0, 1), (1, 0)), 9)])
def test_values_and_gradients_match_the_grouped_conv(stride, pad, size):
    rng = np.random.default_rng(stride)
    x = rng.normal(size=(2, size, size, 5)).astype(np.float32)
    w = rng.normal(size=(3, 3, 1, 5)).astype(np.float32)
    ref = _numpy_depthwise(x, w, stride, pad)
    # 9 products of O(1) terms summed in float32: within 9 * 2^-24 * sum|terms| of the float64 value
    bound = 9 * 2.0**-24 * _numpy_depthwise(np.abs(x), np.abs(w), stride, pad) + 1e-6
    for fn in (_grouped, _shifted):
        assert np.all(np.abs(np.asarray(fn(x, w, stride, pad), np.float64) - ref) <= bound)
    loss = lambda fn: lambda x, w: jnp.sum(jnp.sin(fn(x, w, stride, pad)))  # noqa: E731
    g_ref = jax.grad(loss(_grouped), argnums=(0, 1))(x, w)
    g_new = jax.grad(loss(_shifted), argnums=(0, 1))(x, w)
    for a, b in zip(g_ref, g_new, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_other_convs_fall_through_to_lax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    w = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)  # 2 groups of 2 channels: not depthwise
    got = depthwise_conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, feature_group_count=2)
    want = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, feature_group_count=2)
    assert np.array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow  # whole MobileNetV2 forward and backward in float64 (about a minute)
def test_mobilenet_v2_shifted_matches_grouped():
    # In float64: through 52 training-mode BatchNorms and ReLU6 kinks, a last-bit difference in one
    # conv grows by about 1e5, so in float32 the two formulations' gradients differ by 0.6% on a
    # Zen 3 and 2.2% on a Zen 4 (the same with --xla_cpu_max_isa=AVX2 there), too close to any fixed
    # bound. In float64 the same growth leaves ~1e-11 (measured 4e-12 to 1.3e-11 on the Zen 4,
    # natively and with max ISA AVX2 and SSE4_2), so 1e-8 holds on any processor and is still eight
    # orders of magnitude below the ~100% of a wrong gradient. Float32 agreement of each conv is
    # the test above.
    with enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float64)
        grouped = get_model("mobilenet_v2", 5, dtype=jnp.float64)
        shifted = get_model("mobilenet_v2", 5, depthwise="shifted", dtype=jnp.float64)
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), jax.jit(grouped.init)(jax.random.key(0), x))

        def loss(model):
            return jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply(
                {**variables, "params": p}, x, train=True, mutable=["batch_stats"])[0] ** 2)))

        l_g, g_g = loss(grouped)(variables["params"])
        l_s, g_s = loss(shifted)(variables["params"])
    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])  # noqa: E731
    assert flat(g_g).dtype == flat(g_s).dtype == np.float64
    np.testing.assert_allclose(float(l_s), float(l_g), rtol=1e-10)
    assert np.linalg.norm(flat(g_s) - flat(g_g)) <= 1e-8 * np.linalg.norm(flat(g_g))
    with pytest.raises(ValueError, match="depthwise"):
        get_model("mobilenet_v2", 5, depthwise="fast").init(jax.random.key(0), x)
