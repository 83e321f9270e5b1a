"""Factor Transfer ('factor'): the paraphraser, translator and loss against a torch transcription
of the released Paraphraser / Translator / FactorTransfer (float64), weights copied from flax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from qkd_jax.distill.factor import paraphraser_loss
from qkd_jax.distill.feature_kd import get_feature
from qkd_jax.distill.heads import Paraphraser
from tests.distill import torch_released as tr


def _nchw(x) -> torch.Tensor:
    return torch.tensor(np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


def _copy_encoder(seq, p, use_bn):
    convs = [m for m in seq if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in seq if isinstance(m, torch.nn.BatchNorm2d)]
    for i, conv in enumerate(convs):
        conv.weight = tr.conv_weight(p[f"conv{i}"]["kernel"])
        conv.bias = tr.param(p[f"conv{i}"]["bias"])
    if use_bn:
        for i, bn in enumerate(bns):
            bn.weight, bn.bias = tr.param(p[f"bn{i}"]["scale"]), tr.param(p[f"bn{i}"]["bias"])


def _torch_paraphraser(p, t_shape):
    ref = tr.Paraphraser(t_shape).double()
    _copy_encoder(ref.encoder, p["encoder"], use_bn=False)
    deconvs = [m for m in ref.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    for i, deconv in enumerate(deconvs):
        deconv.weight = tr.conv_transpose_weight(p[f"deconv{i}"]["kernel"])
        deconv.bias = tr.param(p[f"deconv{i}"]["bias"])
    return ref


def test_paraphraser_factor_reconstruction_and_loss_equal_torch():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 5, 6)), jnp.float32)
    params = Paraphraser().init(jax.random.key(0), x)["params"]
    factor, rec = Paraphraser().apply({"params": params}, x)
    assert factor.shape == (3, 5, 5, 3) and rec.shape == x.shape
    ref = _torch_paraphraser(params, (3, 6, 5, 5))
    r_factor, r_rec = ref(_nchw(x))
    np.testing.assert_allclose(factor, _nhwc(r_factor), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rec, _nhwc(r_rec), rtol=1e-4, atol=1e-5)
    r_loss = torch.nn.MSELoss()(r_rec, _nchw(x))
    np.testing.assert_allclose(paraphraser_loss(params, x), r_loss.item(), rtol=1e-4)
    # is_factor returns the encoder output alone
    np.testing.assert_array_equal(Paraphraser().apply({"params": params}, x, is_factor=True), factor)


def test_torch_default_init_bounds():
    """Each weight / bias lies within +-1/sqrt(fan_in) and spans most of it (torch's default)."""
    x = jnp.zeros((2, 4, 4, 8))
    p = Paraphraser().init(jax.random.key(1), x)["params"]
    cases = [(p["encoder"]["conv0"], 9 * 8), (p["encoder"]["conv1"], 9 * 8), (p["encoder"]["conv2"], 9 * 4),
             (p["deconv0"], 9 * 4), (p["deconv1"], 9 * 8), (p["deconv2"], 9 * 8)]
    for layer, fan_in in cases:
        bound = 1 / np.sqrt(fan_in)
        for leaf in (layer["kernel"], layer["bias"]):
            assert np.max(np.abs(leaf)) <= bound
        assert np.max(np.abs(layer["kernel"])) > 0.8 * bound


def test_factor_loss_gradients_equal_torch_and_paraphraser_frozen():
    rng = np.random.default_rng(2)
    n = 4
    feats_s = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(n, 4, 4, 3), (n, 4, 4, 5), (n, 7)]]
    feats_t = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(n, 4, 4, 3), (n, 4, 4, 6), (n, 7)]]
    crit = get_feature("factor")
    aux = crit.init(jax.random.key(3), feats_s, feats_t, num_examples=10)
    params, state = aux["params"], aux["state"]

    def loss_fn(p, s):
        return crit.loss(p, s, feats_s, feats_t, rng=jax.random.key(0))

    (value, new_state), (g_params, g_state) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, state)

    translator = tr.Translator((n, 5, 4, 4), (n, 6, 4, 4)).double()
    _copy_encoder(translator.encoder, params["translator"]["encoder"], use_bn=True)
    paraphraser = _torch_paraphraser(state["paraphraser"], (n, 6, 4, 4)).eval()
    with torch.no_grad():
        factor_t = paraphraser(_nchw(feats_t[1]), is_factor=True)
    ref = tr.factor_transfer_loss(translator(_nchw(feats_s[1])), factor_t)
    ref.backward()
    np.testing.assert_allclose(value, ref.item(), rtol=1e-4)
    convs = [m for m in translator.encoder if isinstance(m, torch.nn.Conv2d)]
    for i, conv in enumerate(convs):
        g = g_params["translator"]["encoder"][f"conv{i}"]["kernel"]
        scale = float(np.max(np.abs(conv.weight.grad.numpy())))
        np.testing.assert_allclose(g, tr.flax_conv_grad(conv.weight.grad), atol=2e-4 * scale)
    # the paraphraser is frozen: no gradient reaches it and the loss returns it unchanged
    assert all(float(jnp.max(jnp.abs(leaf))) == 0 for leaf in jax.tree_util.tree_leaves(g_state["paraphraser"]))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), new_state["paraphraser"], state["paraphraser"]))
    # the translator's BatchNorm running mean moved towards the batch mean (momentum 0.9)
    np.testing.assert_allclose(new_state["batch_stats"]["encoder"]["bn0"]["mean"],
                               translator.encoder[1].running_mean.detach().numpy(), rtol=1e-4, atol=1e-6)
