"""Best / last-5 top-1 of an eval history (run/report.py) on hand-made histories."""

from __future__ import annotations

import pytest

from qkd_jax.run.report import eval_record, merge_summary, summary_cells, top1_summary


def _history(top1s: list[float]) -> list[dict]:
    return [eval_record(e + 1, {"top1": t, "top5": 99.0, "loss": 0.5, "count": 10}) for e, t in enumerate(top1s)]


def test_best_is_not_the_final_and_last5_covers_only_the_last_five():
    history = _history([10.0, 70.0, 60.0, 65.0, 50.0, 55.0, 40.0])
    s = top1_summary(history)
    assert s == {"final": 40.0, "best": 70.0, "best_epoch": 2,
                 "last5": pytest.approx((60 + 65 + 50 + 55 + 40) / 5), "last5_n": 5}
    assert summary_cells(history) == ("70.00 (2)", "54.00 (5)")


def test_ties_take_the_earliest_epoch_and_short_histories_say_how_many():
    history = _history([30.0, 80.0, 80.0])
    assert top1_summary(history)["best_epoch"] == 2
    assert summary_cells(history) == ("80.00 (2)", "63.33 (3)")


def test_no_history_reports_dashes():
    assert top1_summary([]) is None
    assert summary_cells([]) == ("-", "-")


def test_eval_record_keeps_epoch_and_accuracies_only():
    assert eval_record(4, {"top1": 1, "top5": 2, "loss": 3, "count": 360}) == {
        "epoch": 4, "top1": 1.0, "top5": 2.0, "loss": 3.0}


def test_merge_keeps_finished_phases_outside_this_run_and_marks_them():
    """A second config running a subset of the phases: the others' rows stay, marked, in their order."""
    previous = {"teacher": {"top1": 1}, "calibrate": {"top1": 2}, "sqakd": {"top1": 3}, "qat": {"top1": 4}}
    current = {"teacher": {"top1": 10}, "calibrate": {"top1": 20}, "new": {"top1": 50}}
    rows, kept = merge_summary(previous, current, on_disk=lambda name: name != "qat")  # qat's dir was removed
    assert list(rows) == ["teacher", "calibrate", "sqakd", "new"]
    assert rows["teacher"] == {"top1": 10} and rows["new"] == {"top1": 50}
    assert rows["sqakd"] == {"top1": 3, "earlier_run": True} and kept == ["sqakd"]


def test_merge_without_an_earlier_summary_is_this_run():
    current = {"teacher": {"top1": 10}}
    assert merge_summary({}, current, on_disk=lambda name: True) == (current, [])
