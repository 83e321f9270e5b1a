"""config.teacher_select: the best-epoch rule, the config check, the settings record."""

from __future__ import annotations

import pathlib

import pytest

from qkd_jax.run.config_schema import ConfigError, base_config, validate
from qkd_jax.run.plan import make_plan
from qkd_jax.run.record import phase_record
from qkd_jax.run.report import top1_summary
from qkd_jax.run.teacher_select import NoBestCheckpointError, best_record, check_has_best, is_new_best

# top-1 after epochs 1..5: the best (97.5) is reached at epoch 2 and again at epoch 4.
HISTORY = [{"epoch": e, "top1": t, "top5": 100.0, "loss": 0.1}
           for e, t in ((1, 90.0), (2, 97.5), (3, 96.0), (4, 97.5), (5, 95.0))]


def test_is_new_best_needs_a_strictly_higher_top1():
    assert is_new_best([], 10.0)  # the first evaluated epoch is the best so far
    assert is_new_best(HISTORY[:1], 90.5)
    assert not is_new_best(HISTORY[:2], 97.5)  # a tie keeps the earlier epoch
    assert not is_new_best(HISTORY[:2], 96.0)


def test_best_record_is_the_earliest_of_the_highest_and_agrees_with_the_summary():
    assert best_record(HISTORY)["epoch"] == 2
    assert best_record([]) is None
    assert best_record(HISTORY)["epoch"] == top1_summary(HISTORY)["best_epoch"]


def test_replaying_the_keep_rule_over_a_history_keeps_the_best_epoch():
    """What the teacher phase does epoch by epoch: the last epoch it kept is the best epoch."""
    kept, seen = None, []
    for h in HISTORY:
        if is_new_best(seen, h["top1"]):
            kept = h["epoch"]
        seen.append(h)
    assert kept == 2


def test_unknown_value_is_a_config_error():
    c = base_config()
    assert c.teacher_select == "last"
    c.teacher_select = "final"
    with pytest.raises(ConfigError, match="teacher_select='final'.*'last', 'best'"):
        validate(c)


def test_best_is_recorded_by_every_phase_and_last_is_not():
    """A rerun with another value is a recorded change; 'last' leaves old records unchanged."""
    from tests.e2e.helpers import sqakd_chain, teacher_only

    c = teacher_only()
    sqakd_chain(c)
    plans = {n: make_plan(c, pathlib.Path("/tmp/w"), n, 22) for n in ("teacher", "calibrate", "sqakd")}
    assert all("teacher_select" not in phase_record(c, p) for p in plans.values())
    c.teacher_select = "best"
    plans = {n: make_plan(c, pathlib.Path("/tmp/w"), n, 22) for n in ("teacher", "calibrate", "sqakd")}
    assert [phase_record(c, p)["teacher_select"] for p in plans.values()] == ["best"] * 3
    assert [p.teacher_select for p in plans.values()] == ["best", "last", "last"]


def test_a_teacher_without_a_best_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / "22").mkdir()  # a 'last' teacher phase: steps, no best/
    with pytest.raises(NoBestCheckpointError) as err:
        check_has_best(tmp_path, "config.teacher_checkpoint='x'")
    assert "\n" not in str(err.value) and "--config.teacher_select=last" in str(err.value)
    (tmp_path / "best" / "22").mkdir(parents=True)
    check_has_best(tmp_path, "config.teacher_checkpoint='x'")


def test_the_disk_estimate_counts_the_best_epoch_checkpoint(tmp_path):
    """The teacher keeps `keep_checkpoints` checkpoints plus teacher/best/ under 'best'."""
    from qkd_jax.run import preflight
    from qkd_jax.run.context import RunContext
    from tests.e2e.helpers import teacher_only

    sizes = {}
    for select in ("last", "best"):
        c = teacher_only(keep_checkpoints=3, teacher_select=select)
        ctx = RunContext(config=c, workdir=tmp_path, mesh=None, writer=None)
        plan = make_plan(c, tmp_path, "teacher", 1)
        sizes[select] = preflight.checkpoint_bytes_needed(ctx, [plan])
    assert sizes["best"] - sizes["last"] == preflight.checkpoint_size(ctx, plan)  # one checkpoint more
