"""Factor Transfer through the CLI on digits: `--config=tests/e2e/helpers.py:ft` runs teacher
(0 epochs) -> calibrate -> 'ft_paraphraser' (11 steps) -> 'ft' (feature='factor', 11 steps) on
one CPU device. The paraphraser phase trains (its weights move, its MSE is logged every step);
the student phase holds exactly that paraphraser, frozen, in its auxiliary state from start to
end, and logs the factor term whose beta-weighted sum with the CE is the loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qkd_jax.run import recipes
from tests.e2e.helpers import read_metrics, read_state, run_cli

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
    leaves = {k: v for k, v in _flat(trained).items()}
    assert leaves.keys() == _flat(final).keys()
    for key, value in leaves.items():
        np.testing.assert_array_equal(_flat(final)[key], value)  # loaded, then never updated
    assert any(not np.array_equal(v, _flat(first_ckpt)[k]) for k, v in leaves.items())  # trained on

    ft = [r for r in records if r["phase"] == "ft" and r["kind"] == "train"]
    _, beta = recipes.FT_BASELINE
    assert len(ft) == TOTAL
    for r in ft:
        assert r["loss"] == pytest.approx(r["ce"] + beta * r["factor"], rel=1e-4)
    summary = json.loads((ft_run / "summary.json").read_text())
    assert summary["ft"]["record"]["phases.ft.aux_from"] == "ft_paraphraser"
    assert summary["ft_paraphraser"]["record"]["phases.ft_paraphraser.kind"] == "paraphraser"


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out
