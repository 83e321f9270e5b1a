"""The run summary reports final, best and last-5 top-1 from each phase's per-epoch eval history.

A digits teacher trains 3 epochs on one device, evaluated after every epoch. The expected values
are computed from the eval records of WORKDIR/metrics.jsonl. The resume test stops the run right
after epoch 2's evaluation is written but before its checkpoint is saved: the resumed run
drops that record from metrics.jsonl and evaluates epoch 2 again, so both metrics.jsonl and the
history hold each epoch once.
"""

from __future__ import annotations

import json

import jax
import pytest

from qkd_jax.run import loop
from qkd_jax.train.checkpoint import PhaseCheckpointer
from tests.e2e.helpers import finalized_steps, mesh, read_meta, read_metrics, teacher_only

pytestmark = pytest.mark.slow

EPOCHS, BATCH = 3, 128
SPE = 1437 // BATCH  # digits train split: 11 steps per epoch


def _config(data_dir):
    c = teacher_only(epochs=EPOCHS, batch_size=BATCH, lr=0.05, checkpoint_every_steps=1000, log_every_steps=SPE)
    c.phases.teacher.eval_every_epochs = 1
    c.dataset.data_dir = str(data_dir)
    return c


def _run(config, workdir):
    return loop.run(config, workdir, mesh=mesh(1))


def _evals(workdir) -> list[dict]:
    return [r for r in read_metrics(workdir) if r["phase"] == "teacher" and r["kind"] == "eval"]


def _history(records: list[dict]) -> list[dict]:
    return [{"epoch": r["step"] // SPE, "top1": r["top1"], "top5": r["top5"], "loss": r["loss"]} for r in records]


def _assert_summary(summary: dict, history: list[dict]) -> None:
    top1 = [h["top1"] for h in history]
    best = max(top1)
    assert summary["eval_history"] == history
    assert summary["top1"] == {
        "final": top1[-1], "best": best, "best_epoch": history[top1.index(best)]["epoch"],
        "last5": pytest.approx(sum(top1) / len(top1), rel=1e-12, abs=0), "last5_n": len(top1),
    }


def test_summary_reports_best_and_last5_of_every_epoch(tmp_path, capsys):
    workdir = tmp_path / "work"
    _run(_config(tmp_path / "data"), workdir)
    out = capsys.readouterr().out
    evals = _evals(workdir)
    assert [r["step"] for r in evals] == [SPE, 2 * SPE, 3 * SPE]
    history = _history(evals)
    summary = json.loads((workdir / "summary.json").read_text())["teacher"]
    _assert_summary(summary, history)
    assert read_meta(workdir / "teacher" / str(3 * SPE))["eval_history"] == history
    table = out[out.index("Summary ("):]
    header, row = table.splitlines()[1], next(line for line in table.splitlines() if line.startswith("teacher"))
    assert "best top1 % (epoch)" in header and "last5 top1 % (n)" in header
    top1 = [h["top1"] for h in history]
    best_epoch = history[top1.index(max(top1))]["epoch"]
    assert f"{max(top1):.2f} ({best_epoch})" in row and f"{sum(top1) / 3:.2f} (3)" in row


def test_resumed_phase_keeps_each_epoch_once(tmp_path, monkeypatch):
    workdir, config = tmp_path / "work", _config(tmp_path / "data")
    save = PhaseCheckpointer.save

    def save_or_stop(self, state, *, meta, data_state=None):
        if not meta["completed"] and int(jax.device_get(state.step)) == 2 * SPE:
            raise RuntimeError("stopped after epoch 2's evaluation, before its checkpoint")
        return save(self, state, meta=meta, data_state=data_state)

    monkeypatch.setattr(PhaseCheckpointer, "save", save_or_stop)
    with pytest.raises(RuntimeError, match="stopped after epoch 2"):
        _run(config, workdir)
    monkeypatch.setattr(PhaseCheckpointer, "save", save)
    assert finalized_steps(workdir / "teacher") == [SPE]
    assert [h["epoch"] for h in read_meta(workdir / "teacher" / str(SPE))["eval_history"]] == [1]
    first_run = _evals(workdir)
    assert [r["step"] for r in first_run] == [SPE, 2 * SPE]
    _run(config, workdir)
    evals = _evals(workdir)
    # epoch 1 from the first run; epoch 2 (its first record dropped on resume) and 3 from the resumed run
    assert [r["step"] for r in evals] == [SPE, 2 * SPE, 3 * SPE]
    assert evals[0] == first_run[0] and evals[1]["time"] > first_run[1]["time"]
    history = _history(evals)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    _assert_summary(json.loads((workdir / "summary.json").read_text())["teacher"], history)
    assert read_meta(workdir / "teacher" / str(3 * SPE))["eval_history"] == history
    # A rerun of the finished run reads the history back from the checkpoint.
    _run(config, workdir)
    _assert_summary(json.loads((workdir / "summary.json").read_text())["teacher"], history)
