"""CKTF ('cktf', the released 'crdst') against a torch transcription of the released ST.py
SimilarityTransfer + get_loss_crdst + CRDLoss: values, gradients and bank updates for each
selection rule and both poolings (with the student zero-padded and cropped on the channel axis),
the selection's tie rule, 'Random', finiteness at zero features in float32 and float64, and the
one-line errors."""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qkd_jax.distill import cktf
from qkd_jax.distill.crd import crd_contrast_index
from qkd_jax.distill.feature_kd import get_feature
from tests.distill import torch_released as tr
from tests.x64 import enable_x64

N, N_DATA, N_CLASSES, K, DIM = 6, 40, 4, 20, 8
LABELS = (np.arange(N_DATA) * 7) % N_CLASSES
INDEX = np.array([3, 17, 22, 9, 30, 1])


class SimilarityTransfer(nn.Module):
    """Transcribed from the released CIFAR/distiller_zoo/ST.py (forward and its helpers)."""

    def __init__(self, method, model_s):
        super().__init__()
        self.method = method
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1)) if "vgg" in model_s else nn.AvgPool2d(8)
        self.chosen = []

    def forward(self, block_out_s, block_out_t):
        return [self.st_loss_each_group(s, t) for s, t in zip(block_out_s, block_out_t)]

    def st_loss_each_group(self, s_blocks, t_blocks):
        s_norm = F.normalize(s_blocks[-1], p=2, dim=0)
        t_norm_dict, simi_dict = {}, {}
        for i in range(len(t_blocks)):
            t_norm = F.normalize(t_blocks[i], p=2, dim=0)
            t_norm_dict[i] = t_norm
            if s_norm.shape != t_norm.shape:
                s_norm = self.zero_pad_on_filter(s_norm, s_norm.shape[1], t_norm.shape[1])
            assert t_norm.shape == s_norm.shape
            simi_dict[i] = self.cosineSimilarity(s_norm, t_norm)
        if self.method == "Last":
            max_key = len(t_blocks) - 1
        elif self.method == "Smallest":
            max_key = sorted(simi_dict.items(), key=lambda x: x[1], reverse=True).pop()[0]
        elif self.method == "Largest":
            max_key = sorted(simi_dict.items(), key=lambda x: x[1], reverse=False).pop()[0]
        elif self.method == "First":
            max_key = 0
        else:
            max_key = random.randint(0, len(t_blocks) - 1)
        self.chosen.append(max_key)
        t_norm_mapped = t_norm_dict[max_key]
        s_norm_temp = self.avgpool(s_norm)
        s_norm = s_norm_temp.view(s_norm_temp.size(0), -1)
        t_norm_mapped_temp = self.avgpool(t_norm_mapped)
        return s_norm, t_norm_mapped_temp.view(t_norm_mapped_temp.size(0), -1)

    def cosineSimilarity(self, x1, x2):
        x1_sqrt = torch.sqrt(torch.sum(x1 ** 2))
        x2_sqrt = torch.sqrt(torch.sum(x2 ** 2))
        return torch.div(torch.sum(x1 * x2), max(x1_sqrt * x2_sqrt, 1e-8))

    def zero_pad_on_filter(self, inputs, in_filter, out_filter):
        paddings = (0, 0, 0, 0, (out_filter - in_filter) // 2, (out_filter - in_filter) // 2, 0, 0)
        return F.pad(inputs, paddings)


def _arrays(seed):
    """Stem (same width), stage 1 (student 4 channels, padded to the teacher's 8; teacher block 0
    close to the student, block 1 opposed), stage 2 (student 8 channels, cropped to 4), embeddings."""
    rng = np.random.default_rng(seed)
    g = lambda *s: rng.normal(size=s)  # noqa: E731
    s1 = [g(N, 16, 16, 4), g(N, 16, 16, 4)]
    padded = np.pad(s1[-1], ((0, 0), (0, 0), (0, 0), (2, 2)))
    t1 = [padded + 0.3 * g(N, 16, 16, 8), -padded + 0.3 * g(N, 16, 16, 8), g(N, 16, 16, 8)]
    s2, t2 = [g(N, 8, 8, 8)], [g(N, 8, 8, 4), g(N, 8, 8, 4)]
    return {"stem": (g(N, 16, 16, 4), g(N, 16, 16, 4)), "blocks": ([s1, s2], [t1, t2]), "emb": (g(N, 6), g(N, 10))}


def _jax(a, dtype=jnp.float32):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), a)


