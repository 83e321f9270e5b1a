"""CC ('correlation') and VID ('vid'): loss and gradients against torch transcriptions of the
released LinearEmbed + Correlation and VIDLoss, with the flax weights copied in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from qkd_jax.distill import feature_losses as fl
from qkd_jax.distill.feature_kd import get_feature
from tests.distill import torch_released as tr


def _normal(rng, shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def test_correlation_loss_and_gradients_equal_torch():
    rng = np.random.default_rng(0)
    feats_s = [_normal(rng, (6, 4, 4, 2)), _normal(rng, (6, 12))]
    feats_t = [_normal(rng, (6, 4, 4, 2)), _normal(rng, (6, 20))]
    crit = get_feature("correlation", feat_dim=8)
    params = crit.init(jax.random.key(2), feats_s, feats_t, num_examples=6)["params"]
    assert params["student"]["linear"]["kernel"].shape == (12, 8)
    assert params["teacher"]["linear"]["kernel"].shape == (20, 8)

    def loss_fn(p, f):
        return crit.loss(p, {}, [feats_s[0], f], feats_t, rng=jax.random.key(0))[0]

    value, (g_p, g_f) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, feats_s[1])

    heads = {}
    for side, dim in (("student", 12), ("teacher", 20)):
        head = tr.LinearEmbed(dim, 8).double()
        head.linear.weight = tr.linear_weight(params[side]["linear"]["kernel"])
        head.linear.bias = tr.param(params[side]["linear"]["bias"])
        heads[side] = head
    x = tr.t(feats_s[1])
    ref = tr.correlation(heads["student"](x), heads["teacher"](torch.tensor(np.asarray(feats_t[1], np.float64))))
    ref.backward()
    np.testing.assert_allclose(value, ref.item(), rtol=2e-5)
    for side in ("student", "teacher"):  # both heads receive gradient, as released
        w_grad = heads[side].linear.weight.grad.numpy().T
        assert np.max(np.abs(w_grad)) > 0
        np.testing.assert_allclose(g_p[side]["linear"]["kernel"], w_grad, atol=2e-5 * np.max(np.abs(w_grad)))
        np.testing.assert_allclose(g_p[side]["linear"]["bias"], heads[side].linear.bias.grad.numpy(),
                                   atol=2e-5 * np.max(np.abs(w_grad)))
    np.testing.assert_allclose(g_f, x.grad.numpy(), atol=2e-5 * np.max(np.abs(x.grad.numpy())))


def test_vid_loss_and_gradients_equal_torch():
    """Three stage pairs: student taller (student pooled), equal, teacher taller (target pooled)."""
    rng = np.random.default_rng(1)
    n = 4
    s_shapes = [(n, 8, 8, 3), (n, 8, 8, 3), (n, 4, 4, 5), (n, 2, 2, 6), (n, 6)]
    t_shapes = [(n, 8, 8, 3), (n, 4, 4, 4), (n, 4, 4, 7), (n, 4, 4, 2), (n, 2)]
    feats_s = [_normal(rng, s) for s in s_shapes]
    feats_t = [_normal(rng, s) for s in t_shapes]
    crit = get_feature("vid")
    params = crit.init(jax.random.key(3), feats_s, feats_t, num_examples=n)["params"]
    np.testing.assert_allclose(params["1"]["log_scale"], np.full(7, np.log(np.exp(5.0 - 1e-5) - 1.0)), rtol=1e-6)
    # Perturb log_scale so each channel's variance differs (the gradient path through it is checked).
    params = jax.tree.map(lambda x: x, params)
    for i in range(3):
        params[str(i)]["log_scale"] = params[str(i)]["log_scale"] + jnp.asarray(
            rng.normal(size=params[str(i)]["log_scale"].shape), jnp.float32)

    def loss_fn(p, stages):
        return crit.loss(p, {}, [feats_s[0], *stages, feats_s[-1]], feats_t, rng=jax.random.key(0))[0]

    value, (g_p, g_f) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, feats_s[1:-1])

    total = 0.0
    xs, mods = [], []
    for i, (fs, ft) in enumerate(zip(feats_s[1:-1], feats_t[1:-1])):
        m = tr.VIDLoss(fs.shape[-1], ft.shape[-1], ft.shape[-1]).double()
        p = params[str(i)]
        for j in range(3):
            m.regressor[2 * j].weight = tr.conv_weight(p["regressor"][f"conv{j}"]["kernel"])
        m.log_scale = tr.param(p["log_scale"])
        x = tr.nchw(fs)
        total = total + m(x, torch.tensor(np.transpose(np.asarray(ft, np.float64), (0, 3, 1, 2))))
        xs.append(x)
        mods.append(m)
    total.backward()
    np.testing.assert_allclose(value, total.item(), rtol=2e-5)
    for i, m in enumerate(mods):
        for j in range(3):
            ref = tr.flax_conv_grad(m.regressor[2 * j].weight.grad)
            np.testing.assert_allclose(g_p[str(i)]["regressor"][f"conv{j}"]["kernel"], ref,
                                       atol=2e-5 * np.max(np.abs(ref)) + 1e-9)
        np.testing.assert_allclose(g_p[str(i)]["log_scale"], m.log_scale.grad.numpy(), rtol=1e-4, atol=1e-7)
        ref_x = np.transpose(xs[i].grad.numpy(), (0, 2, 3, 1))
        np.testing.assert_allclose(g_f[i], ref_x, atol=2e-5 * np.max(np.abs(ref_x)))


def test_vid_regressor_init_is_torch_default_uniform():
    feats = [jnp.zeros((2, 4, 4, 64)), jnp.zeros((2, 4, 4, 64)), jnp.zeros((2, 4, 4, 64)), jnp.zeros((2, 3))]
    params = get_feature("vid").init(jax.random.key(0), feats, feats, num_examples=2)["params"]
    for name in ("conv0", "conv1", "conv2"):
        w = np.asarray(params["0"]["regressor"][name]["kernel"])
        bound = 1 / np.sqrt(64)  # 1x1 kernel, 64 input channels
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert fl.vid_log_scale_init() == np.log(np.expm1(5.0 - 1e-5))
