"""What a run tells: a shortened digits demo (no divergence warning, the disk estimate against
what it wrote), a warning when the loss diverges without a NaN, true advice when it becomes NaN
(and that the advice works), --help, and demo --fresh on an unrelated directory.

The SIGKILLed run's outputs (metrics without duplicates after the resume, readable TensorBoard
events, progress lines, the summary's settings) are checked in test_resume.py on its one killed
run; the divergence rules themselves on synthetic sequences in tests/run/test_divergence.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from qkd_jax.run import loop
from qkd_jax.run.finite import NonFiniteLossError
from tests.e2e.helpers import (
    REPO,
    finalized_steps,
    mesh,
    read_meta,
    read_metrics,
    read_state,
    subprocess_env,
    teacher_only,
)

TOTAL = 22  # 1437 digits // 64


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


def test_finite_divergence_warns_once(tmp_path, capsys):
    """Adam at lr 1e6: the loss grows to ~1e14 without a NaN."""
    from qkd_jax.run.config_schema import optimizer_config

    config = teacher_only(batch_size=64, log_every_steps=1, checkpoint_every_steps=100)
    config.phases.teacher.weights = optimizer_config(optimizer="adam", learning_rate=1e6, schedule="constant")
    workdir = tmp_path / "work"
    loop.run(config, workdir, mesh=mesh())
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


def test_nan_stops_before_checkpointing_the_bad_state_says_why_and_the_advice_works(tmp_path):
    # lr 1e30: the first update is finite but huge, the second forward pass overflows.
    # log_every_steps is large, so the check that fires is the one guarding each checkpoint.
    config = teacher_only(lr=1e30, batch_size=64, checkpoint_every_steps=1, log_every_steps=1000)
    workdir = tmp_path / "work"
    with pytest.raises(NonFiniteLossError) as err:
        loop.run(config, workdir, mesh=mesh())
    message = str(err.value)
    assert "phase 'teacher'" in message and "at step 2." in message
    assert "config.phases.teacher.weights.learning_rate" in message
    assert finalized_steps(workdir / "teacher") == [1]  # the last good step, nothing newer
    assert read_meta(workdir / "teacher" / "1")["completed"] is False
    assert all(np.isfinite(x).all() for x in _leaves(read_state(workdir / "teacher" / "1")))
    assert all(r["step"] < 2 for r in read_metrics(workdir) if r["phase"] == "teacher")
    params = [np.abs(np.asarray(x)) for x in _leaves(read_state(workdir / "teacher" / "1")["params"])]
    largest = max(float(x.max()) for x in params)
    assert largest > 1e4
    assert (f"Nothing after step 1 was saved: that checkpoint ({workdir / 'teacher' / '1'}) already diverged: "
            f"its largest |parameter| is {largest:.3g}") in message
    assert "resuming from it fails again" in message and "--config.retrain_from=teacher" in message
    # The advice: a lower learning rate with retrain_from deletes the phase and trains it again.
    config = teacher_only(lr=0.05, batch_size=64, checkpoint_every_steps=1000, log_every_steps=1000)
    config.retrain_from = "teacher"
    results = loop.run(config, workdir, mesh=mesh())
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