def _setup(arrays, method, pool, theta=0.8, beta=2.0, dtype=jnp.float32):
    crit = get_feature("cktf", feat_dim=DIM, nce_k=K, st_method=method, theta=theta, beta=beta)
    a = _jax(arrays, dtype)
    feats_s, feats_t = [a["stem"][0], a["emb"][0]], [a["stem"][1], a["emb"][1]]
    blocks_s, blocks_t = (pool, a["blocks"][0]), (pool, a["blocks"][1])
    aux = crit.init(jax.random.key(4), feats_s, feats_t, num_examples=N_DATA, dataset_labels=LABELS,
                    blocks_s=blocks_s, blocks_t=blocks_t)
    return crit, feats_s, feats_t, blocks_s, blocks_t, aux


def _nchw(x) -> torch.Tensor:
    """NHWC array -> contiguous NCHW float64 leaf tensor (the released ``view`` needs contiguity)."""
    return tr.t(np.ascontiguousarray(np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))))


def _torch_reference(arrays, method, arch, params, state, contrast_idx):
    """get_loss_crdst on the transcription: (L_crd, L_st, chosen blocks, new banks, student tensors)."""
    flat = nn.AvgPool2d(8) if "resnet" in arch else nn.AdaptiveAvgPool2d((1, 1))  # the models' flatGroupOut
    s_stem, t_stem = _nchw(arrays["stem"][0]), _nchw(arrays["stem"][1])
    s_blocks = [[_nchw(b) for b in stage] for stage in arrays["blocks"][0]]
    t_blocks = [[_nchw(b) for b in stage] for stage in arrays["blocks"][1]]
    s_emb, t_emb = tr.t(arrays["emb"][0]), tr.t(arrays["emb"][1])
    st = SimilarityTransfer(method, arch)
    inputs = [(flat(s_stem).view(N, -1), flat(t_stem).view(N, -1).detach())]
    inputs += [(s, t.detach()) for s, t in st(s_blocks, t_blocks)]
    inputs.append((s_emb, t_emb.detach()))
    y = torch.tensor(INDEX)
    idx = torch.tensor(np.asarray(contrast_idx, np.int64))
    losses, banks, heads = [], [], []
    for i, (x_s, x_t) in enumerate(inputs):
        pair = {}
        for side, x in (("student", x_s), ("teacher", x_t)):
            lin = params[f"pair{i}"][side]["embed"]["linear"]
            head = tr.Embed(np.asarray(lin["kernel"]).shape[0], DIM).double()
            head.linear.weight, head.linear.bias = tr.linear_weight(lin["kernel"]), tr.param(lin["bias"])
            pair[side] = head
        heads.append(pair)
        bank = state[f"pair{i}"]
        mem1 = torch.tensor(np.asarray(bank["memory_s"], np.float64))
        mem2 = torch.tensor(np.asarray(bank["memory_t"], np.float64))
        out1, out2, _, _, m1, m2 = tr.contrast_memory(pair["student"](x_s), pair["teacher"](x_t), y, idx, mem1, mem2,
                                                      -1.0, -1.0, 0.1, 0.5)
        losses.append(tr.contrast_loss(out1, N_DATA) + tr.contrast_loss(out2, N_DATA))
        banks.append((m1.numpy(), m2.numpy()))
    leaves = {"stem": s_stem, "blocks": s_blocks, "emb": s_emb}
    return losses[-1], sum(losses[:-1]), st.chosen, banks, heads, leaves


