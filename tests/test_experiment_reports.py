"""The experiment reports rebuilt from their per-run CSVs (--report-only, --merge-runs): no training.

The raw and Holm-adjusted p-values in the tables are checked against closed forms: with 2 degrees
of freedom the two-sided t-test p is 1 - |t| / sqrt(2 + t^2), and Holm over two tests multiplies
the smaller p by 2 and takes the larger as max(2 p_min, p_max) (computed here step by step).
"""

from __future__ import annotations

import csv
import json
import math
import pathlib

import numpy as np
import pytest

from experiments import feature_kd_digits as fk
from experiments import reproduce_digits as rd

RUN_COLUMNS = "section,method,bits,variant,seed,top1,top5,loss,run_wall_s\n"


def _p_df2(diffs) -> float:
    d = np.asarray(diffs, dtype=float)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return 1.0 - abs(t) / math.sqrt(2.0 + t * t)


def _holm_by_hand(p: dict) -> dict:
    """Holm's step-down over the tests in `p`: the k-th smallest (k from 0) times m - k, running maximum."""
    out, running = {}, 0.0
    for k, key in enumerate(sorted(p, key=p.get)):
        running = max(running, min(1.0, (len(p) - k) * p[key]))
        out[key] = running
    return out


def _grid_csv(path: pathlib.Path, qkd_top1: dict[str, list[float]]) -> dict:
    """teacher + interval and pact W2A2 (qat, sqakd) + the QKD rows, 3 seeds. Returns the grid top-1."""
    grid = {("interval", "qat"): [90.0, 91.0, 92.5], ("interval", "sqakd"): [92.0, 92.5, 95.5],
            ("pact", "qat"): [80.0, 85.0, 82.0], ("pact", "sqakd"): [81.0, 84.0, 84.0]}
    lines = [RUN_COLUMNS]
    for s, t in enumerate([99.0, 98.5, 99.5]):
        lines.append(f"teacher,fp,32,fp,{s},{t},100,0.1,10\n")
    for (m, v), vals in grid.items():
        lines += [f"grid,{m},2,{v},{s},{x},100,0.1,20\n" for s, x in enumerate(vals)]
    for v, vals in qkd_top1.items():
        lines += [f"qkd,qkd,2,{v},{s},{x},100,0.1,30\n" for s, x in enumerate(vals)]
    path.write_text("".join(lines))
    return grid


