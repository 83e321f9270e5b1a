"""experiments/feature_kd_digits.py: plan and configs, the report's statistics, and --quick end to end.

The statistics are checked against closed forms (sample mean/std, the paired t-test with 2 degrees
of freedom: p = 1 - |t| / sqrt(2 + t^2)); the end-to-end test checks that the Markdown and CSV hold
the accuracies the runner logged in each run's metrics.jsonl.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from experiments import feature_kd_digits as fk
from qkd_jax.run import recipes


def test_plan_and_every_config(tmp_path):
    from qkd_jax.run.loop import validate_config

    opts = fk.parse_args([f"--workdirs={tmp_path}", f"--out={tmp_path / 'r'}", "--epochs=3", "--teacher-epochs=2"])
    specs = fk.plan(opts)
    assert len(specs) == 3 * (1 + 2 + len(recipes.FEATURE_BASELINES))
    assert next(a for s, a in specs if s == 0) == "teacher", "the teacher runs before its students"
    for seed, arm in specs:
        c = fk.build_config(seed, arm, opts)
        validate_config(c)
        if arm == "teacher":
            assert c.phase_order == "teacher" and c.phases.teacher.epochs == 2
            continue
        # the student always at index 2: the same phase seed, so the same calibration and data order
        assert c.phase_order == f"teacher,calibrate,{arm}"
        assert c.teacher_checkpoint == str(opts.budget_dir / f"seed{seed}" / "teacher" / "teacher")
        assert (c.quant.method, c.quant.w_bits, c.quant.a_bits) == ("interval", 2, 2)
        ph = c.phases[arm]
        assert ph.epochs == 3 and c.seed == seed
        if arm in recipes.FEATURE_BASELINES:
            feature, beta = recipes.FEATURE_BASELINES[arm]
            assert (ph.objective, ph.gamma, ph.alpha, ph.beta, ph.feature) == ("kd", 1.0, 0.0, beta, feature)
    assert fk.build_config(0, "crd", opts).phases.crd.feature_options.nce_k == 1024
    assert fk.build_config(0, "sqakd", opts).phases.sqakd.objective == "sqakd"


def test_bad_method_is_an_error(capsys):
    with pytest.raises(SystemExit):
        fk.parse_args(["--methods=at,foo"])
    assert "unknown ['foo']" in capsys.readouterr().err


def test_report_statistics_match_closed_forms(tmp_path):
    opts = fk.parse_args([f"--workdirs={tmp_path}", f"--out={tmp_path / 'r'}", "--methods=at,rkd"])
    top1 = {"teacher": [95.0, 96.0, 94.5], "sqakd": [80.0, 82.5, 81.0], "qat": [79.0, 80.0, 82.0],
            "at": [70.0, 71.0, 75.0]}  # rkd missing: a partial report
    records = {(s, a): {"top1": v[s], "loss": 0.5, "wall_s": 1.0, "reused": True}
               for a, v in top1.items() for s in range(3)}
    paths = fk.write_outputs(opts, records, wall_s=3.0)
    with open(paths["csv"], newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"teacher", "sqakd", "qat", "at"}
    for arm, vals in top1.items():
        assert float(rows[arm]["mean_top1"]) == pytest.approx(np.mean(vals), abs=0.005)
        assert float(rows[arm]["std_top1"]) == pytest.approx(np.std(vals, ddof=1), abs=0.005)
    md = paths["md"].read_text()
    for arm in ("qat", "at"):
        d = np.array(top1["sqakd"]) - np.array(top1[arm])
        t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
        p = 1.0 - abs(t) / math.sqrt(2.0 + t * t)  # Student's t, df = 2, two-sided
        assert float(rows[arm]["paired_t_p"]) == pytest.approx(p, abs=1e-4)
        assert float(rows[arm]["diff_sqakd_minus_method"]) == pytest.approx(d.mean(), abs=1e-4)
        assert ", ".join(f"{x:+.2f}" for x in d) in md and f"| {p:.3f} |" in md
    assert "Partial results: 3 of 15 runs are missing** (seed0/rkd, seed1/rkd, seed2/rkd)" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_run_reports_the_logged_accuracies(tmp_path):
    opts = fk.parse_args(["--quick", "--methods=none", f"--out={tmp_path / 'docs' / 'fk'}",
                          f"--workdirs={tmp_path / 'w'}"])
    log: list[str] = []
    paths = fk.reproduce(opts, log=log.append)
    logged = {}
    for arm in ("teacher", "sqakd", "qat"):
        lines = (opts.budget_dir / "seed0" / arm / "metrics.jsonl").read_text().splitlines()
        evals = [json.loads(x) for x in lines if '"kind": "eval"' in x]
        logged[arm] = [e for e in evals if e["phase"] == arm][-1]["top1"]
        assert 0.0 <= logged[arm] <= 100.0
    with open(paths["runs_csv"], newline="") as f:
        runs = {r["method"]: float(r["top1"]) for r in csv.DictReader(f)}
    with open(paths["csv"], newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    md = paths["md"].read_text()
    for arm, acc in logged.items():
        assert runs[arm] == pytest.approx(acc, abs=1e-4)
        assert rows[arm]["mean_top1"] == f"{acc:.2f}" and rows[arm]["n_seeds"] == "1"
    diff = logged["sqakd"] - logged["qat"]
    assert float(rows["qat"]["diff_sqakd_minus_method"]) == pytest.approx(diff, abs=1e-4)
    assert f"| {logged['qat']:.2f} | {logged['qat']:.2f} | {diff:+.2f} |" in md
    assert "--quick" in md and "n/a (1 seed)" in md and "Partial" not in md
    again: list[str] = []
    fk.reproduce(opts, log=again.append)
    assert len(again) == 3 and all(x.endswith("(reused)") for x in again)
