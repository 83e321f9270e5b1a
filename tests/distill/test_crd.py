"""CRD ('crd'): two steps against a torch transcription of the released CRDLoss / ContrastMemory
(loss, gradients, memory update, Z fixed at the first step), the class-aware negative sampler,
the init checks, and identical memory banks on every replica under a named axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qkd_jax.distill import feature_losses as fl
from qkd_jax.distill.crd import crd_contrast_index
from qkd_jax.distill.feature_kd import get_feature
from qkd_jax.distill.heads import Embed
from tests.distill import torch_released as tr

N_DATA, N_CLASSES, K, DIM = 40, 4, 20, 8
LABELS = (np.arange(N_DATA) * 7) % N_CLASSES  # 10 per class, not sorted


def _feats(seed, n=6):
    rng = np.random.default_rng(seed)
    return ([jnp.asarray(rng.normal(size=(n, 12)), jnp.float32)],
            [jnp.asarray(rng.normal(size=(n, 10)), jnp.float32)])


def _crd(**kw):
    return get_feature("crd", feat_dim=DIM, nce_k=K, **kw)


def _init(crit, feats_s, feats_t):
    return crit.init(jax.random.key(4), feats_s, feats_t, num_examples=N_DATA, dataset_labels=LABELS)


def test_two_steps_equal_torch():
    crit = _crd()
    feats_s, feats_t = _feats(0)
    aux = _init(crit, feats_s, feats_t)
    params, state = aux["params"], aux["state"]
    assert float(state["z_s"]) < 0 and float(state["z_t"]) < 0
    heads = {}
    for side, dim in (("student", 12), ("teacher", 10)):
        head = tr.Embed(dim, DIM).double()
        head.linear.weight = tr.linear_weight(params[side]["embed"]["linear"]["kernel"])
        head.linear.bias = tr.param(params[side]["embed"]["linear"]["bias"])
        heads[side] = head
    mem1 = torch.tensor(np.asarray(state["memory_s"], np.float64))
    mem2 = torch.tensor(np.asarray(state["memory_t"], np.float64))
    z1 = z2 = -1.0
    for step, (seed, index) in enumerate([(0, [3, 17, 22, 9, 30, 1]), (1, [5, 17, 38, 0, 11, 26])]):
        feats_s, feats_t = _feats(seed)
        index = jnp.asarray(index, jnp.int32)
        key = jax.random.key(10 + step)

        def loss_fn(p, f, state=state, feats_t=feats_t, key=key, index=index):
            return crit.loss(p, state, [f], feats_t, rng=key, index=index)

        (value, new_state), (g_p, g_f) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, feats_s[0])

        idx = torch.tensor(np.asarray(crd_contrast_index(key, state["labels"], index, K)))
        for h in heads.values():
            h.zero_grad()
        x = tr.t(feats_s[0])
        v1 = heads["student"](x)
        v2 = heads["teacher"](torch.tensor(np.asarray(feats_t[0], np.float64)))
        out_v1, out_v2, z1, z2, mem1, mem2 = tr.contrast_memory(
            v1, v2, torch.tensor(np.asarray(index, np.int64)), idx, mem1, mem2, z1, z2, 0.1, 0.5)
        ref = tr.contrast_loss(out_v1, N_DATA) + tr.contrast_loss(out_v2, N_DATA)
        ref.backward()

        np.testing.assert_allclose(value, ref.item(), rtol=1e-5)
        np.testing.assert_allclose([new_state["z_s"], new_state["z_t"]], [z1, z2], rtol=1e-5)
        np.testing.assert_allclose(new_state["memory_s"], mem1.numpy(), atol=1e-6)
        np.testing.assert_allclose(new_state["memory_t"], mem2.numpy(), atol=1e-6)
        for side in ("student", "teacher"):  # both heads trained, as released
            w_grad = heads[side].linear.weight.grad.numpy().T
            tol = 5e-5 * np.max(np.abs(w_grad))
            np.testing.assert_allclose(g_p[side]["embed"]["linear"]["kernel"], w_grad, atol=tol)
            np.testing.assert_allclose(g_p[side]["embed"]["linear"]["bias"], heads[side].linear.bias.grad.numpy(),
                                       atol=tol)
        np.testing.assert_allclose(g_f, x.grad.numpy(), atol=5e-5 * np.max(np.abs(x.grad.numpy())))
        state = new_state
    # Z was set by the first step and kept by the second (torch: params[2:4] set once).
    assert z1 == pytest.approx(float(state["z_s"]), rel=1e-5)


def test_negatives_are_reproducible_and_from_other_classes():
    labels = jnp.asarray(LABELS, jnp.int32)
    index = jnp.asarray([0, 5, 39, 12], jnp.int32)
    a = np.asarray(crd_contrast_index(jax.random.key(1), labels, index, 30))  # all 30 other-class rows
    b = np.asarray(crd_contrast_index(jax.random.key(1), labels, index, 30))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 31)
    np.testing.assert_array_equal(a[:, 0], index)
    for row, i in zip(a, np.asarray(index)):
        negatives = row[1:]
        assert len(set(negatives)) == 30  # without replacement
        assert set(negatives) == set(np.flatnonzero(LABELS != LABELS[i]))  # exactly the other classes
        assert i not in negatives
    c = np.asarray(crd_contrast_index(jax.random.key(2), labels, index, 30))
    assert not np.array_equal(a, c)


def test_negatives_are_uniform_over_the_other_classes():
    """2000 draws of 5 of the 30 other-class rows of example 0: each row's count is binomial
    (2000, 1/6); all within 5 standard deviations, and no same-class row ever drawn."""
    labels = jnp.asarray(LABELS, jnp.int32)
    index = jnp.zeros((2000,), jnp.int32)
    draws = np.asarray(crd_contrast_index(jax.random.key(7), labels, index, 5))[:, 1:]
    counts = np.bincount(draws.ravel(), minlength=N_DATA)
    other = LABELS != LABELS[0]
    assert counts[~other].sum() == 0
    p = 5 / 30
    assert np.all(np.abs(counts[other] - 2000 * p) < 5 * np.sqrt(2000 * p * (1 - p)))


def test_init_checks():
    feats_s, feats_t = _feats(0)
    crit = _crd()
    with pytest.raises(ValueError, match="at most 30"):
        get_feature("crd", nce_k=31).init(jax.random.key(0), feats_s, feats_t, num_examples=N_DATA,
                                          dataset_labels=LABELS)
    with pytest.raises(ValueError, match="expected \\(41,\\)"):
        crit.init(jax.random.key(0), feats_s, feats_t, num_examples=41, dataset_labels=LABELS)
    with pytest.raises(ValueError, match="dataset_labels"):
        crit.init(jax.random.key(0), feats_s, feats_t, num_examples=N_DATA)
    state = _init(crit, feats_s, feats_t)["state"]
    bound = 1 / np.sqrt(DIM / 3)  # released bank init: uniform in +-1/sqrt(dim/3)
    assert state["memory_s"].shape == (N_DATA, DIM)
    assert np.abs(np.asarray(state["memory_s"])).max() <= bound
    np.testing.assert_array_equal(state["labels"], LABELS)
    with pytest.raises(ValueError, match="dataset index"):
        crit.loss({}, state, feats_s, feats_t, rng=jax.random.key(0))


def test_replicas_keep_identical_banks():
    """Under pmap with 4 replicas: every replica writes all replicas' rows, so the banks are
    bitwise identical and equal the single-device update with the whole batch; Z is the mean of
    the replicas' first-batch normalisers; each replica's loss uses that Z."""
    r, per = 4, 3
    crit = _crd()
    feats_s, feats_t = _feats(3, n=r * per)
    aux = _init(crit, feats_s, feats_t)
    params, state = aux["params"], aux["state"]
    index = jnp.asarray([3, 17, 22, 9, 30, 1, 5, 38, 0, 11, 26, 14], jnp.int32)
    keys = jax.random.split(jax.random.key(9), r)

    def run(fs, ft, idx, key):
        return crit.loss(params, state, [fs], [ft], rng=key, index=idx, axis_name="d")

    def shard(x):
        return x.reshape(r, per, *x.shape[1:])

    values, new = jax.pmap(run, axis_name="d", devices=jax.devices()[:r])(
        shard(feats_s[0]), shard(feats_t[0]), shard(index), keys)

    for name in ("memory_s", "memory_t", "z_s", "z_t", "labels"):
        for i in range(1, r):
            np.testing.assert_array_equal(new[name][i], new[name][0])
    head = Embed(DIM)
    v_s = head.apply({"params": params["student"]}, feats_s[0])
    v_t = head.apply({"params": params["teacher"]}, feats_t[0])
    np.testing.assert_allclose(new["memory_s"][0], fl.crd_memory_update(state["memory_s"], v_s, index), atol=1e-6)
    np.testing.assert_allclose(new["memory_t"][0], fl.crd_memory_update(state["memory_t"], v_t, index), atol=1e-6)
    zs = []
    idxs = []
    for i in range(r):
        rows = slice(i * per, (i + 1) * per)
        idxs.append(crd_contrast_index(keys[i], state["labels"], index[rows], K))
        zs.append(fl.crd_normalizers(v_s[rows], v_t[rows], state["memory_s"], state["memory_t"], idxs[i],
                                     n_data=N_DATA, temperature=0.1))
    z_s, z_t = np.mean([z[0] for z in zs]), np.mean([z[1] for z in zs])
    np.testing.assert_allclose([new["z_s"][0], new["z_t"][0]], [z_s, z_t], rtol=1e-5)
    for i in range(r):
        rows = slice(i * per, (i + 1) * per)
        expected = fl.crd_nce(v_s[rows], v_t[rows], state["memory_s"], state["memory_t"], idxs[i], n_data=N_DATA,
                              temperature=0.1, z_s=z_s, z_t=z_t)
        np.testing.assert_allclose(values[i], expected, rtol=1e-5)


# ----------------------------------------------------------------------------- sampler='with_replacement'

UNEVEN = np.array([2, 0, 2, 1, 2, 0, 2, 2, 3, 2, 1, 2, 0, 2, 2, 3, 2, 2])  # class sizes 3, 2, 11, 2; not sorted


def _with_replacement(key, labels, index, k):
    from qkd_jax.distill.crd import class_blocks, crd_contrast_index_with_replacement

    blocks = class_blocks(labels)
    return crd_contrast_index_with_replacement(key, jnp.asarray(labels, jnp.int32), jnp.asarray(index, jnp.int32),
                                               k, blocks["class_order"], blocks["class_start"],
                                               blocks["class_count"])


def test_with_replacement_draws_other_classes_and_keeps_the_index():
    index = np.arange(len(UNEVEN))  # every class, its block first, inside and last in class_order
    a = np.asarray(_with_replacement(jax.random.key(3), UNEVEN, index, 50))
    assert a.shape == (len(UNEVEN), 51)
    np.testing.assert_array_equal(a[:, 0], index)
    assert a.min() >= 0 and a.max() < len(UNEVEN)
    for row, i in zip(a, index):
        assert np.all(UNEVEN[row[1:]] != UNEVEN[i])
    np.testing.assert_array_equal(a, np.asarray(_with_replacement(jax.random.key(3), UNEVEN, index, 50)))


@pytest.mark.parametrize("own", [1, 0, 2, 8])  # classes 0 (first block), 1, 2 (the big one), 3 (last block)
def test_with_replacement_is_uniform_over_other_class_rows(own):
    """Pearson chi-square of the counts over the m other-class rows against uniform: 40000 draws,
    m - 1 degrees of freedom (<= 15); the 1e-4 upper tail of chi2(15) is 46.8 (the bound below is
    a looser 60, far from the ~10^3 a skipped or doubled row gives)."""
    n_draws = 40000
    draws = np.asarray(_with_replacement(jax.random.key(11), UNEVEN, np.full(n_draws // 8, own), 8))[:, 1:]
    counts = np.bincount(draws.ravel(), minlength=len(UNEVEN))
    other = UNEVEN != UNEVEN[own]
    assert counts[~other].sum() == 0
    expected = n_draws / other.sum()
    chi2 = float(((counts[other] - expected) ** 2 / expected).sum())
    assert chi2 < 60.0, chi2


def _largest_array(jaxpr) -> int:
    """The largest element count of any value in `jaxpr` and its sub-jaxprs."""
    from jax.extend import core as jcore

    biggest = 0
    for eqn in jaxpr.eqns:
        for v in list(eqn.outvars) + [x for x in eqn.invars if isinstance(x, jcore.Var)]:
            biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()), dtype=np.int64)))
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _largest_array(inner))
    return biggest


def test_with_replacement_has_no_batch_by_dataset_array():
    """The jaxpr of a step's draw at n_data = 200000, batch 8, nce_k 64: no value as large as
    batch x n_data (the 'exact' sampler's scores are), so its cost does not grow with n_data x batch."""
    from qkd_jax.distill.crd import class_blocks, crd_contrast_index_with_replacement

    n, batch, k = 200_000, 8, 64
    labels = (np.arange(n) * 7) % 100
    blocks = class_blocks(labels)
    lab, index = jnp.asarray(labels, jnp.int32), jnp.arange(batch, dtype=jnp.int32)
    fast = jax.make_jaxpr(lambda key: crd_contrast_index_with_replacement(
        key, lab, index, k, blocks["class_order"], blocks["class_start"], blocks["class_count"]))(jax.random.key(0))
    exact = jax.make_jaxpr(lambda key: crd_contrast_index(key, lab, index, k))(jax.random.key(0))
    assert _largest_array(exact.jaxpr) >= batch * n  # the check sees the 'exact' sampler's scores
    assert _largest_array(fast.jaxpr) <= max(n, batch * (k + 1))


def test_with_replacement_in_the_loss_and_its_checks():
    feats_s, feats_t = _feats(0)
    crit = _crd(sampler="with_replacement")
    state = _init(crit, feats_s, feats_t)["state"]
    order = np.asarray(state["class_order"])
    np.testing.assert_array_equal(np.sort(order), np.arange(N_DATA))
    assert np.all(np.diff(LABELS[order]) >= 0)
    np.testing.assert_array_equal(state["class_count"], [10, 10, 10, 10])
    np.testing.assert_array_equal(state["class_start"], [0, 10, 20, 30])
    params = _init(crit, feats_s, feats_t)["params"]
    index = jnp.asarray([3, 17, 22, 9, 30, 1], jnp.int32)
    value, new = crit.loss(params, state, feats_s, feats_t, rng=jax.random.key(5), index=index)
    head = Embed(DIM)
    v_s = head.apply({"params": params["student"]}, feats_s[0])
    v_t = head.apply({"params": params["teacher"]}, feats_t[0])
    idx = _with_replacement(jax.random.key(5), LABELS, index, K)
    z = fl.crd_normalizers(v_s, v_t, state["memory_s"], state["memory_t"], idx, n_data=N_DATA, temperature=0.1)
    expected = fl.crd_nce(v_s, v_t, state["memory_s"], state["memory_t"], idx, n_data=N_DATA, temperature=0.1,
                          z_s=z[0], z_t=z[1])
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    # more negatives than other-class rows is allowed with replacement, refused by 'exact'
    get_feature("crd", nce_k=31, sampler="with_replacement").init(
        jax.random.key(0), feats_s, feats_t, num_examples=N_DATA, dataset_labels=LABELS)
    with pytest.raises(ValueError, match="sampler='with_replacement'"):
        get_feature("crd", nce_k=31).init(jax.random.key(0), feats_s, feats_t, num_examples=N_DATA,
                                          dataset_labels=LABELS)
    with pytest.raises(ValueError, match="sampler='uniformly' is unknown"):
        get_feature("crd", sampler="uniformly")
