"""Run safety: the workdir lock, SIGTERM/SIGINT stops with a checkpoint, the checks done before
the first phase, and one-line errors for what the user fixes.

The signal and lock tests share one module fixture of real CLI processes
(`python -m qkd_jax.main --config=tests/e2e/helpers.py:safety`: digits, FP ResNet-20, one epoch
of 22 steps, a checkpoint every 3 steps) on ONE CPU device, so every run executes the same
compiled programs: an uninterrupted reference run, and a run that is frozen (SIGSTOP) while a
second run tries its workdir, then stopped with SIGTERM (and a SIGINT right after) in the middle
of its phase. The other tests run `loop.run` in-process or call the checks directly.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from qkd_jax.run import loop, preflight
from qkd_jax.run.config_schema import ConfigError
from qkd_jax.run.context import RunContext
from qkd_jax.run.interrupt import Interrupted
from qkd_jax.run.lock import WorkdirLock, WorkdirLockedError
from qkd_jax.run.plan import make_plan
from qkd_jax.train.checkpoint import DiskFullError
from tests.e2e.helpers import (
    REPO,
    assert_trees_identical,
    cli_command,
    finalized_steps,
    read_meta,
    read_metrics,
    read_state,
    run_cli,
    sqakd_chain,
    subprocess_env,
    tail,
    teacher_only,
)

PHASE = "teacher"
TOTAL = 22  # 1437 digits // 64, one epoch
RUN_TIMEOUT = 300
STOPPED = re.compile(r"qkd_jax: stopped by SIGTERM in phase 'teacher' at step (\d+)/22, checkpoint saved; "
                     r"rerun the same command to resume")


def _start(workdir, log) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cli_command("safety", workdir), cwd=REPO, env=subprocess_env(1),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, log, what: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {RUN_TIMEOUT} s:\n{tail(log)}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("run_safety")
    reference, stopped = base / "reference", base / "stopped"
    ref_log, log = base / "reference.log", base / "stopped.log"
    procs = [_start(reference, ref_log)]
    try:
        # The second run starts once the reference checkpointed: every program is then cached.
        _wait_for(lambda: finalized_steps(reference / PHASE), procs[0], ref_log, "reference checkpoint")
        procs.append(_start(stopped, log))
        proc = procs[1]
        _wait_for((stopped / ".lock").exists, proc, log, "lock file")
        proc.send_signal(signal.SIGSTOP)  # frozen: it certainly holds the lock while the second run tries
        try:
            second = run_cli("safety", stopped, check=False, timeout=RUN_TIMEOUT)
        finally:
            proc.send_signal(signal.SIGCONT)
        _wait_for(lambda: [s for s in finalized_steps(stopped / PHASE) if 0 < s < TOTAL], proc, log,
                  "mid-phase checkpoint")
        proc.send_signal(signal.SIGTERM)
        # A second signal while stopping (finishing the step, saving) must change nothing. It is
        # sent once the first is handled: Python runs pending handlers in signal-number order.
        _wait_for(lambda: "SIGTERM received" in log.read_text(), proc, log, "SIGTERM handled")
        # The stopping run still has to finish its step, save a checkpoint and shut JAX down
        # (seconds): it cannot have exited in the few ms since its line appeared.
        second_signal = proc.poll() is None
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=RUN_TIMEOUT)
        if procs[0].wait(timeout=RUN_TIMEOUT) != 0:
            pytest.fail(f"the reference run failed:\n{tail(ref_log)}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    return types.SimpleNamespace(reference=reference, stopped=stopped, rc=rc, log=log.read_text(),
                                 pid=proc.pid, second=second, second_signal=second_signal)


@pytest.mark.slow
def test_second_run_on_a_locked_workdir_fails_at_once(runs):
    second = runs.second
    assert second.returncode == 1, second.stderr[-3000:]
    lines = [line for line in second.stderr.splitlines() if line.startswith("qkd_jax:")]
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert lines[0].startswith(f"qkd_jax: WorkdirLockedError: {runs.stopped} is in use by PID {runs.pid} "
                               f"on host {socket.gethostname()!r} since 20"), lines[0]
    # It did not wait for the holder (frozen with SIGSTOP all along): nothing restored, trained or written.
    assert "[teacher]" not in second.stdout


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(runs):
    assert runs.rc == 128 + signal.SIGTERM == 143, runs.log[-3000:]
    found = STOPPED.findall(runs.log)
    assert len(found) == 1, runs.log[-3000:]
    step = int(found[0])
    assert 0 < step < TOTAL
    assert runs.second_signal, "the run exited before the SIGINT could be sent"
    assert "SIGINT again: already stopping" in runs.log
    assert "Traceback" not in runs.log
    # The stop checkpoint is the newest one, a normal unfinished checkpoint, and the lock is gone.
    assert finalized_steps(runs.stopped / PHASE)[-1] == step
    assert read_meta(runs.stopped / PHASE / str(step))["completed"] is False
    assert not (runs.stopped / ".lock").exists()
    assert not list((runs.stopped / PHASE).glob("*tmp*"))


@pytest.mark.slow
def test_rerun_resumes_to_the_uninterrupted_result_and_takes_over_a_stale_lock(runs, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(runs.stopped, workdir)
    step = finalized_steps(workdir / PHASE)[-1]
    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID that no longer runs on this host
    (workdir / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": 0}))
    proc = run_cli("safety", workdir, timeout=RUN_TIMEOUT)
    assert f"took over the stale lock of PID {dead.pid} on host {socket.gethostname()!r}" in proc.stdout
    assert f"[{PHASE}] resuming from step {step} ({workdir / PHASE})" in proc.stdout
    assert not (workdir / ".lock").exists()
    ref = runs.reference / PHASE / str(TOTAL)
    assert finalized_steps(workdir / PHASE)[-1] == TOTAL
    assert_trees_identical(read_state(workdir / PHASE / str(TOTAL)), read_state(ref))
    assert read_meta(workdir / PHASE / str(TOTAL))["eval"] == read_meta(ref)["eval"]
    # Train losses of every step after the stop, as logged, equal the reference's.
    losses = {r["step"]: r["loss"] for r in read_metrics(workdir) if r["kind"] == "train"}
    ref_losses = {r["step"]: r["loss"] for r in read_metrics(runs.reference) if r["kind"] == "train"}
    assert [losses[s] for s in range(step + 1, TOTAL + 1)] == [ref_losses[s] for s in range(step + 1, TOTAL + 1)]


def test_lock_held_by_a_live_process_is_not_taken_over(tmp_path):
    with WorkdirLock(tmp_path / "w") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(WorkdirLockedError, match=f"in use by PID {os.getpid()}"):
            WorkdirLock(tmp_path / "w").acquire()
    assert not (tmp_path / "w" / ".lock").exists()


# ----------------------------------------------------------------------------- teacher_checkpoint


def _fake_student_phase(reference: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """The reference's teacher directory, its metadata relabelled as the student phase 'sqakd'."""
    shutil.copytree(reference / PHASE, dest)
    for step in finalized_steps(dest):
        meta_file = dest / str(step) / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        meta.update(kind="student", phase="sqakd")
        meta_file.write_text(json.dumps(meta))
    return dest


