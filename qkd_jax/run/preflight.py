"""Checks of a run that need more than the config: done by `run/loop.py:run` after the phases are
resolved and before anything is created or written, so a run that cannot finish fails in
seconds, not after its first phases trained.

Each check raises with one message naming the problem and the fix: batch sizes that do not
split over the devices (`ConfigError`), a `teacher_checkpoint` that is not a finished teacher
phase (`TeacherCheckpointError`), a workdir that cannot be written (`WorkdirNotWritableError`),
and a disk too small for the checkpoints kept, their optimizer state and orbax metadata included,
and the metrics (`InsufficientDiskSpaceError`; `checkpoint_bytes_needed`).

A workdir in a bucket (gs://, `train/paths.py`) needs gcsfs and google-cloud-storage installed
(checked first, `WorkdirNotWritableError` naming the packages), is probed by writing and
deleting one object in it, and has no free space to check.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import uuid
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
from etils import epath

from qkd_jax.run import build
from qkd_jax.run.config_schema import ConfigError, group_spec
from qkd_jax.run.context import RunContext
from qkd_jax.run.plan import PhasePlan
from qkd_jax.run.rerun import recorded_meta
from qkd_jax.run.teacher_select import check_has_best
from qkd_jax.train.optim import build_optimizer
from qkd_jax.train.paths import is_remote, missing_gcs_clients


class TeacherCheckpointError(FileNotFoundError):
    """config.teacher_checkpoint is missing, empty, unfinished or not a teacher phase."""


class WorkdirNotWritableError(OSError):
    """The workdir (or the directory it is to be created in) cannot be written."""


class InsufficientDiskSpaceError(OSError):
    """The free space is below what the checkpoints the run keeps will take."""


def check_batch_sizes(plans: Iterable[PhasePlan], eval_batch_size: int, devices: int) -> None:
    """Every batch that is split over the devices (each trained phase's batch_size and the eval
    batch) must be a multiple of the device count. Calibrate batches are not split."""
    sizes = [(f"phases.{p.name}.batch_size", p.batch_size) for p in plans
             if p.kind != "calibrate" and not p.from_teacher_checkpoint]
    sizes.append(("dataset.eval_batch_size", eval_batch_size))
    bad = [f"config.{key}={size}" for key, size in sizes if size % devices]
    if bad:
        raise ConfigError(f"{', '.join(bad)} does not split over {devices} devices; use a multiple of "
                          f"{devices} (batch sizes are global).")


def check_teacher_checkpoint(plan: PhasePlan) -> None:
    """A teacher read from config.teacher_checkpoint must be a finished 'teacher' phase."""
    key = f"config.teacher_checkpoint={str(plan.directory)!r}"
    if not plan.directory.exists():
        raise TeacherCheckpointError(
            f"{key} does not exist; point it at the 'teacher' phase directory of an earlier run "
            f"(WORKDIR/teacher) or leave it empty to train the teacher.")
    meta = recorded_meta(plan.directory)
    if meta is None:
        raise TeacherCheckpointError(f"{key} holds no checkpoint; point it at the 'teacher' phase "
                                     f"directory of an earlier run (WORKDIR/teacher).")
    if meta.get("kind") != "teacher":
        raise TeacherCheckpointError(
            f"{key} holds the {meta.get('kind')!r} phase {meta.get('phase')!r}, not a teacher; point "
            f"it at the 'teacher' phase directory of an earlier run (WORKDIR/teacher).")
    if not meta.get("completed"):
        raise TeacherCheckpointError(
            f"{key} holds an unfinished teacher phase (step {meta.get('step')}); finish that run "
            f"first (rerun its command).")
    if plan.teacher_select == "best":  # before any work: the best epoch must have been kept
        check_has_best(plan.directory, key)


def _existing_ancestor(path: epath.Path) -> epath.Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_bucket_clients(paths: Iterable[epath.Path]) -> None:
    """A gs:// workdir or teacher_checkpoint needs gcsfs and google-cloud-storage installed."""
    buckets = [str(p) for p in paths if os.fspath(p).startswith("gs://")]
    missing = missing_gcs_clients() if buckets else []
    if missing:
        raise WorkdirNotWritableError(
            f"{buckets[0]} is in Google Cloud Storage, which needs {', '.join(missing)}: pip install "
            f"{' '.join(missing)} (and credentials: gcloud auth application-default login, or the VM's "
            f"service account), or use a local directory.")


