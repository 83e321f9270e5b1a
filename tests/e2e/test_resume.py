"""A real CLI run killed with SIGKILL in the middle of a phase resumes to bit-identical parameters.

Every run is `python -m qkd_jax.main --config=tests/e2e/helpers.py:resume` (digits, ResNet-20:
teacher -> calibrate -> sqakd, a checkpoint every 3 steps) on ONE CPU device, so the
reference and the resumed runs execute the same compiled programs. The module fixture runs the
command in two workdirs (overlapping): the reference runs to completion, the other is killed
as soon as two mid-phase sqakd checkpoints are finalised on disk (orbax writes a tmp dir and
renames it). Each test resumes its own copy of that interrupted workdir.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import types

import pytest

from tests.e2e.helpers import (
    REPO,
    assert_trees_identical,
    cli_command,
    finalized_steps,
    read_meta,
    read_state,
    run_cli,
    subprocess_env,
    tail,
)

pytestmark = pytest.mark.slow

PHASE = "sqakd"
TOTAL = 22  # 1437 digits // 64, one epoch
RUN_TIMEOUT = 300


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this module started (start_new_session=True)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _start(workdir, log) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cli_command("resume", workdir), cwd=REPO, env=subprocess_env(1),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_after_two_checkpoints(proc: subprocess.Popen, workdir, log) -> list[int]:
    """SIGKILLs the run as soon as two mid-phase sqakd checkpoints are finalised on disk."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        steps = [s for s in finalized_steps(workdir / PHASE) if 0 < s < TOTAL]
        if len(steps) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before it could be killed:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no two {PHASE} checkpoints after {RUN_TIMEOUT} s:\n{tail(log)}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return finalized_steps(workdir / PHASE)


def _produce(base) -> list[int]:
    """The reference run and the interrupted run (same command, own workdirs).

    The second starts once the reference has saved its first sqakd checkpoint: by then every
    program is in the persistent compilation cache, so it compiles nothing.
    """
    reference, interrupted = base / "reference", base / "interrupted"
    for workdir in (reference, interrupted):  # leftovers of a failed attempt must not be resumed
        shutil.rmtree(workdir, ignore_errors=True)
    procs = [_start(reference, base / "reference.log")]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not finalized_steps(reference / PHASE) and procs[0].poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the reference run made no {PHASE} checkpoint:\n{tail(base / 'reference.log')}")
            time.sleep(0.1)
        procs.append(_start(interrupted, base / "interrupted.log"))
        steps = _kill_after_two_checkpoints(procs[1], interrupted, base / "interrupted.log")
        if procs[0].wait(timeout=RUN_TIMEOUT) != 0:
            pytest.fail(f"the reference run failed:\n{tail(base / 'reference.log')}")
    finally:
        for proc in procs:
            _kill_group(proc)
    return steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Under pytest-xdist the workers share this session's temp root: the first one to get
        # the lock produces the runs, the others reuse them (pytest-xdist's recipe, with flock).
        base = tmp_path_factory.getbasetemp().parent / "resume_runs"
        base.mkdir(exist_ok=True)
    else:
        base = tmp_path_factory.mktemp("resume_runs")
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = base / "steps.json"
        if not done.exists():
            done.write_text(json.dumps(_produce(base)))
        steps = json.loads(done.read_text())
    reference, interrupted = base / "reference", base / "interrupted"
    assert finalized_steps(reference / PHASE)[-1] == TOTAL
    assert read_meta(reference / PHASE / str(TOTAL))["completed"]
    # The kill landed mid-phase: the earlier phases are complete, sqakd is not.
    assert read_meta(interrupted / "teacher" / str(finalized_steps(interrupted / "teacher")[-1]))["completed"]
    assert read_meta(interrupted / "calibrate" / "0")["completed"]
    assert not read_meta(interrupted / PHASE / str(steps[-1]))["completed"]
    assert finalized_steps(interrupted / PHASE) == steps and steps[-1] < TOTAL
    return types.SimpleNamespace(reference=reference, interrupted=interrupted, steps=steps)


def _copy(runs, tmp_path):
    """A private copy of the interrupted workdir (the original is shared by the tests)."""
    workdir = tmp_path / "work"
    shutil.copytree(runs.interrupted, workdir)
    return workdir


def _assert_same_final_state(workdir, reference) -> None:
    for phase in ("teacher", "calibrate", PHASE):
        last = finalized_steps(workdir / phase)[-1]
        assert last == finalized_steps(reference / phase)[-1]
        # Every array: params, BatchNorm statistics, quantizer deltas, Adam moments, step, rng.
        assert_trees_identical(read_state(workdir / phase / str(last)), read_state(reference / phase / str(last)))
        assert read_meta(workdir / phase / str(last))["eval"] == read_meta(reference / phase / str(last))["eval"]


def _corrupt_state_item(step_dir) -> None:
    """Overwrites every file of the step's 'state' item (arrays, manifest, metadata)."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(b"\0 not an orbax checkpoint \0")


def test_sigkilled_run_resumes_to_identical_parameters(runs, tmp_path):
    workdir = _copy(runs, tmp_path)
    proc = run_cli("resume", workdir, timeout=RUN_TIMEOUT)
    assert "[teacher] already completed at step 0" in proc.stdout
    assert "[calibrate] already calibrated" in proc.stdout
    assert f"[{PHASE}] resuming from step {runs.steps[-1]} ({workdir / PHASE})" in proc.stdout
    assert f"[{PHASE}] step {TOTAL}/{TOTAL}" in proc.stdout
    _assert_same_final_state(workdir, runs.reference)
    assert read_meta(workdir / PHASE / str(TOTAL))["completed"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_falls_back_to_previous(runs, tmp_path):
    workdir = _copy(runs, tmp_path)
    newest, previous = runs.steps[-1], runs.steps[-2]
    _corrupt_state_item(workdir / PHASE / str(newest))
    proc = run_cli("resume", workdir, timeout=RUN_TIMEOUT)
    assert f"checkpoint {workdir / PHASE}/{newest} is unreadable" in proc.stderr
    assert f"[{PHASE}] resuming from step {previous} ({workdir / PHASE})" in proc.stdout
    _assert_same_final_state(workdir, runs.reference)


def test_every_checkpoint_corrupt_stops_instead_of_restarting(runs, tmp_path):
    workdir = _copy(runs, tmp_path)
    for step in runs.steps:
        _corrupt_state_item(workdir / PHASE / str(step))
    metrics_before = (workdir / "metrics.jsonl").read_text()
    proc = run_cli("resume", workdir, timeout=RUN_TIMEOUT, check=False)
    assert proc.returncode == 1
    assert (f"CorruptCheckpointError: none of the checkpoints in {workdir / PHASE} can be restored"
            in proc.stderr), proc.stderr[-3000:]
    for step in runs.steps:
        assert f"step {step}:" in proc.stderr
    assert "[teacher] already completed" in proc.stdout  # the intact phases were read back
    assert f"[{PHASE}] resuming" not in proc.stdout and f"[{PHASE}] student:" not in proc.stdout
    assert finalized_steps(workdir / PHASE) == runs.steps  # nothing new written, nothing deleted
    assert (workdir / "metrics.jsonl").read_text() == metrics_before  # no training step ran
