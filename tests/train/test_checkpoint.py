"""PhaseCheckpointer on a toy TrainState: round trip, teacher handling, tmp dirs, corruption, retention."""

from __future__ import annotations

import functools
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qkd_jax import distill
from qkd_jax.train import parallel
from qkd_jax.train.checkpoint import CorruptCheckpointError, PhaseCheckpointer, state_to_tree
from qkd_jax.train.optim import GroupSpec, build_optimizer
from qkd_jax.train.state import create_train_state
from qkd_jax.train.step import train_step
from tests.e2e.helpers import assert_trees_identical, read_state
from tests.train.toy_models import ToyQuantMLP, init_toy

BATCH = 8


def _tx():
    return build_optimizer(GroupSpec(optimizer="adam", learning_rate=1e-2),
                           GroupSpec(optimizer="adam", learning_rate=1e-3),
                           steps_per_epoch=4, total_steps=8)


def _state(*, trainable_teacher: bool = False, seed: int = 0):
    """Toy student (quantized, BatchNorm) + teacher; `seed` changes every initial value."""
    student = ToyQuantMLP(use_bn=True)
    teacher = ToyQuantMLP(quantized=False, use_bn=True)
    return create_train_state(
        apply_fn=student.apply,
        variables=init_toy(student, key=jax.random.key(seed), batch=BATCH),
        tx=_tx(),
        rng=jax.random.key(100 + seed),
        teacher_apply_fn=teacher.apply,
        teacher_variables=init_toy(teacher, key=jax.random.key(50 + seed), batch=BATCH),
        teacher_tx=_tx() if trainable_teacher else None,
    )


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.normal(size=(BATCH, 6)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 4, BATCH), jnp.int32)}


@functools.lru_cache(maxsize=None)
def _step_fn(trainable_teacher: bool):
    objective = distill.co_study() if trainable_teacher else distill.kd()
    return jax.jit(functools.partial(train_step, objective=objective, axis_name=None))


def _trained(steps: int, *, trainable_teacher: bool = False):
    """A state after `steps` real updates: non-trivial params, BatchNorm stats and Adam moments."""
    state = _state(trainable_teacher=trainable_teacher)
    for k in range(steps):
        state, _ = _step_fn(trainable_teacher)(state, _batch(k))
    return state


def _step_dirs(directory: pathlib.Path) -> list[str]:
    return sorted(d.name for d in directory.iterdir())


def _corrupt(step_dir: pathlib.Path, how: str) -> None:
    state = step_dir / "state"
    if how == "garbage_state_files":  # every file of the 'state' item overwritten
        for f in state.rglob("*"):
            if f.is_file():
                f.write_bytes(b"not a checkpoint")
    elif how == "truncated_array_data":  # a partial write of the array chunks
        chunks = [f for f in state.rglob("*") if f.is_file() and f.parent.name == "d"]
        assert chunks
        for f in chunks:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "state_item_missing":
        for f in sorted(state.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        state.rmdir()
    elif how == "meta_names_another_step":
        meta = step_dir / "meta" / "metadata"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "step": 999}))
    else:
        raise ValueError(how)


def test_round_trip_is_bit_identical(tmp_path):
    state = _trained(2)
    data_state = {"next_index": 17, "nested": {"epoch": 1}}
    ckpt = PhaseCheckpointer(tmp_path, max_to_keep=2)
    assert ckpt.restore(state) is None and ckpt.read_meta() is None  # nothing saved yet
    step = ckpt.save(state, meta={"phase": "p", "completed": False, "eval": {"top1": 12.5}},
                     data_state=data_state)
    assert step == 2 and ckpt.steps() == [2]
    ckpt.close()

    template = _state(seed=1)  # different values everywhere: nothing may leak from the template
    ckpt = PhaseCheckpointer(tmp_path)
    restored, data, meta = ckpt.restore(template)
    assert_trees_identical(state_to_tree(restored), state_to_tree(jax.device_get(state)))
    assert int(restored.step) == 2
    assert data == data_state
    assert meta == {"phase": "p", "completed": False, "eval": {"top1": 12.5}, "step": 2}
    assert ckpt.read_meta() == meta
    # Static fields come from the template.
    assert restored.apply_fn is template.apply_fn and restored.tx is template.tx
    ckpt.close()


