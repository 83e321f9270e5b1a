"""FSP through the CLI on digits: `--config=tests/e2e/helpers.py:fsp` runs teacher (0 epochs) ->
calibrate -> 'fsp_init' (11 steps of the FSP losses alone, the classifier frozen) -> 'fsp'
(plain CE, 11 steps) on one CPU device. The classifier leaves 'fsp_init' bit-identical to the
calibration's (no update, no weight decay) while the feature layers move; the logged loss is
the FSP term alone; the main phase logs no feature term."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.e2e.helpers import flat, read_metrics, read_state, run_cli

pytestmark = pytest.mark.slow

TOTAL = 11  # 1437 digits // 128, one epoch



@pytest.fixture(scope="module")
def fsp_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fsp") / "work"
    run_cli("fsp", workdir, timeout=900)
    return workdir


def test_fsp_init_trains_the_features_only_then_plain_ce(fsp_run):
    calib_dir = sorted(p for p in (fsp_run / "calibrate").iterdir() if p.name.isdigit())[-1]
    before = flat(read_state(calib_dir)["params"])
    after = flat(read_state(fsp_run / "fsp_init" / str(TOTAL))["params"])
    assert before.keys() == after.keys()
    classifier = [k for k in before if k.startswith("['classifier']")]
    assert classifier
    for key in classifier:
        np.testing.assert_array_equal(after[key], before[key])
    assert any(not np.array_equal(after[k], before[k]) for k in before if k.startswith("['layer"))

    records = read_metrics(fsp_run)
    init = [r for r in records if r["phase"] == "fsp_init" and r["kind"] == "train"]
    assert len(init) == TOTAL
    for r in init:
        assert math.isfinite(r["fsp"]) and r["loss"] == pytest.approx(r["fsp"], rel=1e-5)
        assert "ce" not in r
    main = [r for r in records if r["phase"] == "fsp" and r["kind"] == "train"]
    assert len(main) == TOTAL and all("fsp" not in r for r in main)
