"""experiments/squat_digits.py without training: the run configs pair the arms (same teacher,
calibration position and data-order position, equal delta policy except the labelled mismatch
row), and --report-only rebuilds the table whose p-values are checked against closed forms
(df = 2: p = 1 - |t| / sqrt(2 + t^2); Holm computed here step by step)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from experiments import squat_digits as sd


def _p_df2(diffs) -> float:
    d = np.asarray(diffs, dtype=float)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return 1.0 - abs(t) / math.sqrt(2.0 + t * t)


def _holm_by_hand(p: dict) -> dict:
    out, running = {}, 0.0
    for k, key in enumerate(sorted(p, key=p.get)):
        running = max(running, min(1.0, (len(p) - k) * p[key]))
        out[key] = running
    return out


def test_quick_options_and_paired_run_configs(tmp_path):
    opts = sd.parse_args(["--quick", f"--workdirs={tmp_path}"])
    assert (opts.seeds, opts.epochs, opts.methods, opts.bits) == (1, 1, ("interval", "lsq"), (2,))
    assert opts.settings()[-1] == ("interval", 2, sd.MISMATCH)
    assert len(sd.plan(opts)) == 1 + 2 * 2 + 1
    configs = {arm: sd.build_config(0, "interval", 2, arm, opts) for arm in ("sqakd", "squat", sd.MISMATCH)}
    for arm, c in configs.items():
        assert c.phase_order == f"teacher,calibrate,{arm}"  # the same positions: calibration and data order
        assert c.teacher_checkpoint == configs["sqakd"].teacher_checkpoint and c.seed == 0
        assert (c.quant.method, c.quant.w_bits, c.quant.a_bits) == ("interval", 2, 2)
        assert c.quant.estimator == ("hessian" if arm == sd.MISMATCH else "ste")
    sq, squat = configs["sqakd"].phases.sqakd, configs["squat"].phases.squat
    assert squat.objective == "squat" and squat.gamma == 0.0 and squat.beta == 1.0
    for key in ("weights", "quant_params", "batch_size", "epochs", "init_from", "teacher_from", "temperature"):
        assert squat[key] == sq[key], key
    with pytest.raises(SystemExit):
        sd.parse_args(["--methods=vgg"])


def test_report_only_rebuilds_the_table_with_holm(tmp_path):
    top1 = {("interval", 2, "sqakd"): [80.0, 82.5, 81.0], ("interval", 2, "squat"): [83.0, 83.5, 85.0],
            ("lsq", 2, "sqakd"): [70.0, 71.0, 75.0], ("lsq", 2, "squat"): [69.0, 72.5, 74.0],
            ("interval", 2, sd.MISMATCH): [86.0, 84.0, 88.5]}
    rows = "".join(f"{m},{b},{a},{s},{v[s]},0.5,1.0\n" for (m, b, a), v in top1.items() for s in range(3))
    rows += "".join(f"fp,32,teacher,{s},95.0,0.1,1.0\n" for s in range(3))
    (tmp_path / "sq_runs.csv").write_text(",".join(sd.RUN_COLUMNS) + "\n" + rows)
    opts = sd.parse_args([f"--out={tmp_path / 'sq'}", "--methods=interval,lsq", "--bits=2", "--report-only"])
    paths = sd.report_only(opts, log=lambda _: None)
    md = paths["md"].read_text()
    keys = {"interval": ("interval", 2, "squat"), "lsq": ("lsq", 2, "squat"), "mismatch": ("interval", 2, sd.MISMATCH)}
    p = {k: _p_df2(np.subtract(top1[key], top1[(key[0], 2, "sqakd")])) for k, key in keys.items()}
    holm = _holm_by_hand(p)
    with open(paths["csv"], newline="") as f:
        got = {(r["method"], r["arm"]): r for r in csv.DictReader(f)}
    for k, (m, _, arm) in keys.items():
        assert float(got[(m, arm)]["paired_t_p"]) == pytest.approx(p[k], abs=1e-4)
        assert float(got[(m, arm)]["holm_p"]) == pytest.approx(holm[k], abs=1e-4)
        assert f"| {p[k]:.3f} | {holm[k]:.3f} |" in md
    assert "released mismatch: SQuaT Hessian delta vs SQAKD delta 0" in md
    assert "FP teacher: **95.00 ± 0.00**" in md and paths["png"].exists()