def _nhwc_grad(x):
    return np.transpose(x.grad.numpy(), (0, 2, 3, 1))


def _close(a, b):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, atol=5e-5 * float(np.max(np.abs(b))) + 1e-7, rtol=1e-4)


@pytest.mark.parametrize("pool, arch", [("avg8", "resnet20"), ("global", "vgg13")])
@pytest.mark.parametrize("method, chosen", [("Last", [2, 1]), ("First", [0, 0]), ("Largest", [0, None]),
                                            ("Smallest", [1, None])])
def test_values_gradients_and_banks_equal_torch(method, chosen, pool, arch):
    arrays = _arrays(0)
    crit, feats_s, feats_t, blocks_s, blocks_t, aux = _setup(arrays, method, pool)
    params, state = aux["params"], aux["state"]
    key = jax.random.key(11)

    def loss_fn(p, stem, stages, emb):
        out = crit.loss(p, state, [stem, emb], feats_t, rng=key, index=jnp.asarray(INDEX), blocks_s=(pool, stages),
                        blocks_t=blocks_t)
        return out[0], out[1]

    (value, new_state), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True)(
        params, feats_s[0], blocks_s[1], feats_s[1])
    l_crd, l_st, _ = crit.terms(params, state, feats_s, feats_t, rng=key, index=jnp.asarray(INDEX),
                                blocks_s=blocks_s, blocks_t=blocks_t)

    contrast_idx = crd_contrast_index(key, state["labels"], jnp.asarray(INDEX), K)
    ref_crd, ref_st, ref_chosen, banks, heads, leaves = _torch_reference(arrays, method, arch, params, state,
                                                                         contrast_idx)
    assert [c for c, e in zip(ref_chosen, chosen) if e is not None] == [e for e in chosen if e is not None]
    ref_total = ref_crd + (0.8 / 2.0) * ref_st  # the step multiplies by beta 2: 2 L_crd + 0.8 L_st
    ref_total.backward()
    np.testing.assert_allclose([l_crd, l_st, value], [ref_crd.item(), ref_st.item(), ref_total.item()], rtol=1e-5)
    assert len(banks) == 4 and set(new_state) == {"labels", "pair0", "pair1", "pair2", "pair3"}
    for i, (m1, m2) in enumerate(banks):
        np.testing.assert_allclose(new_state[f"pair{i}"]["memory_s"], m1, atol=1e-6)
        np.testing.assert_allclose(new_state[f"pair{i}"]["memory_t"], m2, atol=1e-6)
    g_params, g_stem, g_stages, g_emb = grads
    for i, pair in enumerate(heads):
        for side, head in pair.items():
            _close(g_params[f"pair{i}"][side]["embed"]["linear"]["kernel"], head.linear.weight.grad.numpy().T)
            _close(g_params[f"pair{i}"][side]["embed"]["linear"]["bias"], head.linear.bias.grad.numpy())
    _close(g_stem, _nhwc_grad(leaves["stem"]))
    _close(g_emb, leaves["emb"].grad.numpy())
    for g_stage, t_stage in zip(g_stages, leaves["blocks"]):
        for g, x in zip(g_stage, t_stage):
            _close(g, np.zeros_like(g) if x.grad is None else _nhwc_grad(x))  # only the last block is distilled


def test_selection_ties_go_to_the_later_block_as_sorted_pop():
    rng = np.random.default_rng(3)
    for _ in range(200):
        sims = rng.integers(0, 3, size=rng.integers(1, 6)).astype(np.float32)
        d = dict(enumerate(sims))
        largest = sorted(d.items(), key=lambda x: x[1], reverse=False).pop()[0]
        smallest = sorted(d.items(), key=lambda x: x[1], reverse=True).pop()[0]
        assert int(cktf.select_block(jnp.asarray(sims), "Largest", None)) == largest
        assert int(cktf.select_block(jnp.asarray(sims), "Smallest", None)) == smallest