def test_restore_onto_a_mesh_gives_replicated_arrays(tmp_path):
    state = _trained(1)
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        ckpt.save(state, meta={})
    mesh = parallel.make_mesh()
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        restored, data, _ = ckpt.restore(_state(seed=3), mesh=mesh)
    assert data is None  # saved without a data state
    for leaf in jax.tree.leaves(state_to_tree(restored)):
        assert leaf.sharding == NamedSharding(mesh, P()), leaf.sharding
    assert_trees_identical(state_to_tree(restored), state_to_tree(jax.device_get(state)))


def test_frozen_teacher_is_not_stored(tmp_path):
    state = _trained(1)
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        ckpt.save(state, meta={})
    raw = read_state(tmp_path / "1")
    assert "teacher" not in raw
    assert sorted(raw) == ["batch_stats", "opt_state", "params", "quant_delta", "rng", "step"]
    # On restore the teacher is the template's (the teacher phase's checkpoint is the reference).
    template = _state(seed=4)
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        restored = ckpt.restore(template)[0]
    assert_trees_identical(restored.teacher.variables(), template.teacher.variables())
    assert restored.teacher.opt_state is None


def test_trainable_teacher_is_stored_and_restored(tmp_path):
    state = _trained(2, trainable_teacher=True)
    saved_teacher = jax.device_get(state.teacher)
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        ckpt.save(state, meta={})
    raw = read_state(tmp_path / "2")
    assert sorted(raw["teacher"]) == ["batch_stats", "opt_state", "params"]
    assert_trees_identical(raw["teacher"]["params"], saved_teacher.params)
    template = _state(trainable_teacher=True, seed=5)
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        restored = ckpt.restore(template)[0]
    assert restored.teacher.trainable
    assert_trees_identical(restored.teacher.variables(), saved_teacher.variables())
    assert_trees_identical(restored.teacher.opt_state, saved_teacher.opt_state)


