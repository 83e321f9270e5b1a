"""Running one phase: build its state, resume or start, train, evaluate, checkpoint.

A phase's checkpoints live in `workdir/<phase>/`. A phase whose newest checkpoint says
`completed` is not rerun: its result is read back. An interrupted phase resumes from its newest
readable checkpoint, with the data iterator restored so it sees exactly the batches it would
have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qkd_jax import data as qdata
from qkd_jax.models import copy_teacher_to_student
from qkd_jax.quant import rules as qrules
from qkd_jax.quant.calibration import calibrate_with_report, raise_on_dead_layers
from qkd_jax.train import build, parallel
from qkd_jax.train.checkpoint import PhaseCheckpointer
from qkd_jax.train.config_schema import build_objective, group_spec
from qkd_jax.train.ewgs_update import compute_ewgs_deltas
from qkd_jax.train.metrics import MetricsWriter, ProgressLine
from qkd_jax.train.optim import build_optimizer, current_learning_rates
from qkd_jax.train.state import TrainState, create_train_state
from qkd_jax.train.step import eval_step, train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class PhaseResult:
    """What later phases read from a finished phase."""

    name: str
    kind: str
    student: dict  # params / batch_stats / quant_delta of the phase's network
    teacher: Optional[dict]  # the co-trained teacher (train_teacher phases only)
    eval: dict


@dataclasses.dataclass
class RunContext:
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    mesh: Any
    writer: MetricsWriter
    results: dict[str, PhaseResult] = dataclasses.field(default_factory=dict)
    # Compiled eval steps by model, so evaluating every few epochs compiles once per network.
    eval_steps: dict[int, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    # Opened data sources by split, shared by the loaders and the epoch-length computation.
    sources: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def info(self) -> qdata.DatasetInfo:
        return qdata.dataset_info(self.config.dataset.name)

    @property
    def data_dir(self) -> Optional[str]:
        return self.config.dataset.data_dir or None

    def source(self, split: str):
        """The dataset's random-access source for `split`, opened once per run."""
        if split not in self.sources:
            self.sources[split] = qdata.get_source(self.config.dataset.name, split, self.data_dir)
        return self.sources[split]


def _print(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


# ---------------------------------------------------------------- data


def _augment(ctx: RunContext) -> str:
    return ctx.config.dataset.augment or ctx.info.augment


def _image_size(ctx: RunContext) -> int:
    return build.input_shape(ctx.config)[0]


def _train_loader(ctx: RunContext, batch_size: int, epochs: Optional[int], seed: int, labels: bool,
                  sharded: bool = True):
    """Training batches; `sharded=False` gives every process the whole global batch (for work
    such as calibration and Hessian probes that every process repeats identically)."""
    return qdata.make_train_loader(
        ctx.source(ctx.info.train_split),
        batch_size=batch_size,
        seed=seed,
        num_epochs=epochs,
        shard_index=jax.process_index() if sharded else 0,
        shard_count=jax.process_count() if sharded else 1,
        augment=_augment(ctx),
        image_size=_image_size(ctx),
        mean=ctx.info.mean,
        std=ctx.info.std,
        drop_labels=not labels,
    )


def _eval_batches(ctx: RunContext):
    return qdata.make_eval_loader(
        ctx.source(ctx.info.eval_split),
        batch_size=ctx.config.dataset.eval_batch_size,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        augment=_augment(ctx),
        image_size=_image_size(ctx),
        mean=ctx.info.mean,
        std=ctx.info.std,
    )


def _check_batch(ctx: RunContext, batch_size: int, key: str) -> None:
    n = ctx.mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"config.{key}={batch_size} does not split over {n} devices; use a multiple of {n}."
        )


