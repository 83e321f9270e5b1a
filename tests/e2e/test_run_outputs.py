"""What a run leaves behind and tells: metrics.jsonl without duplicates after a SIGKILL resume,
readable TensorBoard events of a killed run, progress lines, the summary's phase settings,
true advice when the loss becomes NaN, a warning when it diverges without a NaN, --help, and a
demo --fresh that deletes only a qkd_jax workdir.

The subprocess runs use `tests/e2e/helpers.py:resume` (digits, ResNet-20: teacher (0 epochs)
-> calibrate -> sqakd, 22 steps, a checkpoint every 3) on one CPU device; one killed run is
shared by the tests (each resumes its own copy).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from qkd_jax.run import loop
from qkd_jax.run.divergence import DivergenceMonitor
from qkd_jax.run.finite import NonFiniteLossError
from qkd_jax.run.fresh import NotAWorkdirError, remove_workdir
from qkd_jax.train.metrics import ProgressLine
from tests.e2e.helpers import (
    REPO,
    cli_command,
    finalized_steps,
    read_meta,
    read_metrics,
    read_state,
    resume_config,
    run_cli,
    subprocess_env,
    tail,
    teacher_only,
)

pytestmark = pytest.mark.slow

PHASE = "sqakd"
TOTAL = 22  # 1437 digits // 64
TIMEOUT = 300
OVERRIDES = ("--config.tensorboard=True", "--config.log_every_steps=1")


# ----------------------------------------------------------------------------- the killed run


def _stale_records(workdir) -> tuple[int, list[dict]]:
    """(newest finalised sqakd checkpoint, sqakd records logged after it)."""
    steps = finalized_steps(workdir / PHASE)
    last = steps[-1] if steps else 0
    try:
        records = read_metrics(workdir)
    except (OSError, ValueError):  # a line being written
        return last, []
    return last, [r for r in records if r["phase"] == PHASE and r["step"] > last]


def _kill_with_stale_records(proc: subprocess.Popen, workdir, log) -> int:
    """SIGKILLs the run once it has two mid-phase sqakd checkpoints and has logged steps after
    the newest one (what a resume must drop). The process is stopped (SIGSTOP) while this is
    checked, so no checkpoint can be finalised in between. Returns the newest checkpoint step."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before it could be killed:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no sqakd checkpoint with later records after {TIMEOUT} s:\n{tail(log)}")
        last, stale = _stale_records(workdir)
        if last >= 6 and stale:
            os.killpg(proc.pid, signal.SIGSTOP)
            last, stale = _stale_records(workdir)
            if last < TOTAL and stale:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return last
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.02)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    base = tmp_path_factory.mktemp("outputs")
    workdir, log = base / "killed", base / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cli_command("resume", workdir, *OVERRIDES), cwd=REPO, env=subprocess_env(1),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        last = _kill_with_stale_records(proc, workdir, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return types.SimpleNamespace(workdir=workdir, log=log.read_text(), last=last)


@pytest.fixture(scope="module")
def resumed(killed, tmp_path_factory):
    """A copy of the killed workdir, resumed to the end."""
    workdir = tmp_path_factory.mktemp("resumed") / "work"
    shutil.copytree(killed.workdir, workdir)
    stale = _stale_records(workdir)[1]
    proc = run_cli("resume", workdir, *OVERRIDES, timeout=TIMEOUT)
    return types.SimpleNamespace(workdir=workdir, stdout=proc.stdout, stale=stale)


def _scalars(tb_dir) -> dict[str, list[int]]:
    """{tag: steps} of every scalar in the TensorBoard event files under `tb_dir`, read record by
    record (TFRecord framing: length, its CRC, the Event proto, its CRC); a record cut short ends
    a file."""
    import struct

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


def test_tensorboard_events_of_a_killed_run_are_readable(killed):
    events = list((killed.workdir / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    tags = _scalars(killed.workdir / "tb")
    # Every step up to the newest checkpoint is in the event file (flushed with each record).
    assert set(range(1, killed.last + 1)) <= set(tags[f"{PHASE}/train/loss"])
    assert tags["calibrate/eval/top1"] == [0]


def test_resume_keeps_each_metrics_step_once(killed, resumed):
    assert resumed.stale, "the killed run logged nothing after its newest checkpoint"
    assert f"[{PHASE}] resuming from step {killed.last}" in resumed.stdout
    records = read_metrics(resumed.workdir)
    keys = [(r["phase"], r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), sorted({k for k in keys if keys.count(k) > 1})
    train = [r["step"] for r in records if r["phase"] == PHASE and r["kind"] == "train"]
    assert train == list(range(1, TOTAL + 1))  # log_every_steps=1: every step once, in order
    assert [r["step"] for r in records if r["phase"] == PHASE and r["kind"] == "eval"] == [TOTAL]
    # The records kept from before the kill are the killed run's own, unchanged.
    before = [r for r in read_metrics(killed.workdir) if not (r["phase"] == PHASE and r["step"] > killed.last)]
    assert records[: len(before)] == before


def test_progress_lines(killed, resumed):
    assert "[calibrate] calibrating every quantizer on one batch of 64 (compiling the forward pass) ..." in killed.log
    assert "[teacher] evaluating on the test split (compiling the eval step) ..." in killed.log
    assert f"[{PHASE}] compiling the train step (the first step) ..." in resumed.stdout
    assert f"[{PHASE}] evaluating on the test split" in resumed.stdout
    # The first step after a (re)start is not timed: its line has no ETA, the next one has.
    first, second = (f"[{PHASE}] step {killed.last + i}/{TOTAL} " for i in (1, 2))
    lines = resumed.stdout.splitlines()
    assert "ETA" not in next(x for x in lines if x.startswith(first))
    assert "ETA" in next(x for x in lines if x.startswith(second))


def test_first_eta_excludes_compile_time(monkeypatch):
    """A fake clock: 100 s of compiling in the first step, then 10 steps in 1 s. The ETA for
    the 10 steps left is 1 s (0:01), not 101 s * 10 / 11 (1:31)."""
    clock = iter([0.0, 100.0, 101.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    progress = ProgressLine("p", total_steps=21, global_batch=8)
    progress.started(1)
    line = progress.line(11, {"loss": 1.0})
    assert line.endswith("80 img/s ETA 0:01"), line


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


def test_normal_runs_do_not_warn(killed, resumed):
    assert "diverging" not in killed.log + resumed.stdout
    assert not [r for r in read_metrics(resumed.workdir) if r["kind"] == "warning"]


def _demo_disk_estimate(tmp_path, epochs: int) -> int:
    """preflight's estimate for the digits demo config with `epochs` per trained phase, in an empty workdir."""
    from qkd_jax.run import preflight
    from qkd_jax.run.config_files import load_config
    from qkd_jax.run.config_schema import phase_names
    from qkd_jax.run.context import RunContext
    from qkd_jax.run.loaders import steps_per_epoch
    from qkd_jax.run.plan import make_plan

    config = load_config(str(REPO / "configs" / "digits_demo.py"))
    for p in ("teacher", "sqakd", "qat"):
        config.phases[p].epochs = epochs
    empty = tmp_path / "estimate"
    ctx = RunContext(config=config, workdir=empty, mesh=None, writer=None, sources=loop.open_datasets(config))
    plans = [make_plan(config, empty, n, steps_per_epoch(ctx, config.phases[n].batch_size))
             for n in phase_names(config)]
    return preflight.checkpoint_bytes_needed(ctx, plans)


def test_shortened_digits_demo_does_not_warn(tmp_path):
    """The demo config itself, one epoch per phase (teacher, calibrate, sqakd, qat)."""
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "qkd_jax.demo", f"--workdir={workdir}",
           *(f"--config.phases.{p}.epochs=1" for p in ("teacher", "sqakd", "qat"))]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "diverging" not in proc.stdout + proc.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert list(summary) == ["teacher", "calibrate", "sqakd", "qat"]
    assert all(s["warnings"] == [] for s in summary.values())
    # The disk preflight's estimate covers what the run wrote (du: blocks on disk), without being
    # absurdly larger (measured: 13.5 MiB estimated, 11.2 MiB used; the old estimate was 7.2 MiB).
    used = int(subprocess.run(["du", "-s", "--block-size=1", str(workdir)], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    estimate = _demo_disk_estimate(tmp_path, epochs=1)
    assert used <= estimate < 3 * used, (estimate, used)


# ----------------------------------------------------------------------------- divergence and NaN


def test_divergence_monitor_thresholds():
    """Warns once, only above both 100x the lowest loss and 10 log(num_classes)."""
    m = DivergenceMonitor("p", num_classes=10)  # floor 10 ln 10 = 23.03
    assert m.update(1, 2.3) is None and m.update(2, 0.01) is None
    assert m.update(3, 20.0) is None  # 2000x the lowest, but below the floor
    assert m.update(4, 23.1) is not None and len(m.warnings) == 1  # > 100 * 0.01 and > 23.03
    assert m.update(5, 1e14) is None and len(m.warnings) == 1  # once per phase
    m = DivergenceMonitor("p", num_classes=1000)  # floor 69.08
    assert m.update(1, 0.5) is None and m.update(2, 60.0) is None and m.update(3, 70.0) is not None


def test_finite_divergence_warns_once(tmp_path, capsys):
    """Adam at lr 1e6: the loss grows to ~1e14 without a NaN."""
    from qkd_jax.run.config_schema import optimizer_config

    config = teacher_only(batch_size=64, log_every_steps=1, checkpoint_every_steps=100)
    config.phases.teacher.weights = optimizer_config(optimizer="adam", learning_rate=1e6, schedule="constant")
    workdir = tmp_path / "work"
    loop.run(config, workdir)
    out = capsys.readouterr().out
    assert out.count("WARNING [teacher] the loss is diverging") == 2  # when it happens, in the summary
    warnings = [r for r in read_metrics(workdir) if r["kind"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["phase"] == "teacher"
    w = warnings[0]
    assert w["loss"] > 100 * w["lowest_loss"] and w["loss"] > 10 * math.log(10)
    losses = [r["loss"] for r in read_metrics(workdir) if r["kind"] == "train"]
    assert w["loss"] == losses[w["step"] - 1] and w["lowest_loss"] == min(losses[: w["step"] - 1])
    summary = json.loads((workdir / "summary.json").read_text())["teacher"]
    assert len(summary["warnings"]) == 1 and "diverging" in summary["warnings"][0]
    assert read_meta(workdir / "teacher" / str(TOTAL))["warnings"] == summary["warnings"]


def test_nan_without_checkpoint_says_so(tmp_path):
    # lr 1e30: the first update is finite but huge, the second forward pass overflows. No
    # checkpoint before step 2.
    config = teacher_only(lr=1e30, batch_size=64, checkpoint_every_steps=100, log_every_steps=1)
    with pytest.raises(NonFiniteLossError) as err:
        loop.run(config, tmp_path / "work")
    message = str(err.value)
    assert finalized_steps(tmp_path / "work" / "teacher") == []
    assert f"Nothing of this phase was saved ({tmp_path / 'work' / 'teacher'} holds no checkpoint)" in message
    assert "starts it from scratch" in message and "resumes" not in message
    assert "--config.retrain_from=teacher" in message and "metrics.jsonl" in message


def test_nan_after_a_diverged_checkpoint_says_so_and_the_advice_works(tmp_path):
    config = teacher_only(lr=1e30, batch_size=64, checkpoint_every_steps=1, log_every_steps=1000)
    workdir = tmp_path / "work"
    with pytest.raises(NonFiniteLossError) as err:
        loop.run(config, workdir)
    message = str(err.value)
    assert finalized_steps(workdir / "teacher") == [1]
    params = [np.abs(np.asarray(x)) for x in _leaves(read_state(workdir / "teacher" / "1")["params"])]
    largest = max(float(x.max()) for x in params)
    assert largest > 1e4
    assert (f"Nothing after step 1 was saved: that checkpoint ({workdir / 'teacher' / '1'}) already diverged: "
            f"its largest |parameter| is {largest:.3g}") in message
    assert "resuming from it fails again" in message and "--config.retrain_from=teacher" in message
    # The advice: a lower learning rate with retrain_from deletes the phase and trains it again.
    config = teacher_only(lr=0.05, batch_size=64, checkpoint_every_steps=1000, log_every_steps=1000)
    config.retrain_from = "teacher"
    results = loop.run(config, workdir)
    assert finalized_steps(workdir / "teacher") == [TOTAL]
    assert np.isfinite(results["teacher"].eval["loss"]) and results["teacher"].eval["top1"] > 10.0


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------- CLI and demo --fresh


@pytest.mark.parametrize("module", ["qkd_jax.main"])
def test_help_shows_the_flags_and_exits_0(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ("--config=FILE[:ARG]", "--workdir=DIR", "--config.KEY=VALUE", "get_config(ARG)",
                 "--config: Experiment config file.", "--workdir: Directory for checkpoints"):
        assert text in proc.stdout, text


def test_demo_fresh_refuses_an_unrelated_directory(tmp_path):
    victim = tmp_path / "thesis"
    victim.mkdir()
    (victim / "chapter1.tex").write_text("precious")
    cmd = [sys.executable, "-m", "qkd_jax.demo", "--fresh", f"--workdir={victim}"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"qkd_jax.demo: NotAWorkdirError: refusing to delete {victim}: it has no readable qkd_jax "
        f"config.json (FileNotFoundError); delete it yourself or choose another --workdir"]
    assert (victim / "chapter1.tex").read_text() == "precious"


def test_demo_fresh_deletes_only_a_qkd_jax_workdir(killed, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(killed.workdir, workdir)
    (workdir / "notes.txt").write_text("mine")
    with pytest.raises(NotAWorkdirError, match=r"besides a qkd_jax run it holds \['notes.txt'\]"):
        remove_workdir(workdir)
    assert (workdir / "notes.txt").exists() and (workdir / "config.json").exists()
    (workdir / "notes.txt").unlink()
    assert remove_workdir(workdir) and not workdir.exists()
    assert not remove_workdir(workdir)  # nothing there: nothing to do
