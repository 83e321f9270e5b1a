"""The whole runner in-process on `tfds.testing.mock_data` (CIFAR-10): teacher -> calibrate ->
sqakd, then the QKD phases self-study -> co-study -> tutoring, and a rerun that trains nothing.

mock_data (policy USE_CODE) replaces `tfds.data_source` for every split with `num_examples`
random records, ignoring `data_dir`: train and test each hold MOCK_EXAMPLES examples, so the
runner's epoch is MOCK_EXAMPLES // batch steps and every evaluation must count exactly
MOCK_EXAMPLES examples (the last eval batch is padded and masked). This is the suite's one run
of the QKD phase chain; the one ImageNet-style mock run is tests/run/test_import_teacher.py's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from qkd_jax.run import loop
from tests.e2e.helpers import (
    assert_trees_identical,
    finalized_steps,
    mesh,
    qkd_chain,
    read_meta,
    read_metrics,
    sqakd_chain,
    state_keys,
    teacher_only,
)

MOCK_EXAMPLES = 32
BATCH = 16
STEPS = MOCK_EXAMPLES // BATCH  # one epoch per phase
EVAL_BATCH = 24  # 32 eval examples -> one full batch and one with 8 real + 16 padded rows
# Two of the process's 8 CPU devices: still a sharded step with cross-device means, but
# checkpoint saves/restores of replicated arrays cost a quarter of the 8-device time.
MESH_DEVICES = 2


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def _config(dataset: str, model: str, data_dir, *, image_size: int = 0):
    c = teacher_only(epochs=1, batch_size=BATCH, lr=0.01, checkpoint_every_steps=1000,
                     log_every_steps=1)
    c.dataset.name = dataset
    c.dataset.data_dir = str(data_dir)  # empty: proves mock_data, not a prepared dataset, is read
    c.dataset.image_size = image_size
    c.dataset.eval_batch_size = EVAL_BATCH
    c.model.name = model
    c.tensorboard = True
    return c


def cifar10_config(data_dir):
    """ResNet-20: teacher -> calibrate -> sqakd (interval W2A2), then the QKD phases."""
    c = _config("cifar10", "resnet20", data_dir)
    sqakd_chain(c, batch_size=BATCH)
    qkd_chain(c, batch_size=BATCH)
    return c


def _snapshot(workdir, phases) -> dict:
    """Every finalised step dir of every phase with the mtime of its metadata file."""
    return {name: {s: (workdir / name / str(s) / "_CHECKPOINT_METADATA").stat().st_mtime_ns
                   for s in finalized_steps(workdir / name)} for name in phases}


def _check_first_run(config, workdir, results, out: str) -> None:
    phases = config.phase_order.split(",")
    assert list(results) == phases
    records = read_metrics(workdir)
    for name in phases:
        kind = config.phases[name].kind
        steps = finalized_steps(workdir / name)
        meta = read_meta(workdir / name / str(steps[-1]))
        assert meta["completed"] is True and meta["phase"] == name and meta["kind"] == kind
        evals = [r for r in records if r["phase"] == name and r["kind"] == "eval"]
        train = [r for r in records if r["phase"] == name and r["kind"] == "train"]
        if kind == "calibrate":
            assert steps == [0] and train == []
            assert [r["step"] for r in evals] == [0]
        else:
            assert steps == [STEPS], (name, steps)  # the final checkpoint (mid-phase: test_resume)
            assert [r["step"] for r in train] == list(range(1, STEPS + 1))
            assert all(np.isfinite(r["loss"]) for r in train)
            assert [r["step"] for r in evals] == [STEPS]
            assert f"[{name}] done: eval top1" in out
            # The epoch is the mock split's length (not the real dataset's 50k / 1.28M images).
            assert (f"[{name}] {kind}: objective {config.phases[name].objective}, 1 epochs x {STEPS} "
                    f"steps, global batch {BATCH}, {MESH_DEVICES} device(s)") in out
        # The whole mock eval split, once: padding rows are masked out.
        assert evals[-1]["count"] == MOCK_EXAMPLES
        assert 0.0 <= evals[-1]["top1"] <= evals[-1]["top5"] <= 100.0
        assert meta["eval"] == results[name].eval == {k: evals[-1][k] for k in ("top1", "top5", "loss", "count")}
        # Only a co-studied teacher is stored with the student and handed on.
        trains_teacher = bool(config.phases[name].train_teacher)
        assert ("teacher" in state_keys(workdir / name / str(steps[-1]))) == trains_teacher, name
        assert (results[name].teacher is not None) == trains_teacher, name
    # Calibration copies the teacher and only sets quantizer parameters: BatchNorm statistics
    # are the teacher's.
    assert_trees_identical(results["calibrate"].student["batch_stats"], results["teacher"].student["batch_stats"])
    summary = json.loads((workdir / "summary.json").read_text())
    assert list(summary) == phases
    for name in phases:
        kind = config.phases[name].kind
        history = [] if kind == "calibrate" else [
            {"epoch": 1, **{k: r[k] for k in ("top1", "top5", "loss")}}
            for r in records if r["phase"] == name and r["kind"] == "eval"]
        top1 = None if not history else {"final": history[0]["top1"], "best": history[0]["top1"], "best_epoch": 1,
                                         "last5": history[0]["top1"], "last5_n": 1}
        results_part = {k: summary[name][k] for k in ("kind", "eval", "top1", "eval_history", "warnings")}
        assert results_part == {"kind": kind, "eval": results[name].eval, "top1": top1, "eval_history": history,
                                "warnings": []}
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert (workdir / "config.json").exists()


def _check_rerun_skips(config, workdir, first, capsys) -> None:
    phases = config.phase_order.split(",")
    before = _snapshot(workdir, phases)
    metrics_before = (workdir / "metrics.jsonl").read_text()
    summary_before = json.loads((workdir / "summary.json").read_text())
    capsys.readouterr()
    again = loop.run(config, workdir, mesh=mesh(MESH_DEVICES))
    out = capsys.readouterr().out
    for name in phases:
        if config.phases[name].kind == "calibrate":
            assert f"[{name}] already calibrated: read from {workdir / name}" in out
        else:
            assert f"[{name}] already completed at step {STEPS}: read from {workdir / name}" in out
        assert_trees_identical(again[name].student, first[name].student)
        if first[name].teacher is not None:
            assert_trees_identical(again[name].teacher, first[name].teacher)
        assert again[name].eval == first[name].eval
    assert f"step 1/{STEPS}" not in out and "done: eval" not in out  # nothing trained or evaluated
    assert _snapshot(workdir, phases) == before  # no checkpoint written, none deleted
    assert (workdir / "metrics.jsonl").read_text() == metrics_before
    assert json.loads((workdir / "summary.json").read_text()) == summary_before


def test_mock_dataset_end_to_end_and_rerun_skips(mock_tfds, tmp_path, capsys):
    config = cifar10_config(tmp_path / "no_data_here")
    workdir = tmp_path / "work"
    results = loop.run(config, workdir, mesh=mesh(MESH_DEVICES))
    out = capsys.readouterr().out
    _check_first_run(config, workdir, results, out)
    _check_rerun_skips(config, workdir, results, capsys)
