"""A 'calibrate' phase: copy the teacher into the quantized student and initialise every
quantizer parameter on one batch (no training); read back when already done."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from qkd_jax.models import copy_teacher_to_student
from qkd_jax.quant import rules as qrules
from qkd_jax.quant.calibration import (
    calibrate_with_report,
    raise_on_calibration_problems,
)
from qkd_jax.run import build
from qkd_jax.run.context import PhaseResult, RunContext, console
from qkd_jax.run.evaluate import evaluate
from qkd_jax.run.interrupt import Interrupted, stop_requested
from qkd_jax.run.loaders import train_loader
from qkd_jax.run.plan import PhasePlan
from qkd_jax.run.states import build_state, checkpoint_meta, phase_result
from qkd_jax.train import parallel
from qkd_jax.train.checkpoint import PhaseCheckpointer


def calibration_forward(ctx: RunContext, net: build.Network):
    """The jitted calibration pass `(variables, images) -> (variables, checks)` of the student.

    One compiled forward pass (op-by-op it takes ~20 s for a ResNet-20 on CPU). The released
    variant calibrates every layer on full-precision inputs (MQBench's observer pass)."""
    fp_inputs = ctx.config.quant.variant == "released"
    return jax.jit(lambda v, x: calibrate_with_report(net.local_model, v, x, train=True, fp_inputs=fp_inputs))


def run_calibrate(ctx: RunContext, plan: PhasePlan, ckpt: PhaseCheckpointer) -> PhaseResult:
    name = plan.name
    net = ctx.network("student")
    template_vars = build.init_variables(net.local_model, ctx.config, jax.random.key(plan.seed))
    state = build_state(ctx, plan, template_vars, net)
    restored = ckpt.restore(state, mesh=ctx.mesh)
    if restored is not None and restored[2].get("completed"):
        console(f"[{name}] already calibrated: read from {ckpt.directory}")
        return phase_result(plan, restored[0], restored[2].get("eval", {}))
    ctx.writer.drop_after(name, -1)  # records of an earlier attempt that was not saved
    # Resolving raises when a precision rule matches no layer (never a silently FP student).
    precision = qrules.describe(build.student_rules(ctx.config), template_vars["params"])
    if jax.process_index() == 0:
        (ctx.workdir / "precision.txt").write_text(precision + "\n")
    console(f"[{name}] per-layer precision (also in {ctx.workdir / 'precision.txt'}):\n{precision}")
    # Empty collections left out: a network without BatchNorm (SqueezeNet) carries an empty
    # 'batch_stats' in its state but has none in its init variables.
    teacher_vars = {k: v for k, v in ctx.results[plan.init_from].student.items() if jax.tree.leaves(v)}
    variables = copy_teacher_to_student(teacher_vars, template_vars)
    variables = build.set_deltas(dict(variables), plan.delta)
    loader = train_loader(ctx, plan.batch_size, 1, plan.seed, labels=False, sharded=False, workers=False)
    batch = next(iter(loader))
    console(f"[{name}] calibrating every quantizer on one batch of {plan.batch_size} "
            f"(compiling the forward pass) ...")
    t0 = time.perf_counter()
    variables, checks = calibration_forward(ctx, net)(variables, jnp.asarray(batch["image"]))
    raise_on_calibration_problems(jax.device_get(checks))
    q = ctx.config.quant
    console(f"[{name}] calibrated every quantizer on one batch of {plan.batch_size} "
            f"({time.perf_counter() - t0:.1f} s); {build.student_method(ctx.config)} W{q.w_bits}A{q.a_bits}, "
            f"preset {q.preset}")
    state = state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                          quant_delta=variables.get("quant_delta", {}))
    eval_metrics = evaluate(ctx, net.train_model, state.variables(), phase=name)
    ctx.writer.write(name, 0, "eval", eval_metrics)
    console(f"[{name}] eval after calibration: top1 {eval_metrics['top1']:.2f}%")
    if stop_requested():  # SIGTERM/SIGINT: no save, the rerun calibrates again (run/interrupt.py)
        raise Interrupted(stop_requested(), name)
    ckpt.save(parallel.replicate(state, ctx.mesh), meta=checkpoint_meta(ctx, plan, completed=True,
                                                                          eval_metrics=eval_metrics))
    return phase_result(plan, state, eval_metrics)
