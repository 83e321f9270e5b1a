"""The train step with a feature criterion: wiring of the loss, the auxiliary optimizer group, the
auxiliary state, and checkpointing of the auxiliary parts."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qkd_jax import distill
from qkd_jax.distill import feature_kd
from qkd_jax.distill import feature_losses as fl
from qkd_jax.models import get_model
from qkd_jax.models.features import apply_with_features
from qkd_jax.train.checkpoint import CorruptCheckpointError, PhaseCheckpointer
from qkd_jax.train.state import create_train_state
from qkd_jax.train.step import train_step

LR_MODEL, LR_AUX = 0.05, 0.3


def _images(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, 8, 8, 3)), jnp.float32), jnp.asarray(rng.integers(0, 10, n), jnp.int32)


def _nets():
    model = get_model("resnet20", num_classes=10)
    x, _ = _images()
    s_vars = model.init(jax.random.key(0), x, train=False)
    t_vars = model.init(jax.random.key(1), x, train=False)
    return model, s_vars, t_vars


@dataclasses.dataclass(frozen=True)
class _LinearProbe(feature_kd.FeatureKD):
    """A test criterion with one trainable matrix and a counter state: mean (f_s W - f_t)^2 on
    the embeddings; the state counts calls and keeps the last index sum."""

    name: ClassVar[str] = "probe"
    needs_index: ClassVar[bool] = True

    def init(self, rng, feats_s, feats_t, *, num_examples):
        w = jax.random.normal(rng, (feats_s[-1].shape[-1], feats_t[-1].shape[-1])) * 0.1
        return {"params": {"w": w}, "state": {"calls": jnp.zeros((), jnp.float32),
                                              "index_sum": jnp.zeros((), jnp.float32)}}

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        value = jnp.mean((feats_s[-1] @ params["w"] - feats_t[-1]) ** 2)
        return value, {"calls": state["calls"] + 1, "index_sum": jnp.sum(index).astype(jnp.float32)}


def test_attention_step_equals_the_hand_composed_loss():
    """One SGD step with kd(gamma=1, alpha=0, beta=1000, AT) moves the params by -lr * the
    gradient of CE + 1000 * sum_stages AT, composed here from the pure losses."""
    model, s_vars, t_vars = _nets()
    x, y = _images()
    objective = distill.kd(gamma=1.0, alpha=0.0, beta=1000.0, feature="attention")
    state = create_train_state(apply_fn=model.apply, variables=s_vars, tx=optax.sgd(LR_MODEL),
                               rng=jax.random.key(3), teacher_apply_fn=model.apply, teacher_variables=t_vars)
    new_state, metrics = jax.jit(functools.partial(train_step, objective=objective, axis_name=None))(
        state, {"image": x, "label": y})

    _, feats_t = jax.jit(lambda v, x: apply_with_features(model, v, x))(t_vars, x)

    def reference(params):
        variables = {**s_vars, "params": params}
        logits, feats_s = apply_with_features(model, variables, x, train=True)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        at = sum(fl.attention(s, t) for s, t in zip(feats_s[1:-1], feats_t[1:-1]))
        return ce + 1000.0 * at, (ce, at)

    (total, (ce, at)), grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(s_vars["params"])
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["attention"], at, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], total, rtol=1e-5)
    # The update of each leaf is -lr * grad, to float32 rounding of the gradient (beta = 1000
    # amplifies the attention term's rounding, so the bound is relative to the leaf's largest step).
    for old, new, g in zip(jax.tree.leaves(s_vars["params"]), jax.tree.leaves(new_state.params),
                           jax.tree.leaves(grads)):
        step = -LR_MODEL * np.asarray(g)
        np.testing.assert_allclose(np.asarray(new) - np.asarray(old), step,
                                   atol=2e-3 * float(np.max(np.abs(step))) + 1e-7)
    assert "kl" not in metrics  # alpha = 0 drops the KL term


def _probe_state(tx_aux=None):
    model, s_vars, t_vars = _nets()
    x, _ = _images()
    probe = _LinearProbe()
    aux = feature_kd.init_feature_aux(
        probe, jax.random.key(5), student_apply=model.apply, student_variables=s_vars,
        teacher_apply=model.apply, teacher_variables=t_vars, images=x, num_examples=100)
    state = create_train_state(apply_fn=model.apply, variables=s_vars, tx=optax.sgd(LR_MODEL),
                               rng=jax.random.key(3), teacher_apply_fn=model.apply, teacher_variables=t_vars,
                               aux_variables=aux, aux_tx=tx_aux or optax.sgd(LR_AUX))
    return model, s_vars, t_vars, probe, state


def test_auxiliary_params_follow_their_own_optimizer_and_state_is_replaced():
    model, s_vars, t_vars, probe, state = _probe_state()
    x, _ = _images()
    index = jnp.arange(6, dtype=jnp.int32) + 10
    objective = distill.kd(gamma=0.0, alpha=0.0, beta=2.0, feature=probe)
    assert not objective.needs_labels and objective.needs_teacher
    new_state, metrics = jax.jit(functools.partial(train_step, objective=objective, axis_name=None))(
        state, {"image": x, "index": index})

    _, feats_t = apply_with_features(model, t_vars, x)
    _, feats_s = apply_with_features(model, s_vars, x, train=True)
    w = state.aux.params["w"]
    grad_w = jax.grad(lambda w: 2.0 * jnp.mean((feats_s[-1] @ w - feats_t[-1]) ** 2))(w)
    np.testing.assert_allclose(new_state.aux.params["w"], w - LR_AUX * grad_w, rtol=1e-4, atol=1e-7)
    assert float(new_state.aux.state["calls"]) == 1.0
    assert float(new_state.aux.state["index_sum"]) == float(jnp.sum(index))
    np.testing.assert_allclose(metrics["probe"], jnp.mean((feats_s[-1] @ w - feats_t[-1]) ** 2), rtol=1e-5)


def test_missing_index_is_a_clear_error():
    _, _, _, probe, state = _probe_state()
    x, _ = _images()
    objective = distill.kd(gamma=0.0, alpha=0.0, beta=1.0, feature=probe)
    with pytest.raises(ValueError, match="needs each example's dataset index"):
        train_step(state, {"image": x}, objective=objective, axis_name=None)


def test_auxiliary_parts_round_trip_through_a_checkpoint(tmp_path):
    _, _, _, probe, state = _probe_state(tx_aux=optax.adam(1e-2))
    x, _ = _images()
    objective = distill.kd(gamma=0.0, alpha=0.0, beta=1.0, feature=probe)
    step = jax.jit(functools.partial(train_step, objective=objective, axis_name=None))
    batch = {"image": x, "index": jnp.arange(6, dtype=jnp.int32)}
    state, _ = step(state, batch)
    manager = PhaseCheckpointer(tmp_path / "phase")
    manager.save(state, meta={"completed": False})
    template = _probe_state(tx_aux=optax.adam(1e-2))[4]
    restored, _, _ = manager.restore(template)
    manager.close()
    for a, b in zip(jax.tree.leaves(state.aux), jax.tree.leaves(restored.aux)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Resuming gives exactly the step the uninterrupted state takes.
    cont, _ = step(state, batch)
    resumed, _ = step(restored, batch)
    for a, b in zip(jax.tree.leaves(cont), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_without_auxiliary_parts_is_refused(tmp_path):
    model, s_vars, t_vars, _, state = _probe_state()
    plain = create_train_state(apply_fn=model.apply, variables=s_vars, tx=optax.sgd(LR_MODEL),
                               rng=jax.random.key(3), teacher_apply_fn=model.apply, teacher_variables=t_vars)
    manager = PhaseCheckpointer(tmp_path / "phase")
    manager.save(plain, meta={"completed": False})
    with pytest.raises(CorruptCheckpointError, match="aux"):
        manager.restore(state)
    manager.close()


def test_objective_validation():
    with pytest.raises(ValueError, match="no feature criterion"):
        distill.Objective((distill.ce_term(),), feature=None, beta=1.0)
    with pytest.raises(ValueError, match="unknown feature criterion"):
        distill.kd(beta=1.0, feature="nope")
    with pytest.raises(ValueError, match="unknown option"):
        feature_kd.get_feature("rkd", w_x=1.0)
    assert distill.kd(beta=0.0, feature="attention").feature is None  # zero weight: dropped
    assert distill.kd(gamma=0.0, alpha=0.0, beta=1.0, feature="pkt").terms == ()
