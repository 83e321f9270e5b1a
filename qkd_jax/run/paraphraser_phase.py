"""A 'paraphraser' phase: Factor Transfer's paraphraser trained alone on the frozen teacher.

Released kaiqi123/SQAKD CIFAR/utils_distill.py ``init`` ('factor'): the teacher in eval mode,
``Paraphraser(feat_t[-2].shape)`` trained for ``init_epochs`` with MSE(reconstruction, feat_t[-2])
by SGD (momentum, weight decay; lr 0.01 for CIFAR ResNets), here the phase's `weights` group.
Checkpointed every epoch (and on SIGTERM/SIGINT) and resumed like the other phases; its result's
``student`` holds ``{'params': paraphraser}``, which a feature='factor' phase (``aux_from``)
freezes in its auxiliary state. Runs on one device of one process (jit, no data parallelism;
several processes are refused): the paraphraser is small and this phase is short.
"""

from __future__ import annotations

import jax

from qkd_jax.distill.factor import paraphraser_loss
from qkd_jax.distill.heads import Paraphraser
from qkd_jax.models.features import apply_with_features
from qkd_jax.run.context import PhaseResult, RunContext, console
from qkd_jax.run.finite import check_finite, checkpoint_advice
from qkd_jax.run.interrupt import Interrupted, stop_requested
from qkd_jax.run.loaders import train_loader
from qkd_jax.run.plan import PhasePlan
from qkd_jax.run.states import checkpoint_meta, teacher_variables
from qkd_jax.train.checkpoint import PhaseCheckpointer
from qkd_jax.train.optim import group_transform
from qkd_jax.train.state import TrainState, create_train_state


def teacher_map(ctx: RunContext, t_vars: dict, images: jax.Array) -> jax.Array:
    """The frozen teacher's feats[-2] (eval mode): what the paraphraser reconstructs."""
    _, feats = apply_with_features(ctx.network("teacher").local_model, t_vars, images)
    return jax.lax.stop_gradient(feats[-2])


def _initial_state(ctx: RunContext, plan: PhasePlan, t_vars: dict) -> TrainState:
    loader = train_loader(ctx, plan.batch_size, None, plan.seed + 104729, labels=False, sharded=False)
    f_t = teacher_map(ctx, t_vars, jax.numpy.asarray(next(iter(loader))["image"]))
    params = Paraphraser().init(jax.random.key(plan.seed), f_t)["params"]
    tx = group_transform(plan.weights, steps_per_epoch=plan.steps_per_epoch, total_steps=max(1, plan.total_steps))
    return create_train_state(apply_fn=Paraphraser().apply, variables={"params": params}, tx=tx,
                              rng=jax.random.key(plan.seed))


def run_paraphraser(ctx: RunContext, plan: PhasePlan, ckpt: PhaseCheckpointer) -> PhaseResult:
    name = plan.name
    if jax.process_count() > 1:
        raise NotImplementedError(f"phases.{name}: the paraphraser phase runs in one process only (no data "
                                  f"parallelism); train it in a single-process run and reuse its workdir.")
    t_vars = teacher_variables(ctx, plan.teacher_from)
    state = _initial_state(ctx, plan, t_vars)
    restored = ckpt.restore(state, mesh=None)
    data_state = None

    def result(s: TrainState) -> PhaseResult:
        return PhaseResult(name=name, kind=plan.kind, student={"params": jax.device_get(s.params)}, teacher=None,
                           eval={}, eval_history=[], warnings=[])

    if restored is not None:
        state, data_state, meta = restored
        if meta.get("completed"):
            console(f"[{name}] already completed at step {meta['step']}: read from {ckpt.directory}")
            return result(state)
        console(f"[{name}] resuming from step {meta['step']} ({ckpt.directory})")
    start, total, spe = int(jax.device_get(state.step)), plan.total_steps, plan.steps_per_epoch
    ctx.writer.drop_after(name, start if restored is not None else -1)
    iterator = iter(train_loader(ctx, plan.batch_size, plan.epochs, plan.seed, labels=False))
    if data_state is not None:
        iterator.set_state(data_state)

    @jax.jit
    def step(s: TrainState, teacher: dict, images: jax.Array):
        loss, grads = jax.value_and_grad(paraphraser_loss)(s.params, teacher_map(ctx, teacher, images))
        updates, opt_state = s.tx.update(grads, s.opt_state, s.params)
        return s.replace(step=s.step + 1, params=jax.tree.map(lambda p, u: p + u, s.params, updates),
                         opt_state=opt_state), {"loss": loss}

    console(f"[{name}] paraphraser on the teacher's feats[-2] (MSE): {plan.epochs} epochs x {spe} steps")
    metrics = None

    def save(done: int, completed: bool) -> None:
        check_finite(jax.device_get(metrics), name, done, lambda: checkpoint_advice(name, ckpt.directory, ckpt.steps()))
        ckpt.save(state, meta=checkpoint_meta(ctx, plan, completed=completed), data_state=iterator.get_state())

    for i in range(start, total):
        state, metrics = step(state, t_vars, jax.numpy.asarray(next(iterator)["image"]))
        done = i + 1
        if done % plan.log_every_steps == 0 or done == total:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            ctx.writer.write(name, done, "train", values)
            console(f"[{name}] step {done}/{total}: loss {values['loss']:.5f}")
        if done != total and (done % plan.checkpoint_every_steps == 0 or done % spe == 0):
            save(done, completed=False)
        if stop_requested() and done != total:
            save(done, completed=False)
            raise Interrupted(stop_requested(), name, done, total)
    if metrics is not None:
        save(total, completed=True)
    else:
        ckpt.save(state, meta=checkpoint_meta(ctx, plan, completed=True), data_state=iterator.get_state())
    return result(state)