def evaluate(ctx: RunContext, model, variables: dict) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the whole eval split."""
    _check_batch(ctx, ctx.config.dataset.eval_batch_size, "dataset.eval_batch_size")
    if id(model) not in ctx.eval_steps:  # the model is kept in the value, so its id stays unique
        fn = parallel.compile_eval_step(functools.partial(eval_step, apply_fn=model.apply), ctx.mesh)
        ctx.eval_steps[id(model)] = (model, fn)
    p_eval = ctx.eval_steps[id(model)][1]
    variables = parallel.replicate(variables, ctx.mesh)
    totals: dict[str, float] = {}
    for batch in _eval_batches(ctx):
        batch = {k: v for k, v in batch.items() if k in ("image", "label", "mask")}
        sums = jax.device_get(p_eval(variables, parallel.shard_batch(batch, ctx.mesh)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = max(totals.get("count", 0.0), 1.0)
    return {
        "top1": 100.0 * totals["top1"] / count,
        "top5": 100.0 * totals["top5"] / count,
        "loss": totals["loss"] / count,
        "count": int(totals["count"]),
    }


# ---------------------------------------------------------------- phase setup


def _phase_seed(ctx: RunContext, name: str) -> int:
    index = [p.strip() for p in ctx.config.phase_order.split(",")].index(name)
    return (int(ctx.config.seed) * 1009 + index) % (2**31)


def _network_of(ctx: RunContext, kind: str) -> build.Network:
    return build.teacher_network(ctx.config) if kind == "teacher" else build.student_network(ctx.config)


def _teacher_variables(ctx: RunContext, source: str) -> dict:
    result = ctx.results[source]
    return result.student if result.kind == "teacher" else result.teacher


def _steps_per_epoch(ctx: RunContext, batch_size: int) -> int:
    # The size of the train split on disk, not DatasetInfo.num_train: the loader's epochs are
    # len(source) examples long, and a prepared/mock split may differ from the nominal size.
    return max(1, qdata.num_train_batches(len(ctx.source(ctx.info.train_split)), batch_size, 1))


def _build_state(ctx: RunContext, name: str, ph, init_vars: dict, net: build.Network) -> tuple[TrainState, Any]:
    """The phase's TrainState (`net` as the student, plus its teacher) and its objective.

    A teacher is always the full-precision architecture: the FP teacher phase's network or the
    co-studied (quantization-friendly) teacher of a train_teacher phase."""
    objective = build_objective(ph)
    spe = _steps_per_epoch(ctx, ph.batch_size)
    total = max(1, spe * ph.epochs)
    tx = build_optimizer(group_spec(ph.weights), group_spec(ph.quant_params), steps_per_epoch=spe,
                         total_steps=total)
    t_net = t_vars = t_tx = None
    if ph.teacher_from:
        t_net = build.teacher_network(ctx.config)
        t_vars = _teacher_variables(ctx, ph.teacher_from)
        if ph.train_teacher:
            t_spec = group_spec(ph.teacher_opt)
            # An FP teacher has no quantizer parameters: its 'quant' group is empty.
            t_tx = build_optimizer(t_spec, dataclasses.replace(t_spec, weight_decay=0.0),
                                   steps_per_epoch=spe, total_steps=total)
    state = create_train_state(
        apply_fn=net.train_model.apply,
        variables=init_vars,
        tx=tx,
        rng=jax.random.key(_phase_seed(ctx, name)),
        teacher_apply_fn=t_net.train_model.apply if t_net else None,
        teacher_variables=t_vars,
        teacher_tx=t_tx,
    )
    return state, objective


def _local(state: TrainState, net: build.Network, ctx: RunContext) -> TrainState:
    """The same state with apply functions that need no device axis (for work outside the step)."""
    teacher = state.teacher
    if teacher is not None:
        teacher = teacher.replace(apply_fn=build.teacher_network(ctx.config).local_model.apply)
    return state.replace(apply_fn=net.local_model.apply, teacher=teacher)


def _result(name: str, ph, state: TrainState, eval_metrics: dict) -> PhaseResult:
    teacher = None
    if state.teacher is not None and state.teacher.trainable:
        teacher = jax.device_get(state.teacher.variables())
    return PhaseResult(
        name=name,
        kind=ph.kind,
        student=jax.device_get(state.variables()),
        teacher=teacher,
        eval=eval_metrics,
    )


# ---------------------------------------------------------------- running


def run_phase(ctx: RunContext, name: str) -> PhaseResult:
    """Runs (or resumes, or reads back) phase `name` and records its result in `ctx.results`."""
    ph = ctx.config.phases[name]
    directory = ctx.workdir / name
    if ph.kind == "teacher" and ctx.config.teacher_checkpoint:
        directory = pathlib.Path(ctx.config.teacher_checkpoint)
        if not directory.exists():
            raise FileNotFoundError(
                f"config.teacher_checkpoint={str(directory)!r} does not exist; point it at the "
                f"'teacher' phase directory of an earlier run (WORKDIR/teacher) or leave it empty "
                f"to train the teacher."
            )
    ckpt = PhaseCheckpointer(directory, max_to_keep=ctx.config.keep_checkpoints)
    try:
        if ph.kind == "calibrate":
            result = _run_calibrate(ctx, name, ph, ckpt)
        else:
            result = _run_training(ctx, name, ph, ckpt)
    finally:
        ckpt.close()
    ctx.results[name] = result
    return result


def _initial_variables(ctx: RunContext, name: str, ph, net: build.Network) -> dict:
    key = jax.random.key(_phase_seed(ctx, name))
    if ph.kind == "teacher":
        return build.init_variables(net.local_model, ctx.config, key)
    return ctx.results[ph.init_from].student


def _run_calibrate(ctx: RunContext, name: str, ph, ckpt: PhaseCheckpointer) -> PhaseResult:
    net = build.student_network(ctx.config)
    key = jax.random.key(_phase_seed(ctx, name))
    template_vars = build.init_variables(net.local_model, ctx.config, key)
    state, _ = _build_state(ctx, name, ph, template_vars, net)
    restored = ckpt.restore(state, mesh=ctx.mesh)
    if restored is not None and restored[2].get("completed"):
        _print(f"[{name}] already calibrated: read from {ckpt.directory}")
        return _result(name, ph, restored[0], restored[2].get("eval", {}))
    # Resolving raises when a precision rule matches no layer (never a silently FP student).
    precision = qrules.describe(build.student_rules(ctx.config), template_vars["params"])
    if jax.process_index() == 0:
        (ctx.workdir / "precision.txt").write_text(precision + "\n")
    _print(f"[{name}] per-layer precision (also in {ctx.workdir / 'precision.txt'}):\n{precision}")
    # Empty collections left out: a network without BatchNorm (SqueezeNet) carries an empty
    # 'batch_stats' in its state but has none in its init variables.
    teacher_vars = {k: v for k, v in ctx.results[ph.init_from].student.items() if jax.tree.leaves(v)}
    variables = copy_teacher_to_student(teacher_vars, template_vars)
    q = ctx.config.quant
    variables = build.set_deltas(dict(variables), q.delta if q.estimator == "ewgs" else 0.0)
    loader = _train_loader(ctx, ph.batch_size, 1, _phase_seed(ctx, name), labels=False, sharded=False)
    batch = next(iter(loader))
    t0 = time.perf_counter()
    # One compiled forward pass (op-by-op it takes ~20 s for a ResNet-20 on CPU).
    variables, dead = jax.jit(lambda v, x: calibrate_with_report(net.local_model, v, x, train=True))(
        variables, jnp.asarray(batch["image"]))
    raise_on_dead_layers(jax.device_get(dead))
    _print(f"[{name}] calibrated every quantizer on one batch of {ph.batch_size} "
           f"({time.perf_counter() - t0:.1f} s); {q.method} W{q.w_bits}A{q.a_bits}, preset {q.preset}")
    state = state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                          quant_delta=variables.get("quant_delta", {}))
    eval_metrics = evaluate(ctx, net.train_model, state.variables())
    ctx.writer.write(name, 0, "eval", eval_metrics)
    _print(f"[{name}] eval after calibration: top1 {eval_metrics['top1']:.2f}%")
    ckpt.save(parallel.replicate(state, ctx.mesh), meta=_meta(ctx, name, completed=True, eval_metrics=eval_metrics))
    return _result(name, ph, state, eval_metrics)


def _meta(ctx: RunContext, name: str, *, completed: bool, eval_metrics: Optional[dict] = None) -> dict:
    ph = ctx.config.phases[name]
    return {
        "phase": name,
        "kind": ph.kind,
        "completed": completed,
        "config": ctx.config.to_json(),
        "eval": eval_metrics or {},
    }


def _run_training(ctx: RunContext, name: str, ph, ckpt: PhaseCheckpointer) -> PhaseResult:
    net = _network_of(ctx, ph.kind)
    init_vars = _initial_variables(ctx, name, ph, net)
    state, objective = _build_state(ctx, name, ph, init_vars, net)
    restored = ckpt.restore(state, mesh=ctx.mesh)
    data_state = None
    if restored is not None:
        state, data_state, meta = restored
        if meta.get("completed"):
            _print(f"[{name}] already completed at step {meta['step']}: read from {ckpt.directory}")
            return _result(name, ph, state, meta.get("eval", {}))
        if ph.kind == "teacher" and ctx.config.teacher_checkpoint:
            # Never train on in another run's directory.
            raise ValueError(
                f"config.teacher_checkpoint={ctx.config.teacher_checkpoint!r} holds an unfinished "
                f"teacher phase (step {meta['step']}); finish that run first (rerun its command)."
            )
        _print(f"[{name}] resuming from step {meta['step']} ({ckpt.directory})")
    elif ph.kind == "teacher" and ctx.config.teacher_checkpoint:
        raise FileNotFoundError(
            f"config.teacher_checkpoint={ctx.config.teacher_checkpoint!r} holds no checkpoint"
        )
    state = parallel.replicate(state, ctx.mesh)
    _check_batch(ctx, ph.batch_size, f"phases.{name}.batch_size")
    spe = _steps_per_epoch(ctx, ph.batch_size)
    total = spe * ph.epochs
    start = int(jax.device_get(state.step))
    loader = _train_loader(ctx, ph.batch_size, ph.epochs, _phase_seed(ctx, name), labels=objective.needs_labels)
    iterator = iter(loader)
    if data_state is not None:
        iterator.set_state(data_state)
    p_step = parallel.compile_train_step(functools.partial(train_step, objective=objective), ctx.mesh)
    q = ctx.config.quant
    hessian = ph.kind == "student" and q.estimator == "hessian"
    progress = ProgressLine(name, total, ph.batch_size, start_step=start)
    lr_args = dict(steps_per_epoch=spe, total_steps=max(total, 1))
    specs = (group_spec(ph.weights), group_spec(ph.quant_params))
    _print(f"[{name}] {ph.kind}: objective {ph.objective}, {ph.epochs} epochs x {spe} steps, "
           f"global batch {ph.batch_size}, {ctx.mesh.devices.size} device(s)")
    metrics = None
    last_saved = start
    for step in range(start, total):
        epoch = step // spe
        if hessian and step % spe == 0 and epoch > 0 and epoch % q.hessian_every_epochs == 0:
            state = _update_deltas(ctx, name, state, net, objective, epoch)
        batch = next(iterator)
        state, metrics = p_step(state, parallel.shard_batch(batch, ctx.mesh))
        done = step + 1
        if done % ctx.config.log_every_steps == 0 or done == total:
            values = _check_finite(jax.device_get(metrics), name, done, last_saved)
            lrs = {k: float(v) for k, v in current_learning_rates(*specs, step, **lr_args).items()}
            ctx.writer.write(name, done, "train", {**values, **lrs})
            _print(progress.line(done, values, lr=lrs["lr/weights"]))
        epoch_end = done % spe == 0
        if epoch_end and done != total and (done // spe) % ph.eval_every_epochs == 0:
            ev = evaluate(ctx, net.train_model, state.variables())
            ctx.writer.write(name, done, "eval", ev)
            _print(f"[{name}] epoch {done // spe}: eval top1 {ev['top1']:.2f}% top5 {ev['top5']:.2f}%")
        if done != total and (done % ctx.config.checkpoint_every_steps == 0 or epoch_end):
            _check_finite(jax.device_get(metrics), name, done, last_saved)
            _check_finite({"params": _all_finite(state.params)}, name, done, last_saved)
            ckpt.save(state, meta=_meta(ctx, name, completed=False), data_state=iterator.get_state())
            last_saved = done
    if metrics is not None:
        _check_finite(jax.device_get(metrics), name, total, last_saved)
        _check_finite({"params": _all_finite(state.params)}, name, total, last_saved)
    eval_metrics = evaluate(ctx, net.train_model, state.variables())
    ctx.writer.write(name, total, "eval", eval_metrics)
    _print(f"[{name}] done: eval top1 {eval_metrics['top1']:.2f}% top5 {eval_metrics['top5']:.2f}% "
           f"loss {eval_metrics['loss']:.4f}")
    ckpt.save(state, meta=_meta(ctx, name, completed=True, eval_metrics=eval_metrics),
              data_state=iterator.get_state())
    return _result(name, ph, state, eval_metrics)


@jax.jit
def _all_finite(tree) -> jax.Array:
    """1.0 when every element of `tree` is finite, NaN otherwise (the metric the check reads).

    The loss of the step that produced a state comes from before its update, so the
    parameters themselves are checked before a checkpoint is written."""
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
    return jnp.where(ok, 1.0, jnp.nan)


def _check_finite(values: dict, name: str, step: int, last_saved: int) -> dict:
    values = {k: float(np.asarray(v)) for k, v in values.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"phase {name!r}: {bad} at step {step}. Nothing after step {last_saved} was saved, so "
            f"rerunning resumes from that checkpoint; lower the learning rate "
            f"(config.phases.{name}.weights.learning_rate) or enable clipping "
            f"(config.phases.{name}.weights.clip_norm) before rerunning."
        )
    return values


def _update_deltas(ctx: RunContext, name: str, state: TrainState, net, objective, epoch: int):
    """Recomputes every layer's EWGS delta from Hessian traces on a few training batches."""
    q = ctx.config.quant
    loader = _train_loader(ctx, q.hessian_batch_size, None, _phase_seed(ctx, name) + 7919 * epoch,
                           labels=objective.needs_labels, sharded=False)
    it = iter(loader)
    batches = [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(q.hessian_batches)]
    t0 = time.perf_counter()
    local = _local(jax.device_get(state), net, ctx)
    deltas = compute_ewgs_deltas(local, batches, objective, jax.random.key(epoch),
                                 max_probes=q.hessian_max_probes)
    deltas = jax.device_get(deltas)
    flat = [float(v) for v in jax.tree.leaves(deltas)]
    ctx.writer.write(name, int(jax.device_get(state.step)), "ewgs_delta",
                     {"mean": float(np.mean(flat)) if flat else 0.0, "max": max(flat, default=0.0)})
    _print(f"[{name}] epoch {epoch}: EWGS deltas from Hessian traces on {q.hessian_batches} batches "
           f"({time.perf_counter() - t0:.1f} s): mean {np.mean(flat):.3g}, max {max(flat, default=0):.3g}")
    return state.replace(quant_delta=parallel.replicate(deltas, ctx.mesh))
