"""FitNet ('hint'): loss, gradients and BatchNorm state against a torch transcription of the
released ConvReg + MSE, in each of ConvReg's three cases; torch-default initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qkd_jax.distill.feature_kd import get_feature
from qkd_jax.distill.heads import ConvReg
from tests.distill import torch_released as tr


def _feats(n, s_hw, s_c, t_hw, t_c, seed=0):
    rng = np.random.default_rng(seed)
    # [stem, stage1, stage2 (the hint layer), embedding]
    f_s = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in
           [(n, 8, 8, 3), (n, 8, 8, 3), (n, s_hw, s_hw, s_c), (n, 5)]]
    f_t = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in
           [(n, 8, 8, 3), (n, 8, 8, 3), (n, t_hw, t_hw, t_c), (n, 5)]]
    return f_s, f_t


# (student H, teacher H): conv stride 2, conv-transpose, valid conv (kernel 3), valid conv (1x1).
CASES = [(8, 4), (4, 8), (6, 4), (4, 4)]


@pytest.mark.parametrize("s_hw,t_hw", CASES)
def test_hint_loss_gradients_and_batch_stats_equal_torch(s_hw, t_hw):
    n, s_c, t_c = 5, 3, 4
    feats_s, feats_t = _feats(n, s_hw, s_c, t_hw, t_c)
    crit = get_feature("hint")
    aux = crit.init(jax.random.key(1), feats_s, feats_t, num_examples=10)
    params, state = aux["params"], aux["state"]

    def loss_fn(p, f):
        fs = list(feats_s)
        fs[2] = f
        return crit.loss(p, state, fs, feats_t, rng=jax.random.key(0))

    (value, new_state), (g_params, g_feat) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, feats_s[2])

    reg = tr.ConvReg((n, s_c, s_hw, s_hw), (n, t_c, t_hw, t_hw)).double()
    p = params["regressor"]
    transpose = 2 * s_hw == t_hw
    reg.conv.weight = (tr.conv_transpose_weight if transpose else tr.conv_weight)(p["conv"]["kernel"])
    reg.conv.bias = tr.param(p["conv"]["bias"])
    reg.bn.weight, reg.bn.bias = tr.param(p["bn"]["scale"]), tr.param(p["bn"]["bias"])
    x = tr.nchw(feats_s[2])
    ref = tr.hint_loss(reg(x), torch.tensor(np.transpose(np.asarray(feats_t[2], np.float64), (0, 3, 1, 2))))
    ref.backward()

    np.testing.assert_allclose(value, ref.item(), rtol=2e-5)
    to_flax = tr.flax_conv_transpose_grad if transpose else tr.flax_conv_grad
    scale = float(np.max(np.abs(reg.conv.weight.grad.numpy())))
    np.testing.assert_allclose(g_params["regressor"]["conv"]["kernel"], to_flax(reg.conv.weight.grad),
                               atol=2e-5 * scale)
    np.testing.assert_allclose(g_params["regressor"]["conv"]["bias"], reg.conv.bias.grad.numpy(), atol=2e-5 * scale)
    np.testing.assert_allclose(g_params["regressor"]["bn"]["scale"], reg.bn.weight.grad.numpy(), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(g_params["regressor"]["bn"]["bias"], reg.bn.bias.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_feat, np.transpose(x.grad.numpy(), (0, 2, 3, 1)),
                               atol=2e-5 * float(np.max(np.abs(x.grad.numpy()))))
    # Running statistics (momentum 0.1 from mean 0, var 1); flax averages the biased batch
    # variance where torch uses the unbiased one, so the variance is checked against NumPy.
    conv_out = reg.conv(x).detach().numpy()
    bs = new_state["batch_stats"]["bn"]
    np.testing.assert_allclose(bs["mean"], 0.1 * conv_out.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bs["var"], 0.9 + 0.1 * conv_out.var(axis=(0, 2, 3)), rtol=1e-4)


@pytest.mark.parametrize("s_hw,t_hw,fan_in", [(8, 4, 9 * 6), (4, 8, 16 * 32), (6, 4, 9 * 6)])
def test_regressor_init_is_torch_default_uniform(s_hw, t_hw, fan_in):
    """Weights and biases uniform in +-1/sqrt(fan_in) (torch's fan_in of ConvTranspose2d is
    out_channels * 16): every value inside the bound and the extremes close to it."""
    x = jnp.zeros((2, s_hw, s_hw, 6))
    params = ConvReg((t_hw, t_hw, 32)).init(jax.random.key(0), x)["params"]
    bound = 1 / np.sqrt(fan_in)
    for leaf in (params["conv"]["kernel"], params["conv"]["bias"]):
        a = np.abs(np.asarray(leaf))
        assert a.max() <= bound and a.max() > 0.8 * bound
    w = np.asarray(params["conv"]["kernel"]).ravel()
    assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound  # uniform std = bound / sqrt(3)
    np.testing.assert_array_equal(params["bn"]["scale"], 1.0)
    np.testing.assert_array_equal(params["bn"]["bias"], 0.0)


def test_hint_layer_errors():
    feats_s, feats_t = _feats(2, 2, 3, 8, 4)
    with pytest.raises(ValueError, match="smaller than the teacher"):
        get_feature("hint").init(jax.random.key(0), feats_s, feats_t, num_examples=4)
    with pytest.raises(ValueError, match="non-spatial"):
        get_feature("hint", hint_layer=3).init(jax.random.key(0), feats_s, feats_t, num_examples=4)
    with pytest.raises(ValueError, match="out of range"):
        get_feature("hint", hint_layer=7).init(jax.random.key(0), feats_s, feats_t, num_examples=4)