def test_random_selection_is_uniform_and_drawn_from_the_key():
    draws = [int(cktf.select_block(jnp.zeros(3), "Random", jax.random.key(i))) for i in range(300)]
    assert set(draws) == {0, 1, 2} and all(60 < draws.count(k) < 140 for k in range(3))
    assert int(cktf.select_block(jnp.zeros(3), "Random", jax.random.key(5))) == draws[5]
    arrays = _arrays(1)
    crit, feats_s, feats_t, blocks_s, blocks_t, aux = _setup(arrays, "Random", "avg8")
    a = crit.loss(aux["params"], aux["state"], feats_s, feats_t, rng=jax.random.key(2), index=jnp.asarray(INDEX),
                  blocks_s=blocks_s, blocks_t=blocks_t)[0]
    b = crit.loss(aux["params"], aux["state"], feats_s, feats_t, rng=jax.random.key(2), index=jnp.asarray(INDEX),
                  blocks_s=blocks_s, blocks_t=blocks_t)[0]
    assert float(a) == float(b) and np.isfinite(float(a))


def test_pooling_is_the_released_arithmetic():
    x = np.random.default_rng(0).normal(size=(2, 19, 17, 3))
    ref = nn.AvgPool2d(8)(torch.tensor(np.transpose(x, (0, 3, 1, 2)))).reshape(2, -1).numpy()
    np.testing.assert_allclose(cktf.pool_flat(jnp.asarray(x), "avg8"), ref, rtol=1e-5, atol=1e-6)
    ref = nn.AdaptiveAvgPool2d((1, 1))(torch.tensor(np.transpose(x, (0, 3, 1, 2)))).reshape(2, -1).numpy()
    np.testing.assert_allclose(cktf.pool_flat(jnp.asarray(x), "global"), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.float64, marks=pytest.mark.slow)])  # float64: ~30 s
def test_zero_features_give_finite_values_and_gradients(dtype):
    with enable_x64(dtype == jnp.float64):
        arrays = jax.tree.map(np.zeros_like, _arrays(0))
        for method in ("Largest", "Smallest"):
            crit, feats_s, feats_t, blocks_s, blocks_t, aux = _setup(arrays, method, "avg8", dtype=dtype)

            def loss_fn(p, stem, stages, emb):
                return crit.loss(p, aux["state"], [stem, emb], feats_t, rng=jax.random.key(0),
                                 index=jnp.asarray(INDEX), blocks_s=(blocks_s[0], stages), blocks_t=blocks_t)[0]

            value, grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))(aux["params"], feats_s[0], blocks_s[1],
                                                                             feats_s[1])
            assert np.isfinite(float(value))
            assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_bad_inputs_are_one_line_errors():
    arrays = _arrays(0)
    with pytest.raises(ValueError, match="st_method"):
        get_feature("cktf", st_method="last")
    with pytest.raises(ValueError, match="pool"):
        get_feature("cktf", pool="max")
    with pytest.raises(ValueError, match="feature_options.pool='global'"):
        cktf.pool_flat(jnp.zeros((2, 4, 4, 3)), "avg8")
    with pytest.raises(ValueError, match="odd difference"):
        cktf.pad_channels(jnp.zeros((2, 8, 8, 3)), 8)
    crit, feats_s, feats_t, blocks_s, blocks_t, aux = _setup(arrays, "Last", "avg8")
    with pytest.raises(ValueError, match="block outputs"):
        crit.loss(aux["params"], aux["state"], feats_s, feats_t, rng=jax.random.key(0), index=jnp.asarray(INDEX))
    with pytest.raises(ValueError, match="stems give 8"):
        crit.init(jax.random.key(0), [jnp.zeros((N, 16, 16, 2)), feats_s[1]], feats_t, num_examples=N_DATA,
                  dataset_labels=LABELS, blocks_s=blocks_s, blocks_t=blocks_t)