def _probe(directory: epath.Path) -> None:
    """Writes and deletes one file (an object, in a bucket) in `directory`."""
    probe = directory / f".qkd_write_test_{uuid.uuid4().hex}"
    probe.write_text("")
    probe.unlink()


def check_writable(workdir: epath.Path) -> None:
    """The workdir, or the nearest existing directory above it, accepts a new file; a workdir
    in a bucket accepts a new object under its prefix (buckets have no directories to create)."""
    if is_remote(workdir):
        try:
            _probe(workdir)
        except Exception as err:  # noqa: BLE001  (gcsfs / gfile raise many types: auth, permission, no bucket)
            raise WorkdirNotWritableError(
                f"--workdir={workdir}: cannot write there ({type(err).__name__}: {str(err)[:200]}); check "
                f"the bucket name, the credentials and the write permission, or choose another "
                f"--workdir.") from None
        return
    target = _existing_ancestor(workdir)
    if not target.is_dir():
        raise WorkdirNotWritableError(f"--workdir={workdir}: {target} is not a directory; choose another --workdir.")
    try:
        _probe(target)
    except OSError as err:
        raise WorkdirNotWritableError(
            f"--workdir={workdir}: cannot write in {target} ({err.strerror or err}); choose a writable "
            f"--workdir or fix its permissions.") from None


# Orbax's files besides the array bytes, per checkpoint: _METADATA, _sharding and array_metadatas grow
# with the number of arrays (about 0.8 KB per array on the digits demo's ResNet-20 states, rounded up
# here), and every checkpoint holds ~30 small files and directories (commit markers, the meta and
# data-iterator JSON, ocdbt manifests) that take at least a 4 KiB block each on disk.
ORBAX_BYTES_PER_ARRAY = 1024
ORBAX_BYTES_PER_CHECKPOINT = 96 * 1024
# metrics.jsonl and TensorBoard per record (a logged step, an evaluation, a warning): one JSON line
# of ~10 values and one event per scalar (rounded up from the demo's files).
RECORD_BYTES = 2048
# config.json, summary.json, precision.txt, .lock and the metrics/TensorBoard files' own blocks,
# plus the config JSON stored in every checkpoint's metadata (counted per checkpoint below).
FIXED_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class StateSize:
    """The arrays of one checkpointed TrainState: their bytes and how many there are."""

    nbytes: int
    arrays: int

    def __add__(self, other: "StateSize") -> "StateSize":
        return StateSize(self.nbytes + other.nbytes, self.arrays + other.arrays)


def _tree_size(tree) -> StateSize:
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
    return StateSize(sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves), len(leaves))


def trained_size(net: build.Network, config, weights, quant_params, *, quant_decay: bool = False,
                 steps_per_epoch: int = 1, total_steps: int = 1) -> StateSize:
    """A network's params, batch_stats and quantizer deltas plus its optimizer state (Adam's two
    moments, SGD's momentum), from shapes only (jax.eval_shape: nothing is computed). The steps
    only let the learning-rate schedules validate (e.g. warmup shorter than the phase): the
    state's shapes do not depend on them."""
    dummy = jnp.zeros((1, *build.input_shape(config)), jnp.float32)
    tx = build_optimizer(weights, quant_params, steps_per_epoch=max(steps_per_epoch, 1),
                         total_steps=max(total_steps, 1), quant_decay=quant_decay)

    def init(key):
        variables = net.local_model.init(key, dummy, train=False)
        kept = {k: v for k, v in dict(variables).items() if k in build.KEPT_COLLECTIONS}
        return kept, tx.init(variables["params"])

    return _tree_size(jax.eval_shape(init, jax.random.key(0)))


