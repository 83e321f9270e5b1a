"""config.teacher_select='best': the calibrated student starts from the teacher's best epoch.

The teacher's last epoch is made worse on purpose (its learning rate is multiplied by 40 for the
third epoch), so the best evaluated epoch is an earlier one and 'best' differs from 'last'. The
student's copied weights and BatchNorm statistics are compared with the arrays of the checkpoint
in teacher/best/, read back from disk, not with what the run returned.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from qkd_jax.run.config_schema import optimizer_config, phase
from qkd_jax.run.loop import run
from qkd_jax.run.teacher_select import NoBestCheckpointError
from tests.e2e.helpers import finalized_steps, flat, read_meta, read_state, teacher_only

EPOCHS = 3


def _config(select: str):
    c = teacher_only(epochs=EPOCHS, log_every_steps=100, checkpoint_every_steps=100, teacher_select=select)
    c.phases.teacher.eval_every_epochs = 1
    c.phases.teacher.weights = optimizer_config(optimizer="sgd", learning_rate=0.05, momentum=0.9,
                                                schedule="step", decay_epochs=(EPOCHS - 1,), decay_factor=40.0)
    c.phases = ml_collections.ConfigDict(
        {"teacher": c.phases.teacher, "calibrate": phase("calibrate", init_from="teacher", batch_size=64)})
    c.phase_order = "teacher,calibrate"
    return c


def _shared(teacher: dict, student: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(path, teacher array, student array) for every teacher weight and BatchNorm statistic."""
    t = flat({"params": teacher["params"], "batch_stats": teacher["batch_stats"]})
    s = flat({"params": student["params"], "batch_stats": student["batch_stats"]})
    missing = sorted(set(t) - set(s))
    assert not missing, missing
    return [(k, t[k], s[k]) for k in sorted(t)]


@pytest.mark.slow
def test_best_starts_the_student_from_the_best_epoch(tmp_path):
    work = tmp_path / "best"
    run(_config("best"), work)
    final_step = finalized_steps(work / "teacher")[-1]
    history = read_meta(work / "teacher" / str(final_step))["eval_history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    top1 = [h["top1"] for h in history]
    best_epoch = 1 + top1.index(max(top1))
    assert best_epoch < EPOCHS, top1  # the 40x rate spoils the last epoch
    best_steps = finalized_steps(work / "teacher" / "best")
    assert best_steps == [best_epoch * final_step // EPOCHS]  # one checkpoint: the best epoch's
    best = read_state(work / "teacher" / "best" / str(best_steps[0]))
    last = read_state(work / "teacher" / str(final_step))
    student = read_state(work / "calibrate" / str(finalized_steps(work / "calibrate")[-1]))
    pairs = _shared(best, student)
    for key, t, s in pairs:
        np.testing.assert_array_equal(t, s, err_msg=key)
    last_flat = flat({"params": last["params"], "batch_stats": last["batch_stats"]})
    assert any(not np.array_equal(t, last_flat[k]) for k, t, _ in pairs)  # best is not the last epoch

    # A later run reading this teacher through config.teacher_checkpoint gets the same epoch.
    c = _config("best")
    c.teacher_checkpoint = str(work / "teacher")
    again = run(c, tmp_path / "again")
    for key, t, s in _shared(best, again["calibrate"].student):
        np.testing.assert_array_equal(t, np.asarray(s), err_msg=key)


@pytest.mark.slow
def test_best_refuses_a_teacher_that_kept_no_best_epoch(tmp_path):
    c = _config("last")
    c.phases = ml_collections.ConfigDict({"teacher": c.phases.teacher})
    c.phase_order = "teacher"
    c.phases.teacher.epochs = 1
    run(c, tmp_path / "last")
    assert not (tmp_path / "last" / "teacher" / "best").exists()
    c = _config("best")
    c.teacher_checkpoint = str(tmp_path / "last" / "teacher")
    with pytest.raises(NoBestCheckpointError, match="keeps no best-epoch checkpoint"):
        run(c, tmp_path / "reader")
    assert not (tmp_path / "reader").exists()  # refused before any work
