"""The run: validate the config, resolve its phases, then run them in order and print a summary."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import ml_collections
from etils import epath

from qkd_jax import data as qdata
from qkd_jax.models import list_models
from qkd_jax.run import build
from qkd_jax.run.calibrate_phase import run_calibrate
from qkd_jax.run.config_schema import phase_names, validate
from qkd_jax.run.context import PhaseResult, RunContext, console
from qkd_jax.run.fresh import check_fresh, clear_workdir
from qkd_jax.run.interrupt import Interrupted, handle_signals, stop_requested
from qkd_jax.run.loaders import steps_per_epoch
from qkd_jax.run.lock import LOCK_NAME, WorkdirLock
from qkd_jax.run.paraphraser_phase import run_paraphraser
from qkd_jax.run.plan import PhasePlan, make_plan
from qkd_jax.run.preflight import check_run, has_steps
from qkd_jax.run.record import phase_settings
from qkd_jax.run.report import SUMMARY_HEADERS, merge_summary, summary_cells, summary_record
from qkd_jax.run.rerun import check_rerun, delete_phases, finished_phases
from qkd_jax.run.train_phase import run_training
from qkd_jax.train import parallel
from qkd_jax.train.checkpoint import PhaseCheckpointer
from qkd_jax.train.metrics import MetricsWriter, format_duration
from qkd_jax.train.paths import PathLike, as_path, is_remote


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Full validation against the known models, datasets, methods and presets."""
    validate(
        config,
        known_models=list_models(),
        known_datasets=qdata.DATASETS,
        known_methods=build.METHODS,
        known_presets=build.PRESETS,
    )


def open_datasets(config: ml_collections.ConfigDict) -> dict:
    """Opens the train and eval splits now, so a missing dataset stops the run before any work
    (DatasetNotPreparedError says how to prepare it). Returns {split: source} for the run."""
    info = qdata.dataset_info(config.dataset.name)
    return {split: qdata.get_source(config.dataset.name, split, config.dataset.data_dir or None)
            for split in (info.train_split, info.eval_split)}


