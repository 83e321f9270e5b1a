"""A 'teacher' or 'student' phase: build its state, resume or start, train, evaluate, checkpoint.

A phase whose newest checkpoint says `completed` is not rerun: its result is read back. An
interrupted phase resumes from its newest readable checkpoint, with the data iterator restored
so it sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

from qkd_jax.data.device_prefetch import DevicePrefetch
from qkd_jax.run import build, diagnostics_log
from qkd_jax.run.config_schema import objective_kwargs
from qkd_jax.run.context import PhaseResult, RunContext, console
from qkd_jax.run.divergence import DivergenceMonitor, loss_weight
from qkd_jax.run.evaluate import evaluate
from qkd_jax.run.finite import all_finite, check_finite, checkpoint_advice
from qkd_jax.run.interrupt import Interrupted, stop_requested
from qkd_jax.run.loaders import check_batch, preprocess, train_loader
from qkd_jax.run.plan import PhasePlan
from qkd_jax.run.report import eval_record
from qkd_jax.run.rerun import check_resume_devices
from qkd_jax.run.states import build_state, checkpoint_meta, local_state, phase_result
from qkd_jax.run.teacher_select import check_has_best, is_new_best, open_best
from qkd_jax.train import parallel
from qkd_jax.train.checkpoint import PhaseCheckpointer
from qkd_jax.train.ewgs_update import compute_ewgs_deltas
from qkd_jax.train.metrics import ProgressLine
from qkd_jax.train.optim import current_learning_rates
from qkd_jax.train.state import TrainState
from qkd_jax.train.step import train_step


def _initial_variables(ctx: RunContext, plan: PhasePlan, net: build.Network) -> dict:
    if plan.kind == "teacher":
        return build.init_variables(net.local_model, ctx.config, jax.random.key(plan.seed))
    return ctx.results[plan.init_from].student


def initial_state(ctx: RunContext, plan: PhasePlan, net: build.Network) -> TrainState:
    """The phase's fresh TrainState (before any checkpoint is restored into it)."""
    return build_state(ctx, plan, _initial_variables(ctx, plan, net), net)


def train_batches(ctx: RunContext, plan: PhasePlan):
    """The phase's training batches (this process's part), as its train step takes them."""
    return train_loader(ctx, plan.batch_size, plan.epochs, plan.seed, labels=plan.needs_labels, uint8=True,
                        with_index=plan.needs_index)


def compiled_train_step(ctx: RunContext, plan: PhasePlan):
    """The phase's train step as the loop runs it: jit(shard_map(train_step)) over the run's mesh."""
    return parallel.compile_train_step(
        functools.partial(train_step, objective=plan.objective, preprocess=preprocess(ctx)), ctx.mesh)


