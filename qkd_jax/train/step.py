"""Per-replica train and eval steps: pure functions of (state, batch).

Written in the pmap programming model: when `axis_name` is set, gradients, metrics and
BatchNorm statistics are averaged over that named axis with `lax.pmean` (the models' BatchNorm
also synchronises its batch statistics over the same axis in the forward pass). The same
function runs under `jax.shard_map` (what `qkd_jax.train.parallel` compiles) and under
`jax.pmap`; with `axis_name=None` it is a plain single-device step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from qkd_jax.models.features import read_block_outputs, read_features
from qkd_jax.models.layers import BLOCKS, FEATURES
from qkd_jax.train.state import TeacherState, TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def _pmean(tree, axis_name: Optional[str]):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _psum(tree, axis_name: Optional[str]):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def _step_rng(state: TrainState, axis_name: Optional[str]) -> jax.Array:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    return rng


def _train_rngs(rng: jax.Array) -> dict:
    """The PRNG streams of a train-mode forward: 'dropout', and 'quantize' for the stochastic
    training forward of gradient estimators (layers that use none never draw from it, so the
    numbers of every other estimator are unchanged; qkd_jax.quant.layers)."""
    return {"dropout": rng, "quantize": jax.random.fold_in(rng, 3)}


def _forward(apply_fn: Callable, variables: dict, images: jax.Array, *, train: bool, rng: jax.Array):
    """Runs a model; in train mode returns (logits, new batch_stats)."""
    if train:
        logits, mutated = apply_fn(
            variables, images, train=True, mutable=["batch_stats"], rngs=_train_rngs(rng)
        )
        return logits, mutated.get("batch_stats", {})
    return apply_fn(variables, images, train=False), variables.get("batch_stats", {})


def _feature_collections(feature: Any) -> list[str]:
    """The collections a criterion reads: FEATURES, plus BLOCKS for ``needs_blocks`` ones (CKTF)."""
    return [FEATURES] + ([BLOCKS] if getattr(feature, "needs_blocks", False) else [])


def _block_kwargs(feature: Any, mutated: Mapping, side: str) -> dict:
    """``{'blocks_<side>': (pool, per-stage block outputs)}`` for ``needs_blocks`` criteria, else {}."""
    if not getattr(feature, "needs_blocks", False):
        return {}
    return {f"blocks_{side}": read_block_outputs(mutated)}


def _forward_features(apply_fn: Callable, variables: dict, images: jax.Array, *, rng: jax.Array,
                      feature: Any):
    """A train-mode forward that also records the distillation features:
    (logits, batch_stats, features, block kwargs of the criterion's loss)."""
    logits, mutated = apply_fn(
        variables, images, train=True, mutable=["batch_stats", *_feature_collections(feature)],
        rngs=_train_rngs(rng),
    )
    return (logits, mutated.get("batch_stats", {}), read_features(mutated, feature.preact),
            _block_kwargs(feature, mutated, "s"))


def _frozen_teacher(teacher: TeacherState, images: jax.Array, feature: Any):
    """The frozen teacher's logits (and features, and block outputs for criteria that read them),
    no gradient: (logits, features or None, block kwargs)."""
    if feature is None:
        return jax.lax.stop_gradient(teacher.apply_fn(teacher.variables(), images, train=False)), None, {}
    logits, state = teacher.apply_fn(teacher.variables(), images, train=False,
                                     mutable=_feature_collections(feature))
    feats = read_features(state, feature.preact)
    blocks = {k: (pool, jax.lax.stop_gradient(stages))
              for k, (pool, stages) in _block_kwargs(feature, state, "t").items()}
    return jax.lax.stop_gradient(logits), [jax.lax.stop_gradient(f) for f in feats], blocks


def _apply_updates(params, grads, opt_state, tx: optax.GradientTransformation):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def train_step(
    state: TrainState, batch: Batch, *, objective: Any, axis_name: Optional[str] = "data",
    preprocess: Optional[Callable[[jax.Array], jax.Array]] = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer update of the student (and of the teacher when it is trainable).

    `objective(student_logits, teacher_logits, labels) -> (loss, aux)` (see qkd_jax.distill).
    With a trainable teacher (QKD co-studying) the objective must be a co-study objective
    returning `(student_loss + teacher_loss, aux)` whose stop-gradients route each part to its
    own network; both networks then run in train mode and are updated with their own optimizer.
    A frozen teacher runs in inference mode and is never differentiated.

    With a feature criterion (`objective.feature`, qkd_jax.distill.feature_kd) both networks'
    features are recorded, `objective.beta * feature.loss(...)` is added, the criterion's
    auxiliary params (`state.aux`) are updated by their own optimizer and its auxiliary state
    (e.g. CRD's memory banks) is replaced by the one the criterion returns. A criterion with
    `needs_tap` (SQuaT, qkd_jax.distill.squat_feature) runs both forwards itself (`teacher_forward`,
    `student_forward`: each network's input at its tap layer) and gets the student's and the
    teacher's quantized codes there as its features.

    `preprocess` (e.g. `qkd_jax.data.device_normalize.normalizer`) maps `batch['image']` to the
    model input on the device (uint8 batches from the host).
    """
    images = batch["image"] if preprocess is None else preprocess(batch["image"])
    labels = batch.get("label")
    if getattr(objective, "needs_labels", False) and labels is None:
        raise ValueError(
            f"objective {getattr(objective, 'name', objective)!r} needs labels but the batch has "
            f"none; load the training split with labels (data.drop_labels=False)."
        )
    rng = _step_rng(state, axis_name)
    teacher = state.teacher
    co_study = teacher is not None and teacher.trainable
    needs_teacher = getattr(objective, "needs_teacher", teacher is not None)
    if needs_teacher and teacher is None:
        raise ValueError("the objective needs a teacher but the train state has none")
    feature = getattr(objective, "feature", None)
    if feature is not None and co_study:
        raise ValueError("a feature criterion needs a frozen teacher; co-studying trains the teacher")
    index = batch.get("index")
    if feature is not None and feature.needs_index and index is None:
        raise ValueError(
            f"feature criterion {feature.name!r} needs each example's dataset index but the batch "
            f"has no 'index'; build the training loader with make_train_loader(..., with_index=True) "
            f"(the runner does so for such criteria)."
        )
    frozen_logits = t_feats = t_tap = None
    t_blocks: dict = {}
    tap = getattr(feature, "needs_tap", False)  # SQuaT: both taps recorded by method interception
    if needs_teacher and not co_study:
        if tap:
            frozen_logits, t_tap = feature.teacher_forward(teacher.apply_fn, teacher.variables(), images)
        else:
            frozen_logits, t_feats, t_blocks = _frozen_teacher(teacher, images, feature)
    aux_state = state.aux.state if state.aux is not None else {}

    def loss_fn(params, teacher_params, aux_params):
        s_vars = {**state.variables(), "params": params}
        new_aux_state = aux_state
        feats_t = t_feats
        if feature is None:
            s_logits, s_stats = _forward(state.apply_fn, s_vars, images, train=True, rng=rng)
        elif tap:
            s_logits, s_stats, s_feats, feats_t = feature.student_forward(
                state.apply_fn, s_vars, images, rngs=_train_rngs(rng), teacher_input=t_tap)
            s_blocks = {}
        else:
            s_logits, s_stats, s_feats, s_blocks = _forward_features(
                state.apply_fn, s_vars, images, rng=rng, feature=feature
            )
        t_stats = None
        t_logits = frozen_logits
        if co_study:
            t_vars = {"params": teacher_params, "batch_stats": teacher.batch_stats}
            t_logits, t_stats = _forward(
                teacher.apply_fn, t_vars, images, train=True, rng=jax.random.fold_in(rng, 1)
            )
        loss, aux = objective(s_logits, t_logits, labels)
        if feature is not None:
            f_loss, new_aux_state = feature.loss(
                aux_params, aux_state, s_feats, feats_t,
                rng=jax.random.fold_in(rng, 2), index=index, axis_name=axis_name, **s_blocks, **t_blocks,
            )
            aux = {**aux, feature.name: f_loss}
            loss = loss + objective.beta * f_loss
            aux["loss"] = loss
        return loss, (aux, s_stats, t_stats, new_aux_state)

    teacher_params = teacher.params if co_study else None
    aux_params = state.aux.params if state.aux is not None else {}
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)
    (loss, (aux, s_stats, t_stats, new_aux_state)), (s_grads, t_grads, a_grads) = grad_fn(
        state.params, teacher_params, aux_params
    )
    s_grads = _pmean(s_grads, axis_name)
    params, opt_state = _apply_updates(state.params, s_grads, state.opt_state, state.tx)
    new_aux = state.aux
    if state.aux is not None:
        a_params, a_opt = _apply_updates(state.aux.params, _pmean(a_grads, axis_name), state.aux.opt_state,
                                         state.aux.tx)
        # The criterion makes its state replica-consistent itself (e.g. CRD gathers all replicas'
        # rows before writing its banks), so no pmean here.
        new_aux = state.aux.replace(params=a_params, opt_state=a_opt, state=new_aux_state)
    new_teacher = teacher
    if co_study:
        t_grads = _pmean(t_grads, axis_name)
        t_params, t_opt = _apply_updates(teacher.params, t_grads, teacher.opt_state, teacher.tx)
        new_teacher = teacher.replace(
            params=t_params, opt_state=t_opt, batch_stats=_pmean(t_stats, axis_name)
        )
    metrics = {"loss": loss, **{k: v for k, v in aux.items() if k != "loss"}}
    metrics = _pmean(metrics, axis_name)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        batch_stats=_pmean(s_stats, axis_name),
        teacher=new_teacher,
        aux=new_aux,
    )
    return new_state, metrics


def classification_counts(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> Metrics:
    """Sums (not means) of top-1/top-5 hits and the example count, so replicas and batches add up."""
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit1 = (top5[:, 0] == labels).astype(jnp.float32)
    hit5 = jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.float32)
    return {"top1": jnp.sum(hit1 * mask), "top5": jnp.sum(hit5 * mask), "count": jnp.sum(mask)}


def eval_step(
    variables: dict, batch: Batch, *, apply_fn: Callable, axis_name: Optional[str] = "data",
    preprocess: Optional[Callable[[jax.Array], jax.Array]] = None,
) -> Metrics:
    """Inference-mode evaluation of one batch: summed top-1/top-5 hits, cross-entropy and count.

    `batch['mask']` (1 for real examples, 0 for padding) makes padded final batches count each
    example once; divide the sums by 'count' after accumulating over the whole split.
    `preprocess`: as in `train_step`.
    """
    images, labels = batch["image"], batch["label"]
    images = images if preprocess is None else preprocess(images)
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    logits = apply_fn(variables, images, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    sums = {**classification_counts(logits, labels, mask), "loss": jnp.sum(ce * mask)}
    return _psum(sums, axis_name)