def summary_table(config: ml_collections.ConfigDict, results: dict[str, PhaseResult],
                  plans: dict[str, PhasePlan]) -> str:
    """One row per phase: kind, objective, precision, final top-1/top-5, best and last-5 top-1."""
    q = config.quant
    rows = [("phase", "kind", "objective", "precision", "labels", "top1 %", "top5 %", *SUMMARY_HEADERS)]
    for name, res in results.items():
        plan = plans[name]
        precision = "FP32" if res.kind in ("teacher", "paraphraser") else f"{q.method} W{q.w_bits}A{q.a_bits}"
        objective = "-" if res.kind == "calibrate" else plan.objective_name
        feature = getattr(plan.objective, "feature", None)
        if feature is not None and feature.name != objective:  # the feature term, e.g. 'kd+attention' ('squat' is one)
            objective = f"{objective}+{feature.name}"
        uses_labels = "-" if res.kind == "calibrate" else ("yes" if plan.needs_labels else "no")
        if res.kind == "paraphraser":  # MSE reconstruction of the teacher's feats[-2], no labels
            objective, uses_labels = "mse", "no"
        top1 = res.eval.get("top1")
        top5 = res.eval.get("top5")
        rows.append((name, res.kind, objective, precision, uses_labels,
                     f"{top1:.2f}" if top1 is not None else "-", f"{top5:.2f}" if top5 is not None else "-",
                     *summary_cells(res.eval_history)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_phase(ctx: RunContext, plan: PhasePlan) -> PhaseResult:
    """Runs (or resumes, or reads back) one phase and records its result in `ctx.results`."""
    if stop_requested():  # a signal during the previous phase's final save or evaluation
        raise Interrupted(stop_requested(), plan.name)
    ckpt = PhaseCheckpointer(plan.directory, max_to_keep=plan.keep_checkpoints)
    try:
        runner = {"calibrate": run_calibrate, "paraphraser": run_paraphraser}.get(plan.kind, run_training)
        result = runner(ctx, plan, ckpt)
    finally:
        ckpt.close()
    ctx.results[plan.name] = result
    return result


def write_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """WORKDIR/config.json: the config the phases run with. retrain_from is a one-off action on
    the workdir, not a setting: it is stored empty, so rerunning this file retrains nothing."""
    if jax.process_index() == 0:
        values = json.loads(config.to_json_best_effort())
        values["retrain_from"] = ""
        (workdir / "config.json").write_text(json.dumps(values, indent=2))


def run(config: ml_collections.ConfigDict, workdir: PathLike,
        mesh: Optional[jax.sharding.Mesh] = None, fresh: bool = False) -> dict[str, PhaseResult]:
    """Runs every phase of `config` in `workdir`; finished phases are read back, not rerun.

    Everything that can be checked is checked before the workdir is created (config, dataset,
    batch sizes against the devices, teacher_checkpoint, writable workdir, disk space:
    `run/preflight.py`). Then the workdir's lock is taken (`run/lock.py`; process 0 only) and
    every phase checkpointed in `workdir` is compared with the settings it recorded
    (ConfigChangedError on a change; config.retrain_from deletes phases). SIGTERM/SIGINT stop
    the run at the next step boundary with a checkpoint (`run/interrupt.py`).

    `fresh`: the previous run in `workdir` is deleted (only a recognisable qkd_jax workdir,
    `run/fresh.py`) after all those checks and with the lock held, so a bad config or a workdir
    in use deletes nothing."""
    validate_config(config)
    sources = open_datasets(config)
    workdir = as_path(workdir)  # a local directory or a bucket URI (gs://bucket/run)
    mesh = mesh or parallel.make_mesh()
    ctx = RunContext(config=config, workdir=workdir, mesh=mesh, writer=None, sources=sources)
    plans = {name: make_plan(config, workdir, name, steps_per_epoch(ctx, config.phases[name].batch_size))
             for name in phase_names(config)}
    check_run(ctx, plans)
    protected = [p.directory for p in plans.values() if p.from_teacher_checkpoint]
    if fresh:
        check_fresh(workdir, protected, keep=LOCK_NAME)  # before the lock file is written into it
    lock = WorkdirLock(workdir)
    with handle_signals():
        if jax.process_index() == 0:
            lock.acquire()
        try:
            if fresh:
                _delete_previous_run(workdir, protected)
            _run_phases(ctx, plans)
        finally:
            lock.release()
    return ctx.results


def _delete_previous_run(workdir: epath.Path, protected: list[epath.Path]) -> None:
    """With the lock held (process 0): everything in `workdir` but the lock file."""
    if jax.process_index() == 0:
        deleted = clear_workdir(workdir, keep=LOCK_NAME, protected=protected)
        if deleted:
            linked = not is_remote(workdir) and os.path.islink(os.fspath(workdir))
            link = f" (a link to {os.path.realpath(os.fspath(workdir))})" if linked else ""
            console(f"[fresh] deleted the previous run in {workdir}{link}: {', '.join(deleted)}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("qkd_jax: fresh deletion")


def _run_phases(ctx: RunContext, plans: dict[str, PhasePlan]) -> None:
    """With the lock held: the rerun checks, config.json, every phase in order, the summary."""
    config, workdir = ctx.config, ctx.workdir
    delete_phases(plans, check_rerun(config, plans, workdir), workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if len(finished_phases(plans)) == len(plans) and (workdir / "config.json").exists():
        # Nothing trains: config.json stays the config the phases were trained with.
        console(f"every phase is already finished: {workdir / 'config.json'} is kept as the run that trained "
                f"them wrote it")
    else:
        write_config(config, workdir)
    writer = ctx.writer = MetricsWriter(workdir, tensorboard=config.tensorboard)
    t0 = time.perf_counter()
    try:
        for plan in plans.values():
            run_phase(ctx, plan)
    finally:
        writer.close()
    if jax.process_index() == 0:
        table = summary_table(config, ctx.results, plans)
        warnings = [w for r in ctx.results.values() for w in r.warnings]
        print(f"\nSummary ({config.dataset.name}, {config.model.name}; wall time "
              f"{format_duration(time.perf_counter() - t0)}):\n{table}"
              + "".join(f"\n{w}" for w in warnings), flush=True)
        _write_summary(workdir, {
            name: summary_record(r.kind, r.eval, r.eval_history, phase_settings(config, plans[name]), r.warnings)
            for name, r in ctx.results.items()})


def _write_summary(workdir: epath.Path, rows: dict[str, dict]) -> None:
    """WORKDIR/summary.json: this run's rows, and those an earlier summary holds for finished phases
    outside this phase_order (run/report.py:merge_summary), with a line naming them."""
    path, previous = workdir / "summary.json", {}
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except ValueError:  # a damaged summary: this run's rows replace it
            previous = {}
    rows, kept = merge_summary(previous, rows, lambda name: has_steps(workdir / name))
    if kept:
        print(f"summary.json keeps the rows of {', '.join(kept)}: finished in an earlier run of this workdir, "
              f"not in this phase_order (marked \"earlier_run\": true)", flush=True)
    path.write_text(json.dumps(rows, indent=2))
