"""Feature-distillation baselines through the CLI on digits, and an exact resume after SIGKILL.

`python -m qkd_jax.main --config=tests/e2e/helpers.py:feature` runs teacher (0 epochs) ->
calibrate -> one phase per baseline of `recipes.FEATURE_BASELINES` (1 epoch of 11 steps,
batch 128, a checkpoint every 3 steps) on ONE CPU device. Each phase must log its feature term,
whose weighted sum with the cross-entropy is the logged loss, and record beta and the criterion.

The SIGKILL test runs `feature=TOKEN` twice in their own workdirs (overlapping): the reference
to completion, the other killed once two mid-phase checkpoints of that phase are on disk; the
killed workdir then resumes to bit-identical arrays (student, optimizer, auxiliary parts). TOKEN:
CRD (embedding heads, one pair of momentum banks and Z) and CKTF (five such pairs and the labels);
the other criteria's auxiliary parts (FitNet's regressor and its BatchNorm statistics, CC's heads,
VID's regressors) are saved and restored by the same code, as one `aux` tree of the train state.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from qkd_jax.run import recipes
from tests.e2e.helpers import (
    REPO,
    assert_trees_identical,
    cli_command,
    finalized_steps,
    read_meta,
    read_metrics,
    read_state,
    run_cli,
    state_keys,
    subprocess_env,
    tail,
)

pytestmark = pytest.mark.slow

TOTAL = 11  # 1437 digits // 128, one epoch
RUN_TIMEOUT = 900
# The phases killed and resumed: the criteria whose auxiliary parts carry params and state.
KILLED = [token for token in ("crd", "cktf") if token in recipes.FEATURE_BASELINES]


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("feature_all") / "work"
    proc = run_cli("feature", workdir, timeout=RUN_TIMEOUT)
    return workdir, proc


def test_every_baseline_trains_its_feature_term(all_run):
    workdir, proc = all_run
    records = read_metrics(workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    for token, (criterion, beta) in recipes.FEATURE_BASELINES.items():
        train = [r for r in records if r["phase"] == token and r["kind"] == "train"]
        assert [r["step"] for r in train] == list(range(1, TOTAL + 1)), token
        for r in train:
            ce, term, loss = r["ce"], r[criterion], r["loss"]
            assert math.isfinite(term) and term >= 0, (token, term)
            # loss = gamma * CE + beta * L_feature (gamma 1, alpha 0): float32 sums of two terms.
            assert loss == pytest.approx(ce + beta * term, rel=1e-5, abs=1e-6), (token, r)
        assert "kl" not in train[0]  # alpha 0: no logit KL term
        last = finalized_steps(workdir / token)[-1]
        assert last == TOTAL and read_meta(workdir / token / str(last))["completed"]
        weights = summary[token]["objective_weights"]
        assert (weights["gamma"], weights["alpha"], weights["beta"], weights["feature"]) == (1.0, 0.0, beta, criterion)
        record = summary[token]["record"]
        assert record[f"phases.{token}.feature"] == criterion and record[f"phases.{token}.beta"] == beta
        assert f"{token:<9}  student    kd+{criterion}" in proc.stdout


@pytest.mark.skipif("cktf" not in recipes.FEATURE_BASELINES, reason="no CKTF recipe")
def test_cktf_saves_one_bank_pair_per_crd(all_run):
    """CKTF on ResNet-20: 5 CRDs (stem, 3 stages, embedding), each with its heads, banks and Z in the
    checkpoint; the banks moved and Z was set by the first step."""
    workdir, _ = all_run
    step_dir = workdir / "cktf" / str(finalized_steps(workdir / "cktf")[-1])
    aux = read_state(step_dir)["aux"]
    pairs = [f"pair{i}" for i in range(5)]
    assert sorted(aux["params"]) == pairs and sorted(aux["state"]) == ["labels", *pairs]
    for pair in pairs:
        bank = aux["state"][pair]
        assert bank["memory_s"].shape == (1437, 128) and float(bank["z_s"]) > 0 and float(bank["z_t"]) > 0
        norms = np.linalg.norm(bank["memory_t"], axis=1)
        assert np.sum(np.abs(norms - 1) < 1e-4) >= TOTAL * 128  # rows written this epoch are unit vectors


def _start(token, workdir, log) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cli_command(f"feature={token}", workdir), cwd=REPO, env=subprocess_env(1),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _wait(condition, proc, log, what):
    deadline = time.monotonic() + RUN_TIMEOUT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {RUN_TIMEOUT} s:\n{tail(log)}")
        time.sleep(0.05)


@pytest.mark.parametrize("token", KILLED)
def test_sigkilled_feature_phase_resumes_to_identical_state(tmp_path, token):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    procs = [_start(token, reference, tmp_path / "reference.log")]
    try:
        # The second run starts once the first has compiled and saved a checkpoint of the phase:
        # by then its programs are in the persistent compilation cache.
        _wait(lambda: finalized_steps(reference / token), procs[0], tmp_path / "reference.log",
              f"{token} checkpoint")
        procs.append(_start(token, killed, tmp_path / "killed.log"))
        _wait(lambda: len([s for s in finalized_steps(killed / token) if 0 < s < TOTAL]) >= 2, procs[1],
              tmp_path / "killed.log", f"two mid-phase {token} checkpoints")
        os.killpg(procs[1].pid, signal.SIGKILL)
        assert procs[1].wait(timeout=30) == -signal.SIGKILL
        if procs[0].wait(timeout=RUN_TIMEOUT) != 0:
            pytest.fail(f"the reference run failed:\n{tail(tmp_path / 'reference.log')}")
    finally:
        for proc in procs:
            _kill_group(proc)
    steps = finalized_steps(killed / token)
    assert steps[-1] < TOTAL and not read_meta(killed / token / str(steps[-1]))["completed"]
    assert "aux" in state_keys(killed / token / str(steps[-1]))  # the criterion's parts are saved
    proc = run_cli(f"feature={token}", killed, timeout=RUN_TIMEOUT)
    assert f"[{token}] resuming from step {steps[-1]} ({killed / token})" in proc.stdout
    for phase in ("teacher", "calibrate", token):
        last = finalized_steps(killed / phase)[-1]
        assert last == finalized_steps(reference / phase)[-1]
        # Every array: params, BatchNorm statistics, Adam moments, step, rng, auxiliary parts.
        assert_trees_identical(read_state(killed / phase / str(last)), read_state(reference / phase / str(last)))
        assert read_meta(killed / phase / str(last))["eval"] == read_meta(reference / phase / str(last))["eval"]