def has_steps(directory: epath.Path) -> bool:
    """Whether a phase directory holds checkpoint steps (by name only: the workdir is not locked yet)."""
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def saves(plan: PhasePlan) -> int:
    """How many checkpoints the phase writes: one per `checkpoint_every_steps` and per epoch end
    before its last step, and the final one (a calibrate phase: one)."""
    total = plan.total_steps
    if plan.kind == "calibrate" or total == 0:
        return 1
    every, spe = plan.checkpoint_every_steps, plan.steps_per_epoch
    return sum(1 for s in range(1, total) if s % every == 0 or s % spe == 0) + 1


def logged_records(plan: PhasePlan) -> int:
    """metrics.jsonl records of the phase: its logged steps, evaluations and a warning."""
    if plan.kind == "calibrate":
        return 1
    return -(-plan.total_steps // plan.log_every_steps) + plan.epochs // plan.eval_every_epochs + 2


def checkpoint_size(ctx: RunContext, plan: PhasePlan) -> int:
    """The disk one checkpoint of the phase takes: its TrainState's arrays (the network, its
    optimizer state, a co-studied teacher and its optimizer state), orbax's metadata per array
    and per checkpoint, and the config JSON stored in its metadata. The auxiliary state of a
    feature criterion (CRD's memory banks) is not counted."""
    config = ctx.config
    ph = config.phases[plan.name]
    steps = dict(steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps)
    size = trained_size(ctx.network(plan.kind), config, plan.weights, plan.quant_params,
                        quant_decay=plan.quant_decay, **steps)
    if plan.train_teacher:
        t_spec = group_spec(ph.teacher_opt)
        no_decay = dataclasses.replace(t_spec, weight_decay=0.0)  # the FP teacher's empty quant group
        size = size + trained_size(ctx.network("teacher"), config, t_spec, no_decay, **steps)
    return (size.nbytes + ORBAX_BYTES_PER_ARRAY * size.arrays + ORBAX_BYTES_PER_CHECKPOINT
            + len(config.to_json()))


def checkpoint_bytes_needed(ctx: RunContext, plans: Iterable[PhasePlan]) -> int:
    """The disk the run's new files take at their peak: per phase without checkpoints yet, one
    checkpoint (`checkpoint_size`) times the checkpoints it keeps (keep_checkpoints, or fewer when
    it writes fewer), plus one while the phase writes its next before orbax deletes the oldest;
    plus metrics.jsonl and TensorBoard records and the run's small files (config.json,
    summary.json, precision.txt)."""
    total, extra = FIXED_BYTES, 0
    for plan in plans:
        if plan.from_teacher_checkpoint or has_steps(plan.directory):
            continue
        one, written = checkpoint_size(ctx, plan), saves(plan)
        best = 1 if plan.teacher_select == "best" else 0  # + <phase>/best/ (run/teacher_select.py)
        total += one * (min(written, plan.keep_checkpoints) + best) + RECORD_BYTES * logged_records(plan)
        if written > plan.keep_checkpoints:
            extra = max(extra, one)
    return total + extra


def check_disk_space(workdir: epath.Path, needed: int, free: Optional[int] = None) -> None:
    """Fails when the free space (default: shutil.disk_usage) is below `needed` bytes; a bucket
    has no free space to check."""
    if free is None and is_remote(workdir):
        return
    free = shutil.disk_usage(os.fspath(_existing_ancestor(workdir))).free if free is None else free
    if free < needed:
        raise InsufficientDiskSpaceError(
            f"--workdir={workdir}: {free / 2**20:.1f} MiB free, but the checkpoints and logs this run keeps need at "
            f"least {needed / 2**20:.1f} MiB; free space, lower config.keep_checkpoints, or use "
            f"another --workdir.")


def check_run(ctx: RunContext, plans: dict[str, PhasePlan]) -> None:
    """All the checks above, in order; called before the workdir is created."""
    check_batch_sizes(plans.values(), ctx.config.dataset.eval_batch_size, ctx.mesh.devices.size)
    check_bucket_clients([ctx.workdir, *(p.directory for p in plans.values() if p.from_teacher_checkpoint)])
    for plan in plans.values():
        if plan.from_teacher_checkpoint:
            check_teacher_checkpoint(plan)
    check_writable(ctx.workdir)
    check_disk_space(ctx.workdir, checkpoint_bytes_needed(ctx, plans.values()))
