"""experiments/estimators_digits.py --quick end to end (one seed, one epoch, interval and LSQ at W2A2,
STE / DSQ / noise): every run trains, the report shows every cell, the descent check of each
estimator and the paired-test table (n = 1: no test), and the CSV holds one row per run."""

from __future__ import annotations

import csv

from experiments import estimators_digits as ed


def test_quick_grid(tmp_path):
    opts = ed.parse_args(["--quick", f"--out={tmp_path / 'est'}", f"--workdirs={tmp_path / 'w'}"])
    rows = ed.run_grid(opts)
    ed.write_report(opts, rows, 1.0)
    assert len(rows) == 2 * 3
    assert all(0.0 <= r["top1"] <= 100.0 and 0.0 <= r["descent"] <= 1.0 for r in rows)
    md = (tmp_path / "est.md").read_text()
    for method in ("interval", "lsq"):
        for est in ("ste", "dsq", "noise"):
            assert f"| {method} | 2/2 | {est} |" in md
    assert "n < 2: no test" in md and "| noise |" in md
    with open(tmp_path / "est_runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
