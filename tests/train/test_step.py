"""The per-replica train/eval steps: objectives, optimizer groups, teacher handling, devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax import distill
from qkd_jax.train import parallel
from qkd_jax.train.optim import GroupSpec, build_optimizer
from qkd_jax.train.state import create_train_state
from qkd_jax.train.step import eval_step, train_step
from tests.train.toy_models import ToyQuantMLP, init_toy

LR_W, LR_Q, WD = 1e-2, 1e-4, 1e-3


def _tx():
    return build_optimizer(
        GroupSpec(optimizer="adam", learning_rate=LR_W, weight_decay=WD, eps=1e-12),
        GroupSpec(optimizer="adam", learning_rate=LR_Q, eps=1e-12),
        steps_per_epoch=10,
        total_steps=10,
    )


def _batch(n=16, labels=True, seed=5):
    rng = np.random.default_rng(seed)
    out = {"image": jnp.asarray(rng.normal(size=(n, 6)) * 2, jnp.float32)}
    if labels:
        out["label"] = jnp.asarray(rng.integers(0, 4, n), jnp.int32)
    return out


def _state(use_bn=False, axis_name=None, teacher_tx=None, tx=None):
    student = ToyQuantMLP(use_bn=use_bn, axis_name=axis_name)
    teacher = ToyQuantMLP(quantized=False, use_bn=use_bn, axis_name=axis_name)
    return create_train_state(
        apply_fn=student.apply,
        variables=init_toy(student, batch=16),
        tx=tx or _tx(),
        rng=jax.random.key(1),
        teacher_apply_fn=teacher.apply,
        teacher_variables=init_toy(teacher, key=jax.random.key(7), batch=16),
        teacher_tx=teacher_tx,
    )


def _max_diff(a, b):
    return max((float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


def test_sqakd_steps_reduce_loss_and_leave_teacher_untouched():
    state = _state()
    teacher_before = jax.device_get(state.teacher.variables())
    step = jax.jit(functools.partial(train_step, objective=distill.sqakd(), axis_name=None))
    batch = _batch(labels=False)  # SQAKD needs no labels
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert "kl" in metrics and int(state.step) == 6
    for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(state.teacher.variables())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical


def test_first_adam_step_moves_each_group_by_its_own_rate():
    """First Adam step: update = lr * g/(|g| + eps) = lr * sign(g) for g != 0 (bias-corrected)."""
    state = _state()
    objective = distill.sqakd()
    batch = _batch(labels=False)

    def loss(params):
        s = state.apply_fn({**state.variables(), "params": params}, batch["image"], train=True,
                           mutable=["batch_stats"])[0]
        t = state.teacher.apply_fn(state.teacher.variables(), batch["image"], train=False)
        return objective(s, t)[0]

    grads = jax.grad(loss)(state.params)
    new_state, _ = train_step(state, batch, objective=objective, axis_name=None)
    flat_old = jax.tree_util.tree_flatten_with_path(state.params)[0]
    flat_new = jax.tree.leaves(new_state.params)
    flat_g = jax.tree.leaves(grads)
    checked = {"weights": 0, "quant": 0}
    for (path, old), new, g in zip(flat_old, flat_new, flat_g):
        is_quant = any(getattr(k, "key", None) == "quant" for k in path)
        lr, wd = (LR_Q, 0.0) if is_quant else (LR_W, WD)
        g_total = np.asarray(g) + wd * np.asarray(old)  # coupled L2 (torch Adam weight_decay)
        expected = -lr * np.sign(g_total)
        # float32 subtraction of values near 1 carries ~1e-7 absolute error
        np.testing.assert_allclose(np.asarray(new) - np.asarray(old), expected, rtol=1e-4, atol=3e-7)
        checked["quant" if is_quant else "weights"] += int(np.sum(g_total != 0))
    assert checked["weights"] > 0 and checked["quant"] > 0


def test_objective_needing_labels_rejects_unlabelled_batch():
    with pytest.raises(ValueError, match="labels"):
        train_step(_state(), _batch(labels=False), objective=distill.task(), axis_name=None)


def test_co_study_updates_both_networks_and_tutoring_only_the_student():
    co = _state(teacher_tx=_tx())
    new_co, metrics = train_step(co, _batch(), objective=distill.co_study(), axis_name=None)
    assert _max_diff(new_co.params, co.params) > 0
    assert _max_diff(new_co.teacher.params, co.teacher.params) > 0
    assert "teacher/loss" in metrics and "student/loss" in metrics
    tu = _state()
    new_tu, _ = train_step(tu, _batch(), objective=distill.tutoring(), axis_name=None)
    assert _max_diff(new_tu.params, tu.params) > 0
    assert _max_diff(new_tu.teacher.params, tu.teacher.params) == 0


def _stack(tree, n):
    return jax.tree.map(lambda a: jnp.stack([a] * n), tree)


@pytest.mark.parametrize("use_bn", [False, True])
def test_shard_map_pmap_and_single_device_agree(use_bn):
    """8 replicas of 2 examples == one device on the 16-example batch (BatchNorm synchronised)."""
    n = jax.device_count()
    assert n == 8
    objective = distill.kd(gamma=1.0, alpha=1.0)
    batch = _batch(n=16)
    # SGD keeps the comparison linear in the gradients (Adam's first step is sign(g), which
    # amplifies float noise on near-zero gradients into +-lr).
    sgd = build_optimizer(GroupSpec(optimizer="sgd", learning_rate=0.1, momentum=0.9),
                          GroupSpec(optimizer="sgd", learning_rate=0.01),
                          steps_per_epoch=1, total_steps=1)
    state = _state(use_bn=use_bn, axis_name="data", tx=sgd)
    mesh = parallel.make_mesh()
    sharded_step = parallel.compile_train_step(functools.partial(train_step, objective=objective), mesh,
                                               donate=False)
    s_sm, m_sm = sharded_step(parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh))
    pmapped = jax.pmap(functools.partial(train_step, objective=objective, axis_name="data"),
                       axis_name="data")
    s_pm, m_pm = pmapped(_stack(state, n), jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), batch))
    single_model = ToyQuantMLP(use_bn=use_bn, axis_name=None)
    teacher_model = ToyQuantMLP(quantized=False, use_bn=use_bn, axis_name=None)
    single_state = state.replace(apply_fn=single_model.apply,
                                 teacher=state.teacher.replace(apply_fn=teacher_model.apply))
    s_1, m_1 = jax.jit(functools.partial(train_step, objective=objective, axis_name=None))(single_state, batch)
    unstack = lambda t: jax.tree.map(lambda a: a[0], t)
    for tree in ("params", "batch_stats", "opt_state"):
        assert _max_diff(getattr(s_sm, tree), unstack(getattr(s_pm, tree))) < 1e-6, tree
        assert _max_diff(getattr(s_sm, tree), getattr(s_1, tree)) < 1e-5, tree
    for key in m_1:
        np.testing.assert_allclose(float(m_sm[key]), float(m_pm[key][0]), rtol=1e-6)
        np.testing.assert_allclose(float(m_sm[key]), float(m_1[key]), rtol=1e-5)


def test_eval_step_counts_against_numpy():
    state = _state()
    rng = np.random.default_rng(3)
    batch = _batch(n=16)
    batch["mask"] = jnp.asarray(rng.integers(0, 2, 16), jnp.float32)
    out = eval_step(state.variables(), batch, apply_fn=state.apply_fn, axis_name=None)
    logits = np.asarray(state.apply_fn(state.variables(), batch["image"], train=False))
    labels, mask = np.asarray(batch["label"]), np.asarray(batch["mask"])
    top1 = (np.argmax(logits, -1) == labels) * mask
    top5 = mask  # 4 classes: every label is in the top 5 (top-5 proper: the test below)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ce = -logp[np.arange(16), labels] * mask
    np.testing.assert_allclose(float(out["top1"]), top1.sum())
    np.testing.assert_allclose(float(out["top5"]), top5.sum())
    np.testing.assert_allclose(float(out["count"]), mask.sum())
    np.testing.assert_allclose(float(out["loss"]), ce.sum(), rtol=1e-5)
    mesh = parallel.make_mesh()
    sharded = parallel.compile_eval_step(functools.partial(eval_step, apply_fn=state.apply_fn), mesh)
    out8 = sharded(parallel.replicate(state.variables(), mesh), parallel.shard_batch(batch, mesh))
    for key in out:
        np.testing.assert_allclose(float(out8[key]), float(out[key]), rtol=1e-5)


def test_classification_counts_top5_against_numpy_with_12_classes():
    # More classes than 5, so a label can fall outside the top 5; ties are avoided by distinct
    # logits. Reference: the label's rank (number of larger logits) below 1 or 5.
    from qkd_jax.train.step import classification_counts

    rng = np.random.default_rng(5)
    logits = rng.permutation(64 * 12).reshape(64, 12).astype(np.float32) / 7.0
    labels = rng.integers(0, 12, 64)
    mask = rng.integers(0, 2, 64).astype(np.float32)
    rank = (logits > logits[np.arange(64), labels][:, None]).sum(-1)
    out = classification_counts(jnp.asarray(logits), jnp.asarray(labels, jnp.int32), jnp.asarray(mask))
    assert 0 < ((rank >= 5) * mask).sum()  # some masked-in labels are outside the top 5
    assert float(out["top1"]) == ((rank == 0) * mask).sum()
    assert float(out["top5"]) == ((rank < 5) * mask).sum()
    assert float(out["count"]) == mask.sum()


def test_preprocess_maps_uint8_images_before_both_networks():
    # uint8 "images" normalised in the step give the step of the host-normalised batch (to the
    # float32 rounding of the normalisation: a few ulps in the inputs).
    from qkd_jax.data import augment
    from qkd_jax.data.device_normalize import normalizer

    rng = np.random.default_rng(11)
    raw = rng.integers(0, 256, (16, 6), dtype=np.uint8)
    labels = jnp.asarray(rng.integers(0, 4, 16), jnp.int32)
    host = {"image": jnp.asarray(augment.normalize(raw, (0.5,), (0.25,))), "label": labels}
    device = {"image": jnp.asarray(raw), "label": labels}
    objective = distill.sqakd()
    plain = jax.jit(functools.partial(train_step, objective=objective, axis_name=None))
    pre = jax.jit(functools.partial(train_step, objective=objective, axis_name=None,
                                    preprocess=normalizer((0.5,), (0.25,))))
    s1, m1 = plain(_state(), host)
    s2, m2 = pre(_state(), device)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    assert _max_diff(s1.params, s2.params) < 1e-6
    state = _state()
    e1 = eval_step(state.variables(), host, apply_fn=state.apply_fn, axis_name=None)
    e2 = eval_step(state.variables(), device, apply_fn=state.apply_fn, axis_name=None,
                   preprocess=normalizer((0.5,), (0.25,)))
    for key in e1:
        np.testing.assert_allclose(float(e2[key]), float(e1[key]), rtol=1e-5)
