"""experiments/estimators_digits.py's statistics and report, from synthetic runs (fast): the paired
differences against the STE, t-test p values (df = 2 closed form) and Holm's step-down by hand."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from experiments import estimators_digits as ed


def _p_df2(diffs) -> float:
    """Two-sided p of a paired t with 2 degrees of freedom: 1 - |t| / sqrt(2 + t^2)."""
    d = np.asarray(diffs, dtype=float)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return 1.0 - abs(t) / math.sqrt(2.0 + t * t)


TOP1 = {("ste",): [90.0, 91.0, 92.0], ("dsq",): [92.0, 92.5, 95.0], ("noise",): [80.0, 85.0, 82.0]}


def _rows():
    rows = []
    for (est,), vals in TOP1.items():
        for seed, v in enumerate(vals):
            rows.append({"method": "lsq", "bits": 2, "estimator": est, "seed": seed, "top1": v,
                         "descent": {"ste": 0.5, "dsq": 0.25, "noise": 0.0}[est], "wall_s": 1.0})
    return rows


def test_comparisons_pair_by_seed_and_apply_holm():
    got = {c["estimator"]: c for c in ed.comparisons(_rows())}
    assert set(got) == {"dsq", "noise"}
    p = {e: _p_df2(np.subtract(TOP1[(e,)], TOP1[("ste",)])) for e in got}
    lo, hi = sorted(p, key=p.get)
    holm = {lo: min(1.0, 2 * p[lo])}
    holm[hi] = max(holm[lo], min(1.0, p[hi]))
    for e, c in got.items():
        assert c["mean"] == pytest.approx(np.mean(np.subtract(TOP1[(e,)], TOP1[("ste",)])))
        assert c["p"] == pytest.approx(p[e], rel=1e-6)
        assert c["p_holm"] == pytest.approx(holm[e], rel=1e-6)


def test_report_files(tmp_path):
    opts = ed.Options(out=tmp_path / "est", workdirs=tmp_path, seeds=3, epochs=1, teacher_epochs=1,
                      methods=("lsq",), bits=(2,), estimators=("ste", "dsq", "noise"), command="cmd --x")
    ed.write_report(opts, _rows(), 60.0)
    md = (tmp_path / "est.md").read_text()
    assert "`cmd --x`" in md and "| lsq | 2/2 | dsq | 93.17 ± 1.61 |" in md
    assert "| noise | 0.000 |" in md and "| ste | 0.500 |" in md
    # Holm by hand: p(noise) = 0.0229 -> 0.0457, p(dsq) = 0.039 -> max(0.0457, 0.039): both below 0.05
    assert "1 significantly better and 1 significantly worse" in md
    assert "- dsq: mean difference to the STE +2.17 points over 1 cells; above the STE in 1, below in 0" in md
    assert "Holm" in md and "](est.png)" in md and (tmp_path / "est.png").stat().st_size > 0
    with open(tmp_path / "est_runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 9


def test_quick_defaults():
    opts = ed.parse_args(["--quick"])
    assert (opts.seeds, opts.epochs, opts.methods, opts.bits) == (1, 1, ("interval", "lsq"), (2,))
    assert "estimators_quick" in str(opts.out) and "docs" not in str(opts.out)