def test_unfinalized_tmp_directory_is_ignored_and_cleaned_up(tmp_path):
    s1, s2 = _trained(1), _trained(2)
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        ckpt.save(s1, meta={"completed": False})
        ckpt.save(s2, meta={"completed": False})
    # What a process killed while writing step 3 leaves behind (orbax renames on success).
    tmp = tmp_path / "3.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text("{")
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        assert ckpt.steps() == [1, 2]
        restored, _, meta = ckpt.restore(_state(seed=6))
    assert meta["step"] == 2
    assert_trees_identical(state_to_tree(restored), state_to_tree(jax.device_get(s2)))
    assert not tmp.exists()  # cleanup_tmp_directories


# Orbax's reader threads report "Event loop is closed" after a failed restore; harmless here.
_ORBAX_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_ORBAX_NOISE
@pytest.mark.parametrize("how", ["garbage_state_files", "truncated_array_data", "state_item_missing",
                                 "meta_names_another_step"])
def test_unreadable_newest_falls_back_to_previous_with_warning(tmp_path, caplog, how):
    s1, s2 = _trained(1), _trained(2)
    with _closing(PhaseCheckpointer(tmp_path, max_to_keep=3)) as ckpt:
        ckpt.save(s1, meta={"completed": False}, data_state={"i": 1})
        ckpt.save(s2, meta={"completed": False}, data_state={"i": 2})
    _corrupt(tmp_path / "2", how)
    with caplog.at_level(logging.WARNING, logger="qkd_jax.train.checkpoint"):
        with _closing(PhaseCheckpointer(tmp_path, max_to_keep=3)) as ckpt:
            restored, data, meta = ckpt.restore(_state(seed=7))
    assert meta["step"] == 1 and data == {"i": 1}
    assert_trees_identical(state_to_tree(restored), state_to_tree(jax.device_get(s1)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name == "qkd_jax.train.checkpoint"]
    assert len(warnings) == 1, warnings
    assert f"{tmp_path}/2 is unreadable" in warnings[0] and "previous" in warnings[0]


@_ORBAX_NOISE
def test_every_checkpoint_unreadable_raises_naming_the_directory(tmp_path):
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        ckpt.save(_trained(1), meta={})
        ckpt.save(_trained(2), meta={})
    _corrupt(tmp_path / "1", "garbage_state_files")
    _corrupt(tmp_path / "2", "truncated_array_data")
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        with pytest.raises(CorruptCheckpointError) as err:
            ckpt.restore(_state(seed=8))
    message = str(err.value)
    assert f"none of the checkpoints in {tmp_path} can be restored" in message
    assert "step 2:" in message and "step 1:" in message
    assert "refuses to silently start over" in message
    assert _step_dirs(tmp_path) == ["1", "2"]  # nothing deleted or rewritten


def test_max_to_keep(tmp_path):
    state = _state()
    with _closing(PhaseCheckpointer(tmp_path, max_to_keep=2)) as ckpt:
        for step in range(1, 6):
            ckpt.save(state.replace(step=jnp.asarray(step, jnp.int32)), meta={"k": step})
        assert ckpt.steps() == [4, 5]
        assert ckpt.read_meta(4) == {"k": 4, "step": 4}
    assert _step_dirs(tmp_path) == ["4", "5"]


class _closing:
    """`with` for PhaseCheckpointer (it has close() but is not a context manager)."""

    def __init__(self, ckpt: PhaseCheckpointer):
        self.ckpt = ckpt

    def __enter__(self) -> PhaseCheckpointer:
        return self.ckpt

    def __exit__(self, *exc) -> None:
        self.ckpt.close()


@_ORBAX_NOISE
def test_saving_the_step_of_an_unreadable_checkpoint_replaces_it(tmp_path, caplog):
    """After a fallback the run reaches the unreadable step again; saving it must not fail."""
    s1, s2 = _trained(1), _trained(2)
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        ckpt.save(s1, meta={})
        ckpt.save(s2, meta={})
    _corrupt(tmp_path / "2", "garbage_state_files")
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        assert ckpt.restore(_state(seed=9))[2]["step"] == 1
        with caplog.at_level(logging.WARNING, logger="qkd_jax.train.checkpoint"):
            assert ckpt.save(s2, meta={"again": True}) == 2
        assert ckpt.steps() == [1, 2]
    assert f"replacing the unreadable checkpoint {tmp_path}/2" in caplog.text
    with _closing(PhaseCheckpointer(tmp_path)) as ckpt:
        restored, _, meta = ckpt.restore(_state(seed=10))
    assert meta == {"again": True, "step": 2}
    assert_trees_identical(state_to_tree(restored), state_to_tree(jax.device_get(s2)))


def test_save_only_leaves_exactly_the_new_step_even_below_the_old_one(tmp_path):
    """A teacher's best-epoch directory holds one checkpoint; a replay may write an earlier step."""
    s1, s3 = _trained(1), _trained(3)
    with _closing(PhaseCheckpointer(tmp_path, max_to_keep=2)) as ckpt:
        ckpt.save_only(s1, meta={"epoch": 1})
        assert ckpt.save_only(s3, meta={"epoch": 3}) == 3
        assert ckpt.steps() == [3]
        assert ckpt.save_only(s1, meta={"epoch": 1}) == 1  # lower than the kept step
        assert ckpt.steps() == [1]
    assert _step_dirs(tmp_path) == ["1"]
    with _closing(PhaseCheckpointer(tmp_path, read_only=True)) as ckpt:
        restored, _, meta = ckpt.restore(_state(seed=4))
    assert meta == {"epoch": 1, "step": 1}
    assert_trees_identical(state_to_tree(restored), state_to_tree(jax.device_get(s1)))
