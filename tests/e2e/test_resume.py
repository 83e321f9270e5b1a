"""A real CLI run killed with SIGKILL in the middle of a phase resumes to bit-identical parameters.

Every run is `python -m qkd_jax.main --config=tests/e2e/helpers.py:resume` (digits, ResNet-20:
teacher -> calibrate -> sqakd, a checkpoint every 3 steps) on ONE CPU device, so the
reference and the resumed runs execute the same compiled programs. The module fixture runs the
reference to completion, then starts the same command in another workdir and kills it once two
mid-phase sqakd checkpoints are finalised on disk. Each test resumes its own copy of that
interrupted workdir.
"""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference run and the interrupted run, started together (same command, own workdirs)."""
    base = tmp_path_factory.mktemp("resume")
    reference, interrupted = base / "reference", base / "interrupted"
    procs = [_start(interrupted, base / "interrupted.log"), _start(reference, base / "reference.log")]
    try:
        steps = _kill_after_two_checkpoints(procs[0], interrupted, base / "interrupted.log")
        if procs[1].wait(timeout=RUN_TIMEOUT) != 0:
            pytest.fail(f"the reference run failed:\n{tail(base / 'reference.log')}")
    finally:
        for proc in procs:
            _kill_group(proc)
    assert finalized_steps(reference / PHASE)[-1] == TOTAL
    assert read_meta(reference / PHASE / str(TOTAL))["completed"]
    # The kill landed mid-phase: the earlier phases are complete, sqakd is not.
    assert read_meta(interrupted / "teacher" / str(finalized_steps(interrupted / "teacher")[-1]))["completed"]
    assert read_meta(interrupted / "calibrate" / "0")["completed"]
    assert not read_meta(interrupted / PHASE / str(steps[-1]))["completed"]
    assert steps[-1] < TOTAL
    return types.SimpleNamespace(base=base, reference=reference, interrupted=interrupted, steps=steps)


def _copy(runs, name: str):
    workdir = runs.base / name
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


def test_sigkilled_run_resumes_to_identical_parameters(runs):
    workdir = _copy(runs, "resumed")
    proc = run_cli("resume", workdir, timeout=RUN_TIMEOUT)
    assert "[teacher] already completed at step 0" in proc.stdout
    assert "[calibrate] already calibrated" in proc.stdout
    assert f"[{PHASE}] resuming from step {runs.steps[-1]} ({workdir / PHASE})" in proc.stdout
    assert f"[{PHASE}] step {TOTAL}/{TOTAL}" in proc.stdout
    _assert_same_final_state(workdir, runs.reference)
    assert read_meta(workdir / PHASE / str(TOTAL))["completed"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_falls_back_to_previous(runs):
    workdir = _copy(runs, "corrupt_newest")
    newest, previous = runs.steps[-1], runs.steps[-2]
    _corrupt_state_item(workdir / PHASE / str(newest))
    proc = run_cli("resume", workdir, timeout=RUN_TIMEOUT)
    assert f"checkpoint {workdir / PHASE}/{newest} is unreadable" in proc.stderr
    assert f"[{PHASE}] resuming from step {previous} ({workdir / PHASE})" in proc.stdout
    _assert_same_final_state(workdir, runs.reference)


def test_every_checkpoint_corrupt_stops_instead_of_restarting(runs):
    workdir = _copy(runs, "all_corrupt")
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
