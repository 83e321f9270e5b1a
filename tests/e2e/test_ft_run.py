"""Factor Transfer through the CLI on digits: `--config=tests/e2e/helpers.py:ft` runs teacher
(0 epochs) -> calibrate -> 'ft_paraphraser' (11 steps) -> 'ft' (feature='factor', 11 steps) on
one CPU device. A second run of the phases up to the paraphraser is SIGKILLed after two of its
mid-phase checkpoints and resumed: its final paraphraser state equals the uninterrupted run's
bit for bit. The paraphraser phase trains (its weights move, its MSE is logged every step);
the student phase holds exactly that paraphraser, frozen, in its auxiliary state from start to
end, and logs the factor term whose beta-weighted sum with the CE is the loss."""

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
    flat,
    read_meta,
    read_metrics,
    read_state,
    run_cli,
    subprocess_env,
    tail,
)

pytestmark = pytest.mark.slow

TOTAL = 11  # 1437 digits // 128, one epoch


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ft") / "work"
    run_cli("ft", workdir, timeout=900)
    return workdir


def test_paraphraser_phase_trains_and_the_student_phase_freezes_it(ft_run):
    records = read_metrics(ft_run)
    para = [r for r in records if r["phase"] == "ft_paraphraser" and r["kind"] == "train"]
    assert [r["step"] for r in para] == list(range(1, TOTAL + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in para)
    trained = read_state(ft_run / "ft_paraphraser" / str(TOTAL))["params"]
    first_ckpt = read_state(ft_run / "ft_paraphraser" / "9")["params"]
    final = read_state(ft_run / "ft" / str(TOTAL))["aux"]["state"]["paraphraser"]
    leaves = {k: v for k, v in flat(trained).items()}
    assert leaves.keys() == flat(final).keys()
    for key, value in leaves.items():
        np.testing.assert_array_equal(flat(final)[key], value)  # loaded, then never updated
    assert any(not np.array_equal(v, flat(first_ckpt)[k]) for k, v in leaves.items())  # trained on

    ft = [r for r in records if r["phase"] == "ft" and r["kind"] == "train"]
    _, beta = recipes.FT_BASELINE
    assert len(ft) == TOTAL
    for r in ft:
        assert r["loss"] == pytest.approx(r["ce"] + beta * r["factor"], rel=1e-4)
    summary = json.loads((ft_run / "summary.json").read_text())
    assert summary["ft"]["record"]["phases.ft.aux_from"] == "ft_paraphraser"
    assert summary["ft_paraphraser"]["record"]["phases.ft_paraphraser.kind"] == "paraphraser"



PARAPHRASER_ONLY = "--config.phase_order=teacher,calibrate,ft_paraphraser"


def test_sigkilled_paraphraser_phase_resumes_to_identical_state(ft_run, tmp_path):
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cli_command("ft", killed, PARAPHRASER_ONLY), cwd=REPO, env=subprocess_env(1),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len([s for s in finalized_steps(killed / "ft_paraphraser") if 0 < s < TOTAL]) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no two mid-phase paraphraser checkpoints ({proc.poll()}):\n{tail(log)}")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    steps = finalized_steps(killed / "ft_paraphraser")
    assert steps[-1] < TOTAL and not read_meta(killed / "ft_paraphraser" / str(steps[-1]))["completed"]
    out = run_cli("ft", killed, PARAPHRASER_ONLY, timeout=600)
    assert f"[ft_paraphraser] resuming from step {steps[-1]}" in out.stdout
    assert finalized_steps(killed / "ft_paraphraser")[-1] == TOTAL
    # Every array: paraphraser weights, SGD momentum, step, rng.
    assert_trees_identical(read_state(killed / "ft_paraphraser" / str(TOTAL)),
                           read_state(ft_run / "ft_paraphraser" / str(TOTAL)))