@pytest.mark.slow
def test_student_phase_as_teacher_checkpoint_is_one_line(runs, tmp_path):
    fake = _fake_student_phase(runs.reference, tmp_path / "sqakd")
    proc = run_cli("safety", tmp_path / "work", f"--config.teacher_checkpoint={fake}", check=False,
                   timeout=RUN_TIMEOUT)
    assert proc.returncode == 1
    assert (f"qkd_jax: TeacherCheckpointError: config.teacher_checkpoint='{fake}' holds the 'student' phase "
            f"'sqakd', not a teacher" in proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "corrupt" not in proc.stderr.lower()
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr[-3000:]
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_unfinished_teacher_checkpoint_fails_before_any_work(runs, tmp_path):
    config = teacher_only()
    config.teacher_checkpoint = str(runs.stopped / PHASE)
    step = finalized_steps(runs.stopped / PHASE)[-1]
    with pytest.raises(preflight.TeacherCheckpointError, match=f"holds an unfinished teacher phase \\(step {step}\\)"):
        loop.run(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()


# ----------------------------------------------------------------------------- checks before the first phase


def test_batch_sizes_are_checked_for_every_phase_before_any_work(tmp_path):
    config = teacher_only(batch_size=64)
    sqakd_chain(config, batch_size=12)  # 12 does not split over the 8 test devices
    with pytest.raises(ConfigError, match="config.phases.sqakd.batch_size=12 does not split over 8 devices"):
        loop.run(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()  # the teacher phase did not train first


def test_batch_size_check_with_a_given_device_count(tmp_path):
    config = teacher_only(batch_size=64)
    sqakd_chain(config, batch_size=63)  # the calibrate batch (63) is not split: not checked
    config.phases.sqakd.batch_size = 30
    plans = [make_plan(config, tmp_path, name, 1) for name in ("teacher", "calibrate", "sqakd")]
    preflight.check_batch_sizes(plans, 360, 2)
    with pytest.raises(ConfigError) as err:
        preflight.check_batch_sizes(plans, 360, 4)
    assert str(err.value) == ("config.phases.sqakd.batch_size=30 does not split over 4 devices; use a "
                              "multiple of 4 (batch sizes are global).")
    with pytest.raises(ConfigError, match=r"^config.phases.teacher.batch_size=64, config.phases.sqakd.batch_size=30, "
                                          r"config.dataset.eval_batch_size=360 does not split over 7 devices"):
        preflight.check_batch_sizes(plans, 360, 7)


def test_unwritable_workdir_fails_before_any_work(tmp_path):
    # /proc accepts no new files, whoever runs the test (root included).
    with pytest.raises(preflight.WorkdirNotWritableError, match="--workdir=/proc/qkd_run/work: cannot write in /proc "):
        loop.run(teacher_only(), "/proc/qkd_run/work")
    # A regular file where a directory of the path should be (fails for root too).
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(preflight.WorkdirNotWritableError, match=f"^--workdir={blocker}/work: {blocker} is not a "
                                                                 f"directory; choose another --workdir.$"):
        loop.run(teacher_only(), blocker / "work")


def test_checkpoint_size_estimate_is_the_variables_times_the_kept_checkpoints(tmp_path):
    config = teacher_only(keep_checkpoints=3)
    ctx = RunContext(config=config, workdir=tmp_path, mesh=None, writer=None)
    plan = make_plan(config, tmp_path, "teacher", 1)
    # ResNet-20, 10 classes: 269,850 parameters for RGB input (tests/models/test_param_counts.py),
    # less 2 * 9 * 16 stem weights for the digits' one channel; 1,504 BatchNorm statistics (a mean
    # and a variance per BatchNorm channel, as many as the BN scales and biases); SGD's momentum, one
    # more float per parameter, and the optimizer's step counters (int32 scalars); float32.
    params = 269_850 - 2 * 9 * 16
    size = preflight.trained_size(ctx.network("teacher"), config, plan.weights, plan.quant_params)
    assert 0 <= size.nbytes - 4 * (2 * params + 1_504) <= 16
    one = preflight.checkpoint_size(ctx, plan)
    assert one == (size.nbytes + preflight.ORBAX_BYTES_PER_ARRAY * size.arrays + preflight.ORBAX_BYTES_PER_CHECKPOINT
                   + len(config.to_json()))
    # One epoch of one step writes one checkpoint, whatever keep_checkpoints allows.
    assert preflight.checkpoint_bytes_needed(ctx, [plan]) == (
        preflight.FIXED_BYTES + one + preflight.RECORD_BYTES * preflight.logged_records(plan))


def test_insufficient_disk_space_fails_before_any_work(tmp_path, monkeypatch):
    preflight.check_disk_space(tmp_path, 1000, free=1000)
    with pytest.raises(preflight.InsufficientDiskSpaceError, match="0.0 MiB free, but the checkpoints"):
        preflight.check_disk_space(tmp_path, 1001, free=1000)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=2 * 2**20))
    with pytest.raises(preflight.InsufficientDiskSpaceError,
                       match=r"2.0 MiB free, but the checkpoints and logs this run keeps need at least 7.1 MiB"):
        loop.run(teacher_only(), tmp_path / "work")  # (2 kept + 1 being written) x 2,431,746 bytes + logs
    assert not (tmp_path / "work").exists()


# ----------------------------------------------------------------------------- in-process runs


def _fail_meta_write_at(monkeypatch, step: int) -> None:
    """Orbax's JSON writes raise ENOSPC for the metadata of `step` (the arrays are written by then)."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    real = jch.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):
        if isinstance(x, dict) and x.get("step") == step:
            raise OSError(28, "No space left on device", str(directory))
        return await real(self, x, directory)

    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", save_fn)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = teacher_only(batch_size=64, checkpoint_every_steps=3, log_every_steps=1000)
    workdir = tmp_path / "work"
    _fail_meta_write_at(monkeypatch, 6)
    with pytest.raises(DiskFullError) as err:
        loop.run(config, workdir)
    assert str(err.value) == (f"no space left on the device while saving step 6 to {workdir / PHASE}; nothing "
                              f"was lost: the newest checkpoint is step 3. Free space and rerun the same "
                              f"command to resume.")
    assert finalized_steps(workdir / PHASE) == [3]
    assert read_meta(workdir / PHASE / "3")["step"] == 3
    assert all(np.isfinite(x).all() for x in _leaves(read_state(workdir / PHASE / "3")))
    assert not (workdir / ".lock").exists()


@pytest.mark.slow
def test_signal_during_calibration_stops_without_a_save(tmp_path, monkeypatch):
    from qkd_jax.run import calibrate_phase

    config = teacher_only(epochs=0, batch_size=64)
    sqakd_chain(config, batch_size=64)
    real = calibrate_phase.evaluate

    def evaluate_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate_phase, "evaluate", evaluate_then_signal)
    workdir = tmp_path / "work"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as err:
        loop.run(config, workdir)
    assert err.value.exit_code == 143
    assert str(err.value) == ("stopped by SIGTERM in phase 'calibrate' before it saved anything; rerun the "
                              "same command to resume (this phase starts again)")
    assert read_meta(workdir / "teacher" / "0")["completed"]
    assert finalized_steps(workdir / "calibrate") == []
    assert not (workdir / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the run's handlers are uninstalled


def test_sigint_exit_code():
    err = Interrupted(signal.SIGINT, "sqakd", 5, 22)
    assert err.exit_code == 130
    assert str(err) == ("stopped by SIGINT in phase 'sqakd' at step 5/22, checkpoint saved; rerun the same "
                        "command to resume")


# ----------------------------------------------------------------------------- one-line CLI errors

CLI_ERRORS = [
    ("key_typo", ["--config=tests/e2e/helpers.py:teacher", "--config.quant.wbits=3"],
     ("FATAL Flags parsing error: --config.quant.wbits: unknown config key 'quant.wbits' (no field 'wbits'). "
      "Did you mean \"w_bits\" instead of \"wbits\"?")),
    ("missing_file", ["--config=configs/no_such_config.py:sqakd,w2a2"],
     ("FATAL Flags parsing error: --config=configs/no_such_config.py:sqakd,w2a2: no config file "
      "'configs/no_such_config.py'")),
    ("bad_variant", ["--config=configs/cifar10_resnet20.py:w9a9"],
     "FATAL Flags parsing error: --config=configs/cifar10_resnet20.py:w9a9: ValueError: invalid config ARG 'w9a9'"),
    ("variant_of_a_file_without_variants", ["--config=configs/digits_demo.py:fast"],
     ("FATAL Flags parsing error: --config=configs/digits_demo.py:fast: configs/digits_demo.py has no variants; "
      "drop ':fast'")),
    ("unwritable_workdir", ["--config=tests/e2e/helpers.py:teacher"],
     "qkd_jax: WorkdirNotWritableError: --workdir=/proc/qkd_run/work: cannot write in /proc"),
]


@pytest.mark.parametrize("args,expected", [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS])
def test_cli_errors_are_one_line(args, expected, tmp_path):
    workdir = "/proc/qkd_run/work" if "NotWritable" in expected else str(tmp_path / "work")
    proc = subprocess.run([*cli_command("teacher", workdir)[:3], *args, f"--workdir={workdir}"], check=False, cwd=REPO,
                          env=subprocess_env(1), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-3000:]
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("item", ["state", "meta"])
def test_export_of_a_corrupt_checkpoint_exits_2(runs, item, tmp_path, capsys):
    from qkd_jax.run import export_cli

    workdir = tmp_path / "work"
    shutil.copytree(runs.reference / PHASE, workdir / "fake_student")
    step_dir = workdir / "fake_student" / str(TOTAL)
    meta_file = step_dir / "meta" / "metadata"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "kind": "student"}))
    for f in (step_dir / item).rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0 not an orbax checkpoint \0")
    rc = export_cli.main(["--workdir", str(workdir), "--phase", "fake_student", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"error: checkpoint {step_dir} cannot be read ("), err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.npz").exists()


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------- demo --fresh and CLI errors


def _fake_run(workdir: pathlib.Path) -> pathlib.Path:
    """What a finished one-phase run leaves (config.json, metrics.jsonl, a phase directory)."""
    (workdir / "teacher" / "3").mkdir(parents=True)
    (workdir / "teacher" / "3" / "x").write_text("data")
    (workdir / "config.json").write_text(json.dumps({"phase_order": "teacher"}))
    (workdir / "metrics.jsonl").write_text("")
    return workdir


def _files(workdir: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(workdir)): p.read_text() for p in sorted(workdir.rglob("*")) if p.is_file()}


def _demo(*args: str, env_update: dict | None = None) -> subprocess.CompletedProcess:
    env = {**subprocess_env(1), **(env_update or {})}
    return subprocess.run([sys.executable, "-m", "qkd_jax.demo", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)


def test_demo_fresh_deletes_nothing_before_the_config_is_valid_and_the_lock_is_taken(tmp_path):
    workdir = _fake_run(tmp_path / "run")
    before = _files(workdir)
    proc = _demo("--fresh", f"--workdir={workdir}", "--config.quant.w_bits=9")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "qkd_jax.demo: ConfigError: config.quant.w_bits=9 is invalid: must be an integer in [1, 8]"], proc.stderr
    assert _files(workdir) == before
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "time": 0}  # this test: a live process
    (workdir / ".lock").write_text(json.dumps(holder))
    before = _files(workdir)
    proc = _demo("--fresh", f"--workdir={workdir}")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"qkd_jax.demo: WorkdirLockedError: {workdir} is in use by PID {os.getpid()}"), proc.stderr
    assert _files(workdir) == before  # the lock included
    assert "[teacher]" not in proc.stdout


@pytest.mark.parametrize("case", ["key_typo", "gs_workdir_without_clients", "cuda_without_a_gpu"])
def test_demo_errors_are_one_line(case, tmp_path):
    from qkd_jax.train.paths import missing_gcs_clients

    if case == "gs_workdir_without_clients" and not missing_gcs_clients():
        pytest.skip("gcsfs and google-cloud-storage are installed here")
    args, env, expected = {
        "key_typo": ([f"--workdir={tmp_path / 'w'}", "--config.quant.wbits=3"], {},
                     "FATAL Flags parsing error: --config.quant.wbits: unknown config key 'quant.wbits' (no field "
                     "'wbits'). Did you mean \"w_bits\" instead of \"wbits\"?"),
        "gs_workdir_without_clients": (["--workdir=gs://qkd-no-bucket/demo"], {},
                                       "qkd_jax.demo: WorkdirNotWritableError: gs://qkd-no-bucket/demo is in Google "
                                       "Cloud Storage, which needs"),
        "cuda_without_a_gpu": ([f"--workdir={tmp_path / 'w'}"], {"JAX_PLATFORMS": "cuda"},
                               "qkd_jax.demo: BackendUnavailableError: JAX_PLATFORMS='cuda': JAX cannot start that "
                               "backend on this machine ("),
    }[case]
    proc = _demo(*args, env_update=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-3000:]
    assert not (tmp_path / "w").exists()


def test_demo_help_lists_its_flags_and_exits_0():
    proc = _demo("--help")
    assert proc.returncode == 0, proc.stderr
    for text in ("python -m qkd_jax.demo [--workdir=workdirs/digits_demo] [--fresh]", "--[no]fresh:",
                 "--workdir: Output directory.", f"--config: Demo config file (default: {REPO}/configs/digits_demo.py)"):
        assert text in proc.stdout, text


def test_main_with_a_backend_this_machine_lacks_is_one_line(tmp_path):
    env = {**subprocess_env(1), "JAX_PLATFORMS": "cuda"}
    proc = subprocess.run(cli_command("teacher", tmp_path / "w"), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "qkd_jax: BackendUnavailableError: JAX_PLATFORMS='cuda': JAX cannot start that backend"), proc.stderr[-3000:]


@pytest.mark.slow
def test_fresh_run_deletes_the_previous_run_with_the_lock_held(tmp_path, monkeypatch):
    target = _fake_run(tmp_path / "target")
    workdir = tmp_path / "link"
    workdir.symlink_to(target)  # a symlinked workdir: its link stays, the run it points to goes
    held = []
    real_clear = loop.clear_workdir

    def clear_checking_the_lock(path, keep, protected=()):
        held.append(json.loads((target / ".lock").read_text())["pid"])
        return real_clear(path, keep, protected)

    monkeypatch.setattr(loop, "clear_workdir", clear_checking_the_lock)
    loop.run(teacher_only(epochs=0), workdir, fresh=True)
    assert held == [os.getpid()]
    assert workdir.is_symlink() and not (target / "teacher" / "3").exists()
    assert finalized_steps(target / "teacher") == [0] and read_meta(target / "teacher" / "0")["completed"]
    assert not (target / ".lock").exists()


def test_workdir_name_over_the_filesystem_limit_is_one_line(tmp_path):
    workdir = tmp_path / ("x" * 300) / "w"
    with pytest.raises(preflight.WorkdirNotWritableError) as err:
        WorkdirLock(workdir).acquire()
    assert str(err.value) == (f"--workdir={workdir}: cannot create the workdir's lock file .lock (File name too "
                              f"long) (a path component is longer than the filesystem allows, usually 255 bytes); "
                              f"choose another --workdir.")


def test_export_errors_before_any_work_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    from qkd_jax.run import export_cli

    (tmp_path / "a_file").write_text("")
    rc = export_cli.main(["--workdir", str(tmp_path / "none"), "--phase", "sqakd",
                          "--out", str(tmp_path / "a_file" / "x.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and err == (f"error: --out={tmp_path / 'a_file' / 'x.npz'}: {tmp_path / 'a_file'} is a file, not "
                               f"a directory; choose another --out\n")
    monkeypatch.setattr(preflight, "missing_gcs_clients", lambda: ["gcsfs"])
    rc = export_cli.main(["--workdir", "gs://qkd-no-bucket/run", "--phase", "sqakd", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: gs://qkd-no-bucket/run is in Google Cloud Storage, which needs gcsfs: "
                                      "pip install gcsfs") and err.count("\n") == 1, err