def run_training(ctx: RunContext, plan: PhasePlan, ckpt: PhaseCheckpointer) -> PhaseResult:
    name = plan.name
    net = ctx.network(plan.kind)
    state = initial_state(ctx, plan, net)
    restored = ckpt.restore(state, mesh=ctx.mesh)
    data_state = None
    history: list = []  # run/report.py eval records, continued from the checkpoint on resume
    ph = ctx.config.phases[name]
    monitor = DivergenceMonitor(name, build.num_classes(ctx.config),
                                loss_weight(ph.objective, objective_kwargs(ph.objective, ph)))
    if restored is not None:
        state, data_state, meta = restored
        history = list(meta.get("eval_history", []))
        monitor.warnings = list(meta.get("warnings", []))
        if meta.get("completed"):
            console(f"[{name}] already completed at step {meta['step']}: read from {ckpt.directory}")
            if plan.teacher_select == "best":
                return _best_result(ctx, plan, state, history, monitor.warnings)
            return phase_result(plan, state, meta.get("eval", {}), history, monitor.warnings)
        if plan.from_teacher_checkpoint:
            # Never train on in another run's directory.
            raise ValueError(
                f"config.teacher_checkpoint={str(plan.directory)!r} holds an unfinished "
                f"teacher phase (step {meta['step']}); finish that run first (rerun its command)."
            )
        check_resume_devices(ctx.config, plan, meta, int(ctx.mesh.devices.size))
        console(f"[{name}] resuming from step {meta['step']} ({ckpt.directory})")
    elif plan.from_teacher_checkpoint:
        raise FileNotFoundError(f"config.teacher_checkpoint={str(plan.directory)!r} holds no checkpoint")
    state = parallel.replicate(state, ctx.mesh)
    check_batch(ctx, plan.batch_size, f"phases.{name}.batch_size")
    spe, total = plan.steps_per_epoch, plan.total_steps
    start = int(jax.device_get(state.step))
    ctx.writer.drop_after(name, start if restored is not None else -1)  # each step once in metrics.jsonl
    loader = train_batches(ctx, plan)
    iterator = DevicePrefetch(iter(loader), functools.partial(parallel.shard_batch, mesh=ctx.mesh),
                              ctx.config.data.prefetch)
    if data_state is not None:
        iterator.set_state(data_state)
    p_step = compiled_train_step(ctx, plan)
    progress = ProgressLine(name, total, plan.batch_size, start_step=start)
    lr_args = dict(steps_per_epoch=spe, total_steps=max(total, 1))
    console(f"[{name}] {plan.kind}: objective {plan.objective_name}, {plan.epochs} epochs x {spe} steps, "
            f"global batch {plan.batch_size}, {ctx.mesh.devices.size} device(s)")
    metrics = None

    def advice() -> str:  # read only when a loss is not finite
        return checkpoint_advice(name, ckpt.directory, ckpt.steps())

    if start < total:
        console(f"[{name}] compiling the train step (the first step) ...")
    last_saved = start  # the step of the newest checkpoint of this phase

    def keep_if_best(ev: dict, epoch: int) -> None:
        """teacher_select='best': the epoch's state replaces <phase>/best/ when its top-1 is the highest yet."""
        if plan.teacher_select != "best" or not is_new_best(history, ev["top1"]):
            return
        best = open_best(plan.directory, read_only=False)
        try:
            best.save_only(state, meta={**checkpoint_meta(ctx, plan, completed=False, eval_metrics=ev,
                                                          eval_history=history), "best_epoch": epoch})
        finally:
            best.close()

    def save_checkpoint(done: int) -> None:
        """An unfinished checkpoint at step `done`, after checking the loss and parameters."""
        nonlocal last_saved
        check_finite(jax.device_get(metrics), name, done, advice)
        check_finite({"params": all_finite(state.params)}, name, done, advice)
        ckpt.save(state, meta=checkpoint_meta(ctx, plan, completed=False, eval_history=history,
                                              warnings=monitor.warnings), data_state=iterator.get_state())
        last_saved = done

    for step in range(start, total):
        epoch = step // spe
        if plan.hessian and step % spe == 0 and epoch > 0 and epoch % plan.hessian.every_epochs == 0:
            state = _refresh_deltas(ctx, plan, state, net, epoch)
        batch = next(iterator)  # already on the devices (DevicePrefetch)
        state, metrics = p_step(state, batch)
        done = step + 1
        if step == start:  # rate and ETA from here: compile time excluded
            jax.block_until_ready(metrics)
            progress.started(done)
        if done % plan.log_every_steps == 0 or done == total:
            values = check_finite(jax.device_get(metrics), name, done, advice)
            lrs = {k: float(v) for k, v in current_learning_rates(plan.weights, plan.quant_params, step,
                                                                  **lr_args).items()}
            ctx.writer.write(name, done, "train", {**values, **lrs})
            console(progress.line(done, values, lr=lrs["lr/weights"]))
            if warning := monitor.update(done, values["loss"]):
                _report_warning(ctx, name, done, warning, monitor)
        if diagnostics_log.due(ctx.config, plan.kind, done):  # watching only (run/diagnostics_log.py)
            diagnostics_log.log_diagnostics(ctx, plan, state, done)
        epoch_end = done % spe == 0
        if epoch_end and done != total and (done // spe) % plan.eval_every_epochs == 0:
            ev = evaluate(ctx, net.train_model, state.variables(), phase=name)
            ctx.writer.write(name, done, "eval", ev)
            keep_if_best(ev, done // spe)
            history.append(eval_record(done // spe, ev))
            if warning := monitor.evaluated(done, ev["top1"]):
                _report_warning(ctx, name, done, warning, monitor)
            console(f"[{name}] epoch {done // spe}: eval top1 {ev['top1']:.2f}% top5 {ev['top5']:.2f}%")
        if done != total and (done % plan.checkpoint_every_steps == 0 or epoch_end):
            save_checkpoint(done)
        if stop_requested() and done != total:  # SIGTERM/SIGINT: checkpoint here and stop (run/interrupt.py)
            if last_saved != done:
                save_checkpoint(done)
            raise Interrupted(stop_requested(), name, done, total)
    if metrics is not None:
        check_finite(jax.device_get(metrics), name, total, advice)
        check_finite({"params": all_finite(state.params)}, name, total, advice)
    eval_metrics = evaluate(ctx, net.train_model, state.variables(), phase=name)
    ctx.writer.write(name, total, "eval", eval_metrics)
    keep_if_best(eval_metrics, plan.epochs)
    history.append(eval_record(plan.epochs, eval_metrics))
    if warning := monitor.evaluated(total, eval_metrics["top1"]):
        _report_warning(ctx, name, total, warning, monitor)
    console(f"[{name}] done: eval top1 {eval_metrics['top1']:.2f}% top5 {eval_metrics['top5']:.2f}% "
            f"loss {eval_metrics['loss']:.4f}")
    ckpt.save(state, meta=checkpoint_meta(ctx, plan, completed=True, eval_metrics=eval_metrics,
                                          eval_history=history, warnings=monitor.warnings),
              data_state=iterator.get_state())
    if plan.teacher_select == "best":
        return _best_result(ctx, plan, state, history, monitor.warnings)
    return phase_result(plan, state, eval_metrics, history, monitor.warnings)


def _report_warning(ctx: RunContext, name: str, step: int, warning: str, monitor: DivergenceMonitor) -> None:
    """The divergence warning on the console and as a 'warning' record in metrics.jsonl."""
    console(warning)
    ctx.writer.write(name, step, "warning", monitor.record())


def _best_result(ctx: RunContext, plan: PhasePlan, template: TrainState, history: list,
                 warnings: list) -> PhaseResult:
    """The teacher phase's result under teacher_select='best': the state of <phase>/best/ (the
    evaluated epoch of highest top-1) with that epoch's eval; the history stays the whole phase's."""
    key = (f"config.teacher_checkpoint={str(plan.directory)!r}" if plan.from_teacher_checkpoint
           else f"the teacher phase {str(plan.directory)!r}")
    check_has_best(plan.directory, key)
    best = open_best(plan.directory, read_only=True)
    try:
        restored = best.restore(template, mesh=ctx.mesh)
    finally:
        best.close()
    state, _, meta = restored
    console(f"[{plan.name}] teacher_select='best': later phases read epoch {meta.get('best_epoch')} "
            f"(eval top1 {meta['eval']['top1']:.2f}%, step {meta['step']})")
    return phase_result(plan, state, meta.get("eval", {}), history, warnings)


def _refresh_deltas(ctx: RunContext, plan: PhasePlan, state: TrainState, net: build.Network, epoch: int):
    """Recomputes every layer's EWGS delta from Hessian traces on a few training batches."""
    name, h = plan.name, plan.hessian
    loader = train_loader(ctx, h.batch_size, None, plan.seed + 7919 * epoch, labels=h.objective.needs_labels,
                          sharded=False, workers=False)
    it = iter(loader)
    batches = [{k: jax.numpy.asarray(v) for k, v in next(it).items()} for _ in range(h.batches)]
    t0 = time.perf_counter()
    local = local_state(ctx, jax.device_get(state), net)
    deltas = compute_ewgs_deltas(local, batches, h.objective, jax.random.key(epoch), max_probes=h.max_probes,
                                 probe=h.probe)
    deltas = jax.device_get(deltas)
    flat = [float(v) for v in jax.tree.leaves(deltas)]
    ctx.writer.write(name, int(jax.device_get(state.step)), "ewgs_delta",
                     {"mean": float(np.mean(flat)) if flat else 0.0, "max": max(flat, default=0.0)})
    console(f"[{name}] epoch {epoch}: EWGS deltas from Hessian traces ({h.probe} probes) on {h.batches} batches "
            f"({time.perf_counter() - t0:.1f} s): mean {np.mean(flat):.3g}, max {max(flat, default=0):.3g}")
    return state.replace(quant_delta=parallel.replicate(deltas, ctx.mesh))
