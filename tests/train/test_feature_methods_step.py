"""The train step with the criteria that have auxiliary parts (FitNet, CC, VID, CRD, CKTF): their params
move by the aux optimizer's step on beta * the criterion's gradient, their state is the one the
criterion returns, and the aux parts survive a checkpoint round trip."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qkd_jax import distill
from qkd_jax.distill import feature_kd
from qkd_jax.models import get_model
from qkd_jax.models.features import apply_with_features, read_block_outputs
from qkd_jax.models.layers import BLOCKS, FEATURES
from qkd_jax.train import parallel
from qkd_jax.train.checkpoint import PhaseCheckpointer
from qkd_jax.train.state import create_train_state
from qkd_jax.train.step import train_step

LR_MODEL, LR_AUX, BETA, N_DATA = 0.05, 0.3, 2.0, 20
LABELS = np.arange(N_DATA) % 10
# CKTF: 'global' pooling (the released ResNet AvgPool2d(8) needs 8x8 maps; these inputs are 8x8).
OPTIONS = {"hint": {}, "correlation": {"feat_dim": 8}, "vid": {}, "crd": {"feat_dim": 8, "nce_k": 8},
           "cktf": {"feat_dim": 8, "nce_k": 8, "pool": "global", "theta": 0.8, "beta": BETA}}


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(6, 8, 8, 3)), jnp.float32)
    index = jnp.asarray(rng.permutation(N_DATA)[:6], jnp.int32)
    return {"image": x, "label": jnp.asarray(LABELS)[index], "index": index}


def _setup(name, aux_tx=None, axis_name=None):
    model = get_model("resnet20", num_classes=10, axis_name=axis_name)
    x = _batch()["image"]
    s_vars = model.init(jax.random.key(0), x, train=False)
    t_vars = model.init(jax.random.key(1), x, train=False)
    crit = feature_kd.get_feature(name, **OPTIONS[name])
    aux = feature_kd.init_feature_aux(
        crit, jax.random.key(5), student_apply=model.apply, student_variables=s_vars, teacher_apply=model.apply,
        teacher_variables=t_vars, images=x, num_examples=N_DATA, dataset_labels=LABELS)
    state = create_train_state(apply_fn=model.apply, variables=s_vars, tx=optax.sgd(LR_MODEL), rng=jax.random.key(3),
                               teacher_apply_fn=model.apply, teacher_variables=t_vars, aux_variables=aux,
                               aux_tx=aux_tx or optax.sgd(LR_AUX))
    step = jax.jit(functools.partial(train_step, objective=distill.kd(gamma=0.0, alpha=0.0, beta=BETA, feature=crit),
                                     axis_name=axis_name))
    return model, s_vars, t_vars, crit, state, step


# CKTF's five CRDs make its compiles the slowest here (~20-40 s each): its step and checkpoint
# round trip run in the full tier; its loss composition stays fast (test_cktf_step_adds_...).
SLOW_NAMES = ("cktf",)


def _names(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_NAMES else n for n in names]


@pytest.mark.parametrize("name", _names(sorted(OPTIONS)))
def test_aux_params_take_the_aux_optimizer_step(name):
    model, s_vars, t_vars, crit, state, step = _setup(name)
    batch = _batch()
    new_state, metrics = step(state, batch)

    _, feats_t = apply_with_features(model, t_vars, batch["image"])
    _, feats_s = apply_with_features(model, s_vars, batch["image"], train=True)
    blocks = {}
    if crit.needs_blocks:  # the per-block outputs of the same forwards
        blocks["blocks_t"] = read_block_outputs(model.apply(t_vars, batch["image"], mutable=[BLOCKS])[1])
        blocks["blocks_s"] = read_block_outputs(model.apply(s_vars, batch["image"], train=True,
                                                            mutable=["batch_stats", FEATURES, BLOCKS])[1])
    # The key the step hands the criterion: fold_in(fold_in(base, step 0), 2).
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0), 2)

    def reference(p):
        return crit.loss(p, state.aux.state, feats_s, feats_t, rng=key, index=batch["index"], **blocks)

    (value, ref_state), grads = jax.value_and_grad(reference, has_aux=True)(state.aux.params)
    np.testing.assert_allclose(metrics[name], value, rtol=1e-4)
    moved = 0
    for old, new, g in zip(jax.tree.leaves(state.aux.params), jax.tree.leaves(new_state.aux.params),
                           jax.tree.leaves(grads)):
        expected = -LR_AUX * BETA * np.asarray(g)
        np.testing.assert_allclose(np.asarray(new) - np.asarray(old), expected,
                                   atol=1e-3 * float(np.max(np.abs(expected))) + 1e-7)
        moved += int(np.any(np.asarray(new) != np.asarray(old)))
    assert moved == len(jax.tree.leaves(grads))  # every auxiliary parameter is trained
    for a, b in zip(jax.tree.leaves(new_state.aux.state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["hint", "crd"])
def test_two_replicas_keep_the_aux_parts_of_one_device(name):
    """shard_map over 2 devices (synchronised BatchNorm) against one device on the whole batch:
    the FitNet regressor and its BatchNorm statistics take the same step, CRD's banks get the
    same rows (its negatives, hence Z and the loss, are drawn per replica and differ)."""
    *_, single, single_step = _setup(name)
    crit, sharded = _setup(name, axis_name="data")[3:5]
    mesh = parallel.make_mesh(jax.devices()[:2])
    sharded_step = parallel.compile_train_step(
        functools.partial(train_step, objective=distill.kd(gamma=0.0, alpha=0.0, beta=BETA, feature=crit)), mesh,
        donate=False)
    batch = _batch()
    one, _ = single_step(single, batch)
    two, _ = sharded_step(parallel.replicate(sharded, mesh), parallel.shard_batch(batch, mesh))
    if name == "hint":
        pairs = [(one.aux.params, two.aux.params), (one.aux.state, two.aux.state)]
    else:
        pairs = [({k: one.aux.state[k] for k in ("memory_s", "memory_t", "labels")},
                  {k: two.aux.state[k] for k in ("memory_s", "memory_t", "labels")})]
    for a_tree, b_tree in pairs:
        for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    if name == "crd":  # the banks moved (rows of the batch only)
        changed = np.flatnonzero(np.any(np.asarray(two.aux.state["memory_s"]) != np.asarray(sharded.aux.state["memory_s"]),
                                        axis=1))
        np.testing.assert_array_equal(changed, np.sort(np.asarray(batch["index"])))


@pytest.mark.parametrize("name", _names(["hint", "crd", "cktf"]))
def test_aux_state_round_trips_through_a_checkpoint(name, tmp_path):
    _, _, _, _, state, step = _setup(name, aux_tx=optax.adam(1e-2))
    batch = _batch()
    state, _ = step(state, batch)
    manager = PhaseCheckpointer(tmp_path / "phase")
    manager.save(state, meta={"completed": False})
    restored, _, _ = manager.restore(_setup(name, aux_tx=optax.adam(1e-2))[4])
    manager.close()
    for a, b in zip(jax.tree.leaves(state.aux), jax.tree.leaves(restored.aux)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cont, _ = step(state, _batch(1))
    resumed, _ = step(restored, _batch(1))
    for a, b in zip(jax.tree.leaves(cont), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_crd_without_dataset_labels_is_a_clear_error():
    model = get_model("resnet20", num_classes=10)
    x = _batch()["image"]
    v = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="needs the training set's labels"):
        feature_kd.init_feature_aux(feature_kd.get_feature("crd"), jax.random.key(0), student_apply=model.apply,
                                    student_variables=v, teacher_apply=model.apply, teacher_variables=v, images=x,
                                    num_examples=N_DATA)


def test_cktf_step_adds_beta_l_crd_plus_theta_l_st():
    """The logged loss is gamma * CE + beta * L_crd + theta * L_st (the criterion returns
    L_crd + theta / beta * L_st and the step multiplies by beta)."""
    model, s_vars, t_vars, crit, state, _ = _setup("cktf")
    step = jax.jit(functools.partial(train_step, objective=distill.kd(gamma=1.0, alpha=0.0, beta=BETA, feature=crit),
                                     axis_name=None))
    batch = _batch()
    _, metrics = step(state, batch)
    _, feats_t = apply_with_features(model, t_vars, batch["image"])
    _, feats_s = apply_with_features(model, s_vars, batch["image"], train=True)
    blocks_t = read_block_outputs(model.apply(t_vars, batch["image"], mutable=[BLOCKS])[1])
    blocks_s = read_block_outputs(model.apply(s_vars, batch["image"], train=True, mutable=["batch_stats", BLOCKS])[1])
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0), 2)
    l_crd, l_st, _ = crit.terms(state.aux.params, state.aux.state, feats_s, feats_t, rng=key, index=batch["index"],
                                blocks_s=blocks_s, blocks_t=blocks_t)
    assert len(state.aux.state) == 1 + 5  # labels + stem, 3 stages, embedding banks
    np.testing.assert_allclose(metrics["loss"], metrics["ce"] + BETA * l_crd + 0.8 * l_st, rtol=1e-5)
