"""Per-phase orbax checkpoints: train state, data-iterator state and JSON metadata.

Each phase has its own directory `workdir/<phase>/` and CheckpointManager. Saves are atomic
(orbax writes into a temporary directory and renames it when complete; unfinished temporary
directories are ignored and cleaned up). On restore the newest checkpoint is tried first; if it
is unreadable the previous one is used, with a warning; if none can be read the run stops with
`CorruptCheckpointError` rather than silently starting over.

The directory may be local or in a bucket (`gs://bucket/run/<phase>`): orbax takes an
`etils.epath.Path` and writes gs:// arrays with TensorStore's own GCS driver. On GCS the
finalising rename is not atomic; orbax then marks a finished step with a commit file instead.

A frozen teacher is not stored in student checkpoints: the teacher phase's checkpoint is the
reference (with config.teacher_select='best' its `best/` subdirectory holds the best epoch
alone, written by `save_only`). A trainable teacher (QKD co-studying) and a feature criterion's auxiliary parts
(their params, optimizer state and e.g. CRD's memory banks) are stored with the student.
"""

from __future__ import annotations

import errno
import logging
from typing import Any, Optional

import flax
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qkd_jax.train.paths import PathLike, as_path
from qkd_jax.train.quiet_loops import quiet_closed_loops
from qkd_jax.train.state import TrainState

log = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
    """No checkpoint of a phase directory could be restored."""


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space; the earlier checkpoints are intact."""


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain (orbax and tensorstore wrap the OSError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def error_summary(err: BaseException, limit: int = 200) -> str:
    """`Type: first line` of an orbax/TensorStore error, without the TensorStore spec that follows
    (a JSON dump of the driver stack, often over a hundred lines), at most `limit` characters."""
    text = (str(err).strip().splitlines() or [""])[0]
    for marker in (" See full TensorStore details", " [tensorstore_spec="):
        text = text.split(marker)[0]
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


def state_to_tree(state: TrainState) -> dict:
    """The arrays of a TrainState as a nested dict (frozen teacher left out)."""
    tree = {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "quant_delta": state.quant_delta,
        "opt_state": flax.serialization.to_state_dict(state.opt_state),
        "rng": state.rng,
    }
    if state.teacher is not None and state.teacher.trainable:
        tree["teacher"] = {
            "params": state.teacher.params,
            "batch_stats": state.teacher.batch_stats,
            "opt_state": flax.serialization.to_state_dict(state.teacher.opt_state),
        }
    if state.aux is not None:
        tree["aux"] = {
            "params": state.aux.params,
            "state": state.aux.state,
            "opt_state": flax.serialization.to_state_dict(state.aux.opt_state),
        }
    return tree


def tree_to_state(template: TrainState, tree: dict) -> TrainState:
    """Inverse of `state_to_tree`: fills `template` (which supplies static fields and teacher)."""
    teacher = template.teacher
    if "teacher" in tree:
        t = tree["teacher"]
        teacher = teacher.replace(
            params=t["params"],
            batch_stats=t["batch_stats"],
            opt_state=flax.serialization.from_state_dict(teacher.opt_state, t["opt_state"]),
        )
    aux = template.aux
    if aux is not None:
        if "aux" not in tree:
            raise ValueError(
                "the checkpoint holds no auxiliary feature-distillation parts but the phase trains some; "
                "it was written by a phase without a feature criterion: use a new workdir or retrain_from."
            )
        a = tree["aux"]
        aux = aux.replace(
            params=a["params"],
            state=a["state"],
            opt_state=flax.serialization.from_state_dict(aux.opt_state, a["opt_state"]),
        )
    return template.replace(
        step=tree["step"],
        params=tree["params"],
        batch_stats=tree["batch_stats"],
        quant_delta=tree["quant_delta"],
        opt_state=flax.serialization.from_state_dict(template.opt_state, tree["opt_state"]),
        rng=tree["rng"],
        teacher=teacher,
        aux=aux,
    )


def _abstract(tree: Any, mesh: Optional[Mesh]) -> Any:
    sharding = NamedSharding(mesh, P()) if mesh is not None else None

    def to_struct(x):
        x = jax.numpy.asarray(x) if not hasattr(x, "shape") else x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None))

    return jax.tree.map(to_struct, tree)


def metadata_tree(checkpointer: Any, path: Any) -> Any:
    """The metadata tree of a PyTree checkpoint item under every supported orbax: current releases
    wrap it in a StepMetadata (`.item_metadata.tree`), orbax 0.11 (the lowest bound) returns the
    tree itself."""
    meta = checkpointer.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    return getattr(meta, "tree", meta)


def read_arrays(step_dir: PathLike, keys: Optional[tuple[str, ...]] = None) -> dict:
    """The arrays of one checkpoint step's train state as NumPy, without a template.

    `keys` picks top-level entries (e.g. ('params', 'batch_stats')); missing ones are skipped.
    Reads on the host, so it works whatever device count wrote the checkpoint (export, tools).
    """
    import numpy as np

    path = as_path(step_dir) / "state"
    with quiet_closed_loops(), ocp.PyTreeCheckpointer() as checkpointer:
        tree = metadata_tree(checkpointer, path)
        wanted = {k: tree[k] for k in (keys or tuple(tree)) if k in tree}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        return checkpointer.restore(
            path, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
        )


def _drop_read_only_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


class PhaseCheckpointer:
    """Saves and restores one phase's checkpoints under `directory`."""

    def __init__(self, directory: PathLike, *, max_to_keep: int = 2, read_only: bool = False):
        """`read_only`: for reading another run's (or a not yet locked workdir's) checkpoints:
        creates, deletes and cleans up nothing (a writer's unfinished temporary directory stays)."""
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,
        )
        absl_log = logging.getLogger("absl")
        absl_log.addFilter(_drop_read_only_note)  # orbax logs a warning for every read-only manager
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_log.removeFilter(_drop_read_only_note)

    def steps(self) -> list[int]:
        """Finalised checkpoint steps, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, *, meta: dict, data_state: Optional[dict] = None) -> int:
        """Writes a checkpoint at the state's step (blocking, atomic). Returns the step."""
        step = int(jax.device_get(state.step))
        items = {
            "state": ocp.args.StandardSave(state_to_tree(state)),
            "meta": ocp.args.JsonSave({**meta, "step": step}),
        }
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        if step in self._manager.all_steps():
            # Only a checkpoint that restore() skipped as unreadable can be here (it fell back to
            # an earlier one and the run got back to this step): replace it, or orbax refuses.
            log.warning("replacing the unreadable checkpoint %s/%d", self.directory, step)
            self._manager.delete(step)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
            self._manager.wait_until_finished()
        except Exception as err:
            if not _is_disk_full(err):
                raise
            # orbax wrote into a temporary directory, never renamed: the finalised checkpoints
            # are untouched, and the next CheckpointManager removes the leftover.
            kept = self.steps()
            raise DiskFullError(
                f"no space left on the device while saving step {step} to {self.directory}; "
                f"nothing was lost: the newest checkpoint is "
                f"{f'step {kept[-1]}' if kept else 'none (this phase starts again)'}. Free space "
                f"and rerun the same command to resume.") from None
        return step

    def save_only(self, state: TrainState, *, meta: dict) -> int:
        """Writes a checkpoint at the state's step, then deletes every other step: the directory
        then holds exactly this one (a teacher's best epoch, run/teacher_select.py). The old
        steps go only after the new one is finalised, so an interruption never leaves none."""
        step = self.save(state, meta=meta)
        for old in self.steps():
            if old != step:
                self._manager.delete(old)
        return step

    def read_meta(self, step: Optional[int] = None) -> Optional[dict]:
        """The JSON metadata of `step` (default: newest), or None when there is no checkpoint."""
        steps = self.steps()
        if not steps:
            return None
        step = steps[-1] if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(
        self, template: TrainState, *, mesh: Optional[Mesh] = None
    ) -> Optional[tuple[TrainState, Optional[dict], dict]]:
        """(state, data_state, meta) from the newest readable checkpoint; None if there is none.

        Raises CorruptCheckpointError when checkpoints exist but none can be read.
        """
        steps = self.steps()
        if not steps:
            return None
        target = _abstract(state_to_tree(template), mesh)
        errors = []
        for step in reversed(steps):
            try:
                restored = self._restore_step(step, target)
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                errors.append(f"step {step}: {error_summary(err)}")
                log.warning(
                    "checkpoint %s/%d is unreadable (%s); trying the previous one",
                    self.directory, step, error_summary(err),
                )
                continue
            state = tree_to_state(template, restored["state"])
            data = restored.get("data")
            return state, (dict(data) if data is not None else None), dict(restored["meta"])
        raise CorruptCheckpointError(
            f"none of the checkpoints in {self.directory} can be restored ({'; '.join(errors)}); move "
            f"the directory aside to restart this phase from scratch, or restore it from a backup; the "
            f"run refuses to silently start over."
        )

    def _restore_step(self, step: int, target: Any) -> dict:
        step_dir = self.directory / str(step)
        items = {
            "state": ocp.args.StandardRestore(target),
            "meta": ocp.args.JsonRestore(),
        }
        if (step_dir / "data").exists():
            items["data"] = ocp.args.JsonRestore()
        with quiet_closed_loops():  # a failed restore's late TensorStore reads stay silent (train/quiet_loops.py)
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        meta = restored["meta"]
        if meta is None or int(meta.get("step", -1)) != step:
            raise ValueError(f"metadata of step {step} is missing or names another step: {meta}")
        return dict(restored)

    def close(self) -> None:
        self._manager.close()
