"""A real CLI run killed with SIGKILL in the middle of a phase: what it leaves behind, and an
exact resume.

Every run is `python -m qkd_jax.main --config=tests/e2e/helpers.py:resume` (digits, ResNet-20:
teacher (0 epochs) -> calibrate -> sqakd, 22 steps, a checkpoint every 3, TensorBoard on, a
metrics record every step) on ONE CPU device, so the reference and the resumed runs execute the
same compiled programs. The module fixture runs the command in two workdirs (overlapping): the
reference runs to completion; the other is SIGKILLed once it has two mid-phase sqakd checkpoints
and has logged steps after the newest one (what a resume must drop). One copy of the killed
workdir is resumed once (`resumed`) and read by most tests; the corrupt-checkpoint tests resume
their own copies. This is the suite's one real-process SIGKILL test: the other phases with state
of their own are interrupted in-process (test_feature_runs.py), the SIGTERM path is
test_run_safety.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import time
import types

import pytest

from qkd_jax.run.fresh import NotAWorkdirError, remove_workdir
from tests.e2e.helpers import (
    REPO,
    assert_trees_identical,
    cli_command,
    finalized_steps,
    read_meta,
    read_metrics,
    read_state,
    resume_config,
    run_cli,
    subprocess_env,
    tail,
)

PHASE = "sqakd"
TOTAL = 22  # 1437 digits // 64, one epoch
RUN_TIMEOUT = 300
OVERRIDES = ("--config.tensorboard=True", "--config.log_every_steps=1")


def _start(workdir, log) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cli_command("resume", workdir, *OVERRIDES), cwd=REPO, env=subprocess_env(1),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this module started (start_new_session=True)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _stale_records(workdir) -> tuple[list[int], list[dict]]:
    """(the mid-phase sqakd checkpoints, the sqakd records logged after the newest one)."""
    steps = [s for s in finalized_steps(workdir / PHASE) if 0 < s < TOTAL]
    try:
        records = read_metrics(workdir)
    except (OSError, ValueError):  # a line being written
        return steps, []
    last = steps[-1] if steps else 0
    return steps, [r for r in records if r["phase"] == PHASE and r["step"] > last]


def _kill_with_stale_records(proc: subprocess.Popen, workdir, log) -> list[int]:
    """SIGKILLs the run once it has two mid-phase sqakd checkpoints and logged steps after the
    newest. The process is frozen (SIGSTOP) while that is checked, so no checkpoint can be
    finalised in between. Returns the mid-phase checkpoint steps."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before it could be killed:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no two {PHASE} checkpoints with later records after {RUN_TIMEOUT} s:\n{tail(log)}")
        steps, stale = _stale_records(workdir)
        if len(steps) >= 2 and stale:
            os.killpg(proc.pid, signal.SIGSTOP)
            steps, stale = _stale_records(workdir)
            if len(steps) >= 2 and stale and steps[-1] < TOTAL:
                os.killpg(proc.pid, signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
                return steps
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference run and the killed run (same command, own workdirs). The second starts once
    the reference has saved its first sqakd checkpoint: by then every program is in the
    persistent compilation cache, so it compiles nothing."""
    base = tmp_path_factory.mktemp("resume_runs")
    reference, killed = base / "reference", base / "killed"
    procs = [_start(reference, base / "reference.log")]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not finalized_steps(reference / PHASE) and procs[0].poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the reference run made no {PHASE} checkpoint:\n{tail(base / 'reference.log')}")
            time.sleep(0.1)
        procs.append(_start(killed, base / "killed.log"))
        steps = _kill_with_stale_records(procs[1], killed, base / "killed.log")
        if procs[0].wait(timeout=RUN_TIMEOUT) != 0:
            pytest.fail(f"the reference run failed:\n{tail(base / 'reference.log')}")
    finally:
        for proc in procs:
            _kill_group(proc)
    assert finalized_steps(reference / PHASE)[-1] == TOTAL
    assert read_meta(reference / PHASE / str(TOTAL))["completed"]
    # The kill landed mid-phase: the earlier phases are complete, sqakd is not.
    assert read_meta(killed / "teacher" / str(finalized_steps(killed / "teacher")[-1]))["completed"]
    assert read_meta(killed / "calibrate" / "0")["completed"]
    assert not read_meta(killed / PHASE / str(steps[-1]))["completed"]
    return types.SimpleNamespace(reference=reference, killed=killed, steps=steps, last=steps[-1],
                                 log=(base / "killed.log").read_text())


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
    """A copy of the killed workdir, resumed to the end by the same command."""
    workdir = tmp_path_factory.mktemp("resumed") / "work"
    shutil.copytree(runs.killed, workdir)
    stale = _stale_records(workdir)[1]
    proc = run_cli("resume", workdir, *OVERRIDES, timeout=RUN_TIMEOUT)
    return types.SimpleNamespace(workdir=workdir, stdout=proc.stdout, stale=stale)


def _copy(runs, tmp_path):
    """A private copy of the killed workdir (the original is shared by the tests)."""
    workdir = tmp_path / "work"
    shutil.copytree(runs.killed, workdir)
    return workdir


def _assert_same_final_state(workdir, reference) -> None:
    for phase in ("teacher", "calibrate", PHASE):
        last = finalized_steps(workdir / phase)[-1]
        assert last == finalized_steps(reference / phase)[-1]
        # Every array: params, BatchNorm statistics, quantizer deltas, Adam moments, step, rng.
        assert_trees_identical(read_state(workdir / phase / str(last)), read_state(reference / phase / str(last)))
        assert read_meta(workdir / phase / str(last))["eval"] == read_meta(reference / phase / str(last))["eval"]


def test_sigkilled_run_resumes_to_identical_parameters(runs, resumed):
    assert "[teacher] already completed at step 0" in resumed.stdout
    assert "[calibrate] already calibrated" in resumed.stdout
    assert f"[{PHASE}] resuming from step {runs.last} ({resumed.workdir / PHASE})" in resumed.stdout
    assert f"[{PHASE}] step {TOTAL}/{TOTAL}" in resumed.stdout
    _assert_same_final_state(resumed.workdir, runs.reference)
    assert read_meta(resumed.workdir / PHASE / str(TOTAL))["completed"]


def _scalars(tb_dir) -> dict[str, list[int]]:
    """{tag: steps} of every scalar in the TensorBoard event files under `tb_dir`, read record by
    record (TFRecord framing: length, its CRC, the Event proto, its CRC); a record cut short ends
    a file."""
    from tensorboardX.proto.event_pb2 import Event

    tags: dict[str, list[int]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            if pos + 12 + length + 4 > len(data):
                break
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
            pos += 12 + length + 4
    return tags


def test_tensorboard_events_of_a_killed_run_are_readable(runs):
    events = list((runs.killed / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    tags = _scalars(runs.killed / "tb")
    # Every step up to the newest checkpoint is in the event file (flushed with each record).
    assert set(range(1, runs.last + 1)) <= set(tags[f"{PHASE}/train/loss"])
    assert tags["calibrate/eval/top1"] == [0]


def test_resume_keeps_each_metrics_step_once(runs, resumed):
    assert resumed.stale, "the killed run logged nothing after its newest checkpoint"
    records = read_metrics(resumed.workdir)
    keys = [(r["phase"], r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), sorted({k for k in keys if keys.count(k) > 1})
    train = [r["step"] for r in records if r["phase"] == PHASE and r["kind"] == "train"]
    assert train == list(range(1, TOTAL + 1))  # log_every_steps=1: every step once, in order
    assert [r["step"] for r in records if r["phase"] == PHASE and r["kind"] == "eval"] == [TOTAL]
    # The records kept from before the kill are the killed run's own, unchanged.
    before = [r for r in read_metrics(runs.killed) if not (r["phase"] == PHASE and r["step"] > runs.last)]
    assert records[: len(before)] == before


def test_progress_lines(runs, resumed):
    assert "[calibrate] calibrating every quantizer on one batch of 64 (compiling the forward pass) ..." in runs.log
    assert "[teacher] evaluating on the test split (compiling the eval step) ..." in runs.log
    assert f"[{PHASE}] compiling the train step (the first step) ..." in resumed.stdout
    assert f"[{PHASE}] evaluating on the test split" in resumed.stdout
    # The first step after a (re)start is not timed: its line has no ETA, the next one has.
    first, second = (f"[{PHASE}] step {runs.last + i}/{TOTAL} " for i in (1, 2))
    lines = resumed.stdout.splitlines()
    assert "ETA" not in next(x for x in lines if x.startswith(first))
    assert "ETA" in next(x for x in lines if x.startswith(second))


def test_summary_records_each_phase_settings(resumed):
    summary = json.loads((resumed.workdir / "summary.json").read_text())
    config = resume_config()
    q = config.quant
    assert summary["teacher"]["precision"] == {"method": "fp32", "w_bits": None, "a_bits": None, "preset": None}
    for name in ("calibrate", PHASE):
        assert summary[name]["precision"] == {"method": q.method, "w_bits": q.w_bits, "a_bits": q.a_bits,
                                              "preset": q.preset}
    ph = config.phases[PHASE]
    assert summary[PHASE]["objective"] == "sqakd" and summary[PHASE]["epochs"] == 1
    assert summary[PHASE]["batch_size"] == 64 and summary["calibrate"]["objective"] is None
    assert summary[PHASE]["objective_weights"] == {"alpha": ph.alpha, "temperature": ph.temperature}
    for name in ("teacher", "calibrate", PHASE):
        last = finalized_steps(resumed.workdir / name)[-1]
        assert summary[name]["record"] == read_meta(resumed.workdir / name / str(last))["record"]
        assert summary[name]["warnings"] == []
    assert summary[PHASE]["record"][f"phases.{PHASE}.weights.learning_rate"] == ph.weights.learning_rate


def test_normal_runs_do_not_warn(runs, resumed):
    assert "diverging" not in runs.log + resumed.stdout
    assert not [r for r in read_metrics(resumed.workdir) if r["kind"] == "warning"]


def _corrupt_state_item(step_dir) -> None:
    """Overwrites every file of the step's 'state' item (arrays, manifest, metadata)."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(b"\0 not an orbax checkpoint \0")


def _corrupt_array_chunks(step_dir) -> None:
    """Overwrites the array data of the step's 'state' item only (its metadata stays readable):
    TensorStore then fails while reading, with its whole spec in the exception."""
    chunks = list((step_dir / "state").rglob("ocdbt.process_0/d/*"))
    assert chunks
    for f in chunks:
        f.write_bytes(b"\0 not array data \0")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_falls_back_to_previous(runs, tmp_path):
    workdir = _copy(runs, tmp_path)
    newest, previous = runs.steps[-1], runs.steps[-2]
    _corrupt_state_item(workdir / PHASE / str(newest))
    proc = run_cli("resume", workdir, *OVERRIDES, timeout=RUN_TIMEOUT)
    assert f"checkpoint {workdir / PHASE}/{newest} is unreadable" in proc.stderr
    assert f"[{PHASE}] resuming from step {previous} ({workdir / PHASE})" in proc.stdout
    _assert_same_final_state(workdir, runs.reference)


def test_every_checkpoint_corrupt_stops_in_one_line_instead_of_restarting(runs, tmp_path):
    workdir = _copy(runs, tmp_path)
    steps = finalized_steps(workdir / PHASE)
    _corrupt_array_chunks(workdir / PHASE / str(steps[-1]))  # unreadable arrays, readable metadata
    for step in steps[:-1]:
        _corrupt_state_item(workdir / PHASE / str(step))  # nothing readable
    metrics_before = (workdir / "metrics.jsonl").read_text()
    proc = run_cli("resume", workdir, *OVERRIDES, timeout=RUN_TIMEOUT, check=False)
    assert proc.returncode == 1
    stderr = proc.stderr
    errors = [line for line in stderr.splitlines() if line.startswith("qkd_jax:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"qkd_jax: CorruptCheckpointError: none of the checkpoints in {workdir / PHASE} can be restored (step "
        f"{steps[-1]}: "), proc.stderr[-3000:]
    assert errors[0].endswith("the run refuses to silently start over.")
    for step in steps:
        assert f"step {step}:" in errors[0]
    # Besides it, one warning line per unreadable step; no TensorStore spec, no traceback (also none
    # from TensorStore reads that finish after the failed restore: train/quiet_loops.py).
    assert len(stderr.strip().splitlines()) == 1 + len(steps), stderr[-3000:]
    assert "tensorstore_spec" not in stderr and "'driver'" not in stderr and "Traceback" not in stderr
    assert "[teacher] already completed" in proc.stdout  # the intact phases were read back
    assert f"[{PHASE}] resuming" not in proc.stdout and f"[{PHASE}] student:" not in proc.stdout
    assert finalized_steps(workdir / PHASE) == steps  # nothing new written, nothing deleted
    assert (workdir / "metrics.jsonl").read_text() == metrics_before  # no training step ran


def test_demo_fresh_deletes_only_a_qkd_jax_workdir(runs, tmp_path):
    workdir = _copy(runs, tmp_path)
    (workdir / "notes.txt").write_text("mine")
    with pytest.raises(NotAWorkdirError, match=r"besides a qkd_jax run it holds \['notes.txt'\]"):
        remove_workdir(workdir)
    assert (workdir / "notes.txt").exists() and (workdir / "config.json").exists()
    (workdir / "notes.txt").unlink()
    assert remove_workdir(workdir) and not workdir.exists()
    assert not remove_workdir(workdir)  # nothing there: nothing to do
