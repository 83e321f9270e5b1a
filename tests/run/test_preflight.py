"""The disk estimate of run/preflight.py: how many checkpoints a phase writes and keeps at its peak
(checkpoint sizes replaced by round numbers; the sizes themselves are checked against `du` of a
real run in tests/e2e/test_run_outputs.py)."""

from __future__ import annotations

import types

import pytest

from qkd_jax.run import preflight


def _plan(tmp_path, name="p", *, kind="student", epochs=1, spe=22, every=4, keep=2, log=1):
    return types.SimpleNamespace(name=name, kind=kind, epochs=epochs, steps_per_epoch=spe, total_steps=epochs * spe,
                                 checkpoint_every_steps=every, keep_checkpoints=keep, log_every_steps=log,
                                 eval_every_epochs=1, from_teacher_checkpoint=False, directory=tmp_path / name,
                                 teacher_select="last")


@pytest.mark.parametrize("epochs,spe,every,expected", [
    (1, 22, 4, 6),  # steps 4, 8, 12, 16, 20 and the final 22
    (12, 22, 200, 13),  # the demo's teacher: 11 epoch ends before the last, step 200, the final 264
    (1, 22, 200, 1),  # only the final save
    (0, 22, 4, 1),  # no step: the final save alone
])
def test_saves(tmp_path, epochs, spe, every, expected):
    assert preflight.saves(_plan(tmp_path, epochs=epochs, spe=spe, every=every)) == expected


def test_calibrate_saves_once(tmp_path):
    assert preflight.saves(_plan(tmp_path, kind="calibrate", epochs=0)) == 1


def test_logged_records(tmp_path):
    # 22 steps logged every 5: 5 lines (5, 10, 15, 20, 22); 3 epochs -> 66 steps / 5 = 14 lines, 3 evals, + 2
    assert preflight.logged_records(_plan(tmp_path, log=5)) == 5 + 1 + 2
    assert preflight.logged_records(_plan(tmp_path, epochs=3, log=5)) == 14 + 3 + 2


def test_peak_is_the_kept_checkpoints_plus_one_being_written(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "checkpoint_size", lambda ctx, plan: {"a": 1000, "b": 3000, "c": 500}[plan.name])
    monkeypatch.setattr(preflight, "RECORD_BYTES", 0)
    monkeypatch.setattr(preflight, "FIXED_BYTES", 7)
    a = _plan(tmp_path, "a", keep=2)  # 6 saves, 2 kept
    b = _plan(tmp_path, "b", keep=10)  # 6 saves, all kept: never one more
    c = _plan(tmp_path, "c", every=200)  # 1 save
    assert preflight.checkpoint_bytes_needed(None, [a]) == 7 + 2 * 1000 + 1000
    assert preflight.checkpoint_bytes_needed(None, [a, b, c]) == 7 + 2 * 1000 + 6 * 3000 + 500 + 1000
    (tmp_path / "a" / "12").mkdir(parents=True)  # a phase with checkpoints already takes no new space
    assert preflight.checkpoint_bytes_needed(None, [a, c]) == 7 + 500
