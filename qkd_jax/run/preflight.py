"""Checks of a run that need more than the config: done by `run/loop.py:run` after the phases are
resolved and before anything is created or written, so a run that cannot finish fails in
seconds, not after its first phases trained.

Each check raises with one message naming the problem and the fix: batch sizes that do not
split over the devices (`ConfigError`), a `teacher_checkpoint` that is not a finished teacher
phase (`TeacherCheckpointError`), a workdir that cannot be written (`WorkdirNotWritableError`),
and a disk obviously too small for the checkpoints kept (`InsufficientDiskSpaceError`).

A workdir in a bucket (gs://, `train/paths.py`) needs gcsfs and google-cloud-storage installed
(checked first, `WorkdirNotWritableError` naming the packages), is probed by writing and
deleting one object in it, and has no free space to check.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
from etils import epath

from qkd_jax.run import build
from qkd_jax.run.config_schema import ConfigError
from qkd_jax.run.context import RunContext
from qkd_jax.run.plan import PhasePlan
from qkd_jax.run.rerun import recorded_meta
from qkd_jax.run.teacher_select import check_has_best
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


def _variables_bytes(net: build.Network, config) -> int:
    """Bytes of a network's params, batch_stats and quantizer deltas (shapes only, nothing computed)."""
    dummy = jnp.zeros((1, *build.input_shape(config)), jnp.float32)
    shapes = jax.eval_shape(lambda k: net.local_model.init(k, dummy, train=False), jax.random.key(0))
    kept = [v for k, v in dict(shapes).items() if k in build.KEPT_COLLECTIONS]
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(kept))


def _has_steps(directory: epath.Path) -> bool:
    """Whether a phase directory holds checkpoint steps (by name only: the workdir is not locked yet)."""
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def checkpoint_bytes_needed(ctx: RunContext, plans: Iterable[PhasePlan]) -> int:
    """A lower bound on the disk the run's new checkpoints take: per phase without checkpoints
    yet, its network's variables (optimizer state not counted) times the checkpoints kept."""
    sizes: dict[str, int] = {}

    def size(kind: str) -> int:
        if kind not in sizes:
            sizes[kind] = _variables_bytes(ctx.network(kind), ctx.config)
        return sizes[kind]

    total = 0
    for plan in plans:
        if plan.from_teacher_checkpoint or _has_steps(plan.directory):
            continue
        one = size(plan.kind) + (size("teacher") if plan.train_teacher else 0)
        kept = 1 if plan.kind == "calibrate" else plan.keep_checkpoints
        total += one * (kept + (1 if plan.teacher_select == "best" else 0))  # + teacher/best/
    return total


def check_disk_space(workdir: epath.Path, needed: int, free: Optional[int] = None) -> None:
    """Fails when the free space (default: shutil.disk_usage) is below `needed` bytes; a bucket
    has no free space to check."""
    if free is None and is_remote(workdir):
        return
    free = shutil.disk_usage(os.fspath(_existing_ancestor(workdir))).free if free is None else free
    if free < needed:
        raise InsufficientDiskSpaceError(
            f"--workdir={workdir}: {free / 2**20:.1f} MiB free, but the checkpoints this run keeps need at "
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
