"""A rerun in an existing workdir: every checkpointed phase is compared with its record before
any work, so a finished or interrupted phase is never read back or resumed under settings it
was not trained with; `config.retrain_from` deletes the phases to train again.

Nothing here restores a train state: a changed quantizer method (other parameters) is reported
as a setting change, not as an unreadable checkpoint.
"""

from __future__ import annotations

from typing import Optional

import jax
import ml_collections
from etils import epath

from qkd_jax.run.context import console
from qkd_jax.run.plan import PhasePlan
from qkd_jax.run.record import TEACHER_SHAPE_KEYS, diff_records, format_change, phase_record
from qkd_jax.train.checkpoint import PhaseCheckpointer

MAX_LINES = 15


class ConfigChangedError(ValueError):
    """The config changes settings of a phase that the workdir already holds checkpoints of."""


def recorded_meta(directory: epath.Path) -> Optional[dict]:
    """The metadata of the newest readable checkpoint in `directory`; None when there is none
    (an unreadable directory is left for the restore to report). Writes and cleans up nothing."""
    if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
        return None
    ckpt = PhaseCheckpointer(directory, read_only=True)  # also another run's teacher_checkpoint
    try:
        for step in reversed(ckpt.steps()):
            try:
                return ckpt.read_meta(step)
            except Exception:  # a damaged step: the restore tries the previous one and says so
                continue
    finally:
        ckpt.close()
    return None


def finished_phases(plans: dict[str, PhasePlan]) -> list[str]:
    """The phases whose newest checkpoint is completed (or read from config.teacher_checkpoint)."""
    return [name for name, plan in plans.items()
            if plan.from_teacher_checkpoint or (recorded_meta(plan.directory) or {}).get("completed")]


def retrained_phases(config: ml_collections.ConfigDict, plans: dict[str, PhasePlan]) -> list[str]:
    """config.retrain_from and every later phase: each phase after it may depend on it."""
    if not config.retrain_from:
        return []
    names = list(plans)
    return names[names.index(config.retrain_from):]


def _changes(config: ml_collections.ConfigDict, plan: PhasePlan, meta: dict) -> list[tuple[str, object, object]]:
    recorded = meta.get("record")
    if recorded is None:
        console(f"[{plan.name}] warning: {plan.directory} has no settings record (written before "
                f"records were kept): accepted without checking")
        return []
    now = phase_record(config, plan)
    return diff_records(recorded, now, TEACHER_SHAPE_KEYS if plan.from_teacher_checkpoint else None)


def _stale(plan: PhasePlan, plans: dict[str, PhasePlan], checkpointed: set[str]) -> list[str]:
    """A checkpointed phase whose source phase has no checkpoint (it will be trained anew)."""
    lines = []
    for field in ("init_from", "teacher_from"):
        source = getattr(plan, field)
        if source and source not in checkpointed and not plans[source].from_teacher_checkpoint:
            lines.append(f"phases.{plan.name}: checkpointed, but its {field} phase {source!r} has no "
                         f"checkpoint and would be trained anew")
    return lines


def _ways_out(plan: PhasePlan) -> str:
    if plan.from_teacher_checkpoint:
        return (f"config.teacher_checkpoint={str(plan.directory)!r} is another run's teacher, never "
                f"deleted or retrained here: point it at a teacher of this model, or leave it empty.")
    return (f"Rerun with the recorded settings, or add --config.retrain_from={plan.name} to delete the "
            f"checkpoints of {plan.name!r} and every later phase and train them with the new settings, "
            f"or use a new --workdir.")


def _message(workdir: epath.Path, changes: dict[tuple, list[str]], stale: list[str], first: PhasePlan) -> str:
    lines = [format_change(*change) + ("" if len(phases) == 1 and change[0].startswith("phases.")
                                        else f"  (phases {', '.join(phases)})")
             for change, phases in changes.items()] + stale
    shown = lines[:MAX_LINES] + ([f"... and {len(lines) - MAX_LINES} more"] if len(lines) > MAX_LINES else [])
    return (f"the checkpoints of this run ({workdir}) were trained with other settings than this "
            f"config:\n  "
            + "\n  ".join(shown)
            + "\nNothing was run or written. " + _ways_out(first))


