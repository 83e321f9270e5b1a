"""A phase's TrainState built from its plan, the checkpoint metadata and the result it leaves."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import optax

from qkd_jax.distill.feature_kd import FeatureKD, init_feature_aux
from qkd_jax.run import build
from qkd_jax.run.context import PhaseResult, RunContext
from qkd_jax.run.loaders import train_labels, train_loader
from qkd_jax.run.plan import PhasePlan
from qkd_jax.run.record import phase_record
from qkd_jax.train.freeze import freeze_top_level
from qkd_jax.train.optim import build_optimizer, group_transform
from qkd_jax.train.state import TrainState, create_train_state


def teacher_variables(ctx: RunContext, source: str) -> dict:
    """The teacher's variables: a teacher phase's network or a co-study phase's trained teacher."""
    result = ctx.results[source]
    return result.student if result.kind == "teacher" else result.teacher


def build_state(ctx: RunContext, plan: PhasePlan, init_vars: dict, net: build.Network) -> TrainState:
    """The phase's TrainState (`net` as the student, plus its teacher).

    A teacher is always the full-precision architecture: the FP teacher phase's network or the
    co-studied (quantization-friendly) teacher of a train_teacher phase."""
    total = max(1, plan.steps_per_epoch * plan.epochs)
    tx = build_optimizer(plan.weights, plan.quant_params, steps_per_epoch=plan.steps_per_epoch, total_steps=total,
                         quant_decay=plan.quant_decay)
    if plan.freeze:
        try:
            tx = freeze_top_level(tx, init_vars["params"], plan.freeze)
        except ValueError as err:
            raise ValueError(f"phases.{plan.name}.freeze={','.join(plan.freeze)!r}: {err}") from None
    t_net = t_vars = t_tx = None
    if plan.teacher_from:
        t_net = ctx.network("teacher")
        t_vars = teacher_variables(ctx, plan.teacher_from)
        if plan.train_teacher:
            t_spec = plan.teacher_opt
            # An FP teacher has no quantizer parameters: its 'quant' group is empty.
            t_tx = build_optimizer(t_spec, dataclasses.replace(t_spec, weight_decay=0.0),
                                   steps_per_epoch=plan.steps_per_epoch, total_steps=total)
    aux_vars = aux_tx = None
    feature = getattr(plan.objective, "feature", None)
    if feature is not None:
        aux_vars = feature_aux(ctx, plan, feature, init_vars, net, t_vars)
        if plan.aux_from:
            aux_vars = frozen_paraphraser(ctx, plan, aux_vars)
        aux_tx = aux_optimizer(plan, total)
    return create_train_state(
        apply_fn=net.train_model.apply,
        variables=init_vars,
        tx=tx,
        rng=jax.random.key(plan.seed),
        teacher_apply_fn=t_net.train_model.apply if t_net else None,
        teacher_variables=t_vars,
        teacher_tx=t_tx,
        aux_variables=aux_vars,
        aux_tx=aux_tx,
    )


def feature_aux(ctx: RunContext, plan: PhasePlan, feature: FeatureKD, init_vars: dict, net: build.Network,
                t_vars: dict) -> dict:
    """The feature criterion's auxiliary variables, sized on one training batch (eval-mode
    forwards of the student and the teacher without a device axis). The batch and the key come
    from the phase seed, so a resumed phase builds the same template."""
    loader = train_loader(ctx, plan.batch_size, None, plan.seed + 104729, labels=False, sharded=False)
    images = jax.numpy.asarray(next(iter(loader))["image"])
    return init_feature_aux(
        feature, jax.random.fold_in(jax.random.key(plan.seed), 1),
        student_apply=net.local_model.apply, student_variables=init_vars,
        teacher_apply=ctx.network("teacher").local_model.apply, teacher_variables=t_vars,
        images=images, num_examples=len(ctx.source(ctx.info.train_split)),
        dataset_labels=train_labels(ctx) if feature.needs_dataset_labels else None,
    )


def frozen_paraphraser(ctx: RunContext, plan: PhasePlan, aux_vars: dict) -> dict:
    """``aux_vars`` with the paraphraser trained by phase ``plan.aux_from`` in its state."""
    trained = ctx.results[plan.aux_from].student["params"]
    template = aux_vars["state"]["paraphraser"]
    if jax.tree.structure(trained) != jax.tree.structure(template) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(template))):
        raise ValueError(f"phases.{plan.name}.aux_from={plan.aux_from!r}: that paraphraser does not fit this "
                         f"teacher's feats[-2]; retrain it with the same teacher (config.retrain_from).")
    return {"params": aux_vars["params"], "state": {**aux_vars["state"], "paraphraser": trained}}


def aux_optimizer(plan: PhasePlan, total_steps: int) -> optax.GradientTransformation:
    """The auxiliary params' optimizer: the phase's weights group (learning rate, schedule,
    weight decay), as the released code appends them to the model's parameter group."""
    return group_transform(plan.weights, steps_per_epoch=plan.steps_per_epoch, total_steps=total_steps)


def local_state(ctx: RunContext, state: TrainState, net: build.Network) -> TrainState:
    """The same state with apply functions that need no device axis (for work outside the step)."""
    teacher = state.teacher
    if teacher is not None:
        teacher = teacher.replace(apply_fn=ctx.network("teacher").local_model.apply)
    return state.replace(apply_fn=net.local_model.apply, teacher=teacher)


def phase_result(plan: PhasePlan, state: TrainState, eval_metrics: dict,
                 eval_history: Optional[list] = None, warnings: Optional[list] = None) -> PhaseResult:
    teacher = None
    if state.teacher is not None and state.teacher.trainable:
        teacher = jax.device_get(state.teacher.variables())
    return PhaseResult(
        name=plan.name,
        kind=plan.kind,
        student=jax.device_get(state.variables()),
        teacher=teacher,
        eval=eval_metrics,
        eval_history=list(eval_history or []),
        warnings=list(warnings or []),
    )


def checkpoint_meta(ctx: RunContext, plan: PhasePlan, *, completed: bool,
                    eval_metrics: Optional[dict] = None, eval_history: Optional[list] = None,
                    warnings: Optional[list] = None) -> dict:
    """The JSON stored with each checkpoint; `record` holds the settings the phase trains with
    (compared with the config on a rerun, `run/rerun.py`)."""
    return {
        "phase": plan.name,
        "kind": plan.kind,
        "completed": completed,
        "config": ctx.config.to_json(),
        "record": phase_record(ctx.config, plan),
        # The devices the phase trained on: a resume on another count is checked (run/rerun.py:check_resume_devices).
        "device_count": int(ctx.mesh.devices.size),
        "eval": eval_metrics or {},
        "eval_history": list(eval_history or []),  # run/report.py: one record per evaluated epoch
        "warnings": list(warnings or []),  # e.g. the divergence warning (run/divergence.py)
    }