def _table_row(md: str, start: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_reproduction_report_only_and_merge(tmp_path):
    out = tmp_path / "reproduction"
    old_qkd = {"qkd": [80.0, 81.0, 82.0], "tutoring_only": [83.0, 84.0, 85.0], "self_study_only": [70.0, 71.0, 72.0]}
    grid = _grid_csv(tmp_path / "reproduction_runs.csv", old_qkd)
    (tmp_path / "reproduction_meta.json").write_text(json.dumps(
        {"command": "python experiments/reproduce_digits.py --seeds=3", "header": ["- machine: the original one"],
         "deltas": "", "notes": []}))
    args = ["--report-only", f"--out={out}", "--methods=interval,pact", "--bits=2", "--ablations=qkd",
            "--epochs=4", "--teacher-epochs=10"]
    paths = rd.report_only(rd.parse_args(args), log=lambda _: None)
    md = paths["md"].read_text()
    assert "- machine: the original one" in md and "`--report-only`" in md
    assert "python experiments/reproduce_digits.py --seeds=3" in md  # the training command, from the meta
    p = {m: _p_df2(np.subtract(grid[(m, "sqakd")], grid[(m, "qat")])) for m in ("interval", "pact")}
    p_holm = _holm_by_hand(p)
    assert p_holm[min(p, key=p.get)] == pytest.approx(2 * min(p.values()))
    for m, label in (("interval", "EWGS interval"), ("pact", "PACT")):
        cells = _table_row(md, f"| {label} | W2A2 |")
        assert float(cells[6]) == pytest.approx(p[m], abs=1e-4)
        assert float(cells[7]) == pytest.approx(p_holm[m], abs=1e-4)
    assert _table_row(md, "| self-study -> co-study -> tutoring |")[2] == "81.00 ± 1.00"

    # A rerun of the QKD rows (with its own teachers) replaces only those rows.
    new_qkd = {"qkd": [96.0, 97.0, 98.0], "tutoring_only": [95.0, 96.0, 97.0], "self_study_only": [94.0, 95.0, 96.0]}
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    (rerun / "r_runs.csv").write_text(RUN_COLUMNS + "".join(
        [f"teacher,fp,32,fp,{s},{t},100,0.1,10\n" for s, t in enumerate([98.0, 98.25, 97.5])]
        + [f"qkd,qkd,2,{v},{s},{x},100,0.1,30\n" for v, vals in new_qkd.items() for s, x in enumerate(vals)]))
    before = {tuple(r[k] for k in ("section", "method", "bits", "variant", "seed")): float(r["top1"])
              for r in csv.DictReader(open(paths["runs_csv"]))}
    rd.report_only(rd.parse_args(args + [f"--merge-runs={rerun / 'r_runs.csv'}"]), log=lambda _: None)
    after = {tuple(r[k] for k in ("section", "method", "bits", "variant", "seed")): float(r["top1"])
             for r in csv.DictReader(open(paths["runs_csv"]))}
    assert set(after) == set(before)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {k for k in after if k[0] == "qkd"}  # teacher and grid rows untouched
    md = paths["md"].read_text()
    assert _table_row(md, "| self-study -> co-study -> tutoring |")[2] == "97.00 ± 1.00"
    assert "FP32 ResNet-20 teacher (cross-entropy): **99.00 ± 0.50**" in md  # the original teachers
    note = json.loads((tmp_path / "reproduction_meta.json").read_text())["notes"]
    assert len(note) == 1 and "qkd" in note[0] and "98.00, 98.25, 97.50" in note[0] and note[0] in md

    # A merge never adds settings.
    (rerun / "x_runs.csv").write_text(RUN_COLUMNS + "grid,lsq,2,qat,0,90,100,0.1,1\n")
    with pytest.raises(ValueError, match="rows not in the report"):
        rd.report_only(rd.parse_args(args + [f"--merge-runs={rerun / 'x_runs.csv'}"]), log=lambda _: None)


def test_merge_runs_needs_report_only(capsys):
    with pytest.raises(SystemExit):
        rd.parse_args(["--merge-runs=x_runs.csv"])
    assert "--merge-runs needs --report-only" in capsys.readouterr().err


def test_feature_report_only_rebuilds_the_tables_with_holm(tmp_path):
    out = tmp_path / "fk"
    top1 = {"teacher": [95.0, 96.0, 94.5], "sqakd": [80.0, 82.5, 81.0], "qat": [79.0, 80.0, 82.0],
            "at": [70.0, 71.0, 75.0], "fsp": [81.0, 83.0, 82.5]}
    (tmp_path / "fk_runs.csv").write_text("method,seed,top1,loss,run_wall_s\n" + "".join(
        f"{a},{s},{v[s]},0.5,1.0\n" for a, v in top1.items() for s in range(3)))
    opts = fk.parse_args([f"--out={out}", "--methods=at,fsp", "--epochs=5", "--report-only"])
    assert opts.report_only and "--report-only" not in opts.command
    paths = fk.report_only(opts, log=lambda _: None)
    md = paths["md"].read_text()
    p = {a: _p_df2(np.subtract(top1["sqakd"], top1[a])) for a in ("qat", "at", "fsp")}
    holm = _holm_by_hand(p)
    with open(paths["csv"], newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    for a in p:
        assert float(rows[a]["paired_t_p"]) == pytest.approx(p[a], abs=1e-4)
        assert float(rows[a]["holm_p"]) == pytest.approx(holm[a], abs=1e-4)
        assert f"| {p[a]:.3f} | {holm[a]:.3f} |" in md
    assert "Best mean (82.17): FSP init, then QAT (CE); FSP trained 3 init epoch(s) before its 5 student epochs" in md