def check_rerun(config: ml_collections.ConfigDict, plans: dict[str, PhasePlan], workdir: epath.Path) -> list[str]:
    """Raises ConfigChangedError when a checkpointed phase (not retrained) was trained with other
    settings; returns the phases whose checkpoints are to be deleted (config.retrain_from).
    A teacher read from config.teacher_checkpoint is always checked, on the model settings only."""
    retrain = retrained_phases(config, plans)
    changes: dict[tuple, list[str]] = {}
    stale: list[str] = []
    checkpointed: set[str] = set()
    first = None
    for name, plan in plans.items():
        if name in retrain and not plan.from_teacher_checkpoint:  # to be deleted: nothing to compare
            continue
        meta = recorded_meta(plan.directory)
        if meta is None:
            continue
        checkpointed.add(name)
        found = _changes(config, plan, meta)
        found_stale = _stale(plan, plans, checkpointed)
        for change in found:
            changes.setdefault(change, []).append(name)
        stale += found_stale
        if (found or found_stale) and first is None:
            first = plan
    if first is not None:
        raise ConfigChangedError(_message(workdir, changes, stale, first))
    return retrain


# Quantizer methods whose training depends on the device count: LSQ scales an activation step's
# gradient by 1 / sqrt(per-replica elements), sqrt(R) larger on R devices for the same global batch.
DEVICE_DEPENDENT_METHODS = ("lsq",)


def check_resume_devices(config: ml_collections.ConfigDict, plan: PhasePlan, meta: dict, devices: int) -> None:
    """Before resuming an unfinished phase: compares the device count its checkpoint recorded
    (meta 'device_count'; none in checkpoints written before it was kept) with this run's.

    A student phase of a DEVICE_DEPENDENT_METHODS quantizer is refused (ConfigChangedError):
    LSQ's activation-step gradients are sqrt(R_old / R_new) times larger before the resume than
    after it, so the phase would be a mix of two trainings that neither device count produces,
    and nothing says so afterwards; resuming on the old count, or retraining the phase, costs
    less than a result nobody can reproduce. Any other phase computes the same steps on any
    device count (BatchNorm statistics are synced, batch sizes are global) up to the order of
    float reductions: it resumes, with a console notice that the result is no longer bitwise
    that of one device count."""
    recorded = meta.get("device_count")
    if recorded is None or recorded == devices:
        return
    where = (f"phases.{plan.name}: its checkpoint at step {meta.get('step')} was trained on {recorded} device(s), "
             f"this run has {devices}")
    if plan.kind == "student" and config.quant.method in DEVICE_DEPENDENT_METHODS:
        raise ConfigChangedError(
            f"{where}; with quant.method={config.quant.method!r} an activation step's gradient scales with "
            f"sqrt(device count) (per-replica LSQ gradient scale), so resuming would mix two trainings. Resume "
            f"on {recorded} device(s), or add --config.retrain_from={plan.name} to train the phase again on {devices}.")
    console(f"[{plan.name}] notice: {where}; resuming (the same steps up to float reduction order, so the result "
            f"is not bitwise that of either device count)")


def delete_phases(plans: dict[str, PhasePlan], names: list[str], workdir: epath.Path) -> None:
    """Deletes the checkpoints of `names` inside `workdir` (never another run's teacher_checkpoint)."""
    if jax.process_index() == 0:
        for name in names:
            plan = plans[name]
            inside = plan.directory.parent == workdir  # both as_path'ed (absolute, or URIs)
            if inside and not plan.from_teacher_checkpoint and plan.directory.is_dir():
                console(f"[{name}] retrain_from={names[0]}: deleting {plan.directory}")
                plan.directory.rmtree()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("qkd_jax: retrain_from deletions")
