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
    from qkd_jax.run.plan import phase_seed

    opts = fk.parse_args([f"--workdirs={tmp_path}", f"--out={tmp_path / 'r'}", "--epochs=3", "--teacher-epochs=2",
                          "--init-epochs=2"])
    specs = fk.plan(opts)
    n_baselines = len(recipes.FEATURE_BASELINES) + len(recipes.TWO_PHASE_BASELINES)
    assert len(specs) == 3 * (1 + 2 + n_baselines)
    assert {"ft", "fsp"} <= set(opts.methods)
    assert next(a for s, a in specs if s == 0) == "teacher", "the teacher runs before its students"
    seeds = {}
    for seed, arm in specs:
        c = fk.build_config(seed, arm, opts)
        validate_config(c)
        if arm == "teacher":
            assert c.phase_order == "teacher" and c.phases.teacher.epochs == 2
            continue
        slot = {"ft": "ft_paraphraser", "fsp": "fsp_init"}.get(arm, "no_init")
        assert c.phase_order == f"teacher,calibrate,{slot},{arm}"
        # same calibration and student data order for every method of a seed: the same phase seeds
        seeds.setdefault(seed, set()).add((phase_seed(c, "calibrate"), phase_seed(c, arm)))
        assert c.teacher_checkpoint == str(opts.budget_dir / f"seed{seed}" / "teacher" / "teacher")
        assert (c.quant.method, c.quant.w_bits, c.quant.a_bits) == ("interval", 2, 2)
        ph, init = c.phases[arm], c.phases[slot]
        assert ph.epochs == 3 and c.seed == seed and ph.init_from == ("fsp_init" if arm == "fsp" else "calibrate")
        if arm in recipes.FEATURE_BASELINES:
            feature, beta = recipes.FEATURE_BASELINES[arm]
            assert (ph.objective, ph.gamma, ph.alpha, ph.beta, ph.feature) == ("kd", 1.0, 0.0, beta, feature)
        if slot == "no_init":  # the teacher checkpoint read again: nothing trained
            assert init.kind == "teacher"
        elif arm == "ft":
            assert (init.kind, init.teacher_from, init.epochs) == ("paraphraser", "teacher", 2)
            assert (ph.objective, ph.gamma, ph.alpha, ph.beta, ph.feature, ph.aux_from) == (
                "kd", 1.0, 0.0, 200.0, "factor", "ft_paraphraser")
        else:
            assert (init.kind, init.objective, init.gamma, init.alpha, init.beta, init.feature, init.freeze,
                    init.epochs, init.init_from) == ("student", "kd", 0.0, 0.0, 1.0, "fsp", "classifier", 2,
                                                     "calibrate")
            assert init.weights.optimizer == "sgd" and init.weights.learning_rate == ph.weights.learning_rate
            assert init.quant_params.to_dict() == ph.quant_params.to_dict()  # digits deviation (docstring)
            assert (ph.objective, ph.feature) == ("task", "")
    assert all(len(v) == 1 for v in seeds.values()) and len(seeds) == 3
    assert fk.build_config(0, "crd", opts).phases.crd.feature_options.nce_k == 1024
    assert fk.build_config(0, "sqakd", opts).phases.sqakd.objective == "sqakd"
    assert fk.parse_args(["--epochs=2"]).init_epochs == 2 and fk.parse_args([]).init_epochs == 3


def test_a_criterion_added_to_recipes_is_a_method(monkeypatch):
    """The method list comes from recipes: a new FEATURE_BASELINES entry needs no line here."""
    import importlib

    monkeypatch.setitem(recipes.FEATURE_BASELINES, "newkd", ("attention", 5.0))
    try:
        importlib.reload(fk)
        opts = fk.parse_args(["--methods=newkd,ft", "--workdirs=/tmp/unused"])
        assert opts.arms == ("sqakd", "qat", "newkd", "ft")
        ph = fk.build_config(0, "newkd", opts).phases.newkd
        assert (ph.feature, ph.beta) == ("attention", 5.0) and "newkd" in fk.LABEL
    finally:
        monkeypatch.undo()
        importlib.reload(fk)
    assert "newkd" not in fk.BASELINES


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
    """--quick with FT, then again with FT and FSP: the second run reads the first one's runs back
    and trains FSP only."""
    args = ["--quick", f"--out={tmp_path / 'docs' / 'fk'}", f"--workdirs={tmp_path / 'w'}"]
    first: list[str] = []
    fk.reproduce(fk.parse_args(args + ["--methods=ft"]), log=first.append)
    assert len(first) == 4 and not any(x.endswith("(reused)") for x in first)
    opts = fk.parse_args(args + ["--methods=ft,fsp"])
    log: list[str] = []
    paths = fk.reproduce(opts, log=log.append)
    assert [x.endswith("(reused)") for x in log] == [True, True, True, True, False]
    assert log[-1].startswith("[5/5] seed0/fsp")
    logged = {}
    for arm in ("teacher", "sqakd", "qat", "ft", "fsp"):
        lines = (opts.budget_dir / "seed0" / arm / "metrics.jsonl").read_text().splitlines()
        evals = [json.loads(x) for x in lines if '"kind": "eval"' in x]
        logged[arm] = [e for e in evals if e["phase"] == arm][-1]["top1"]
        assert 0.0 <= logged[arm] <= 100.0
    for arm, init in (("ft", "ft_paraphraser"), ("fsp", "fsp_init")):  # the init phase ran first
        assert (opts.budget_dir / "seed0" / arm / init).is_dir()
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
    assert len(again) == 5 and all(x.endswith("(reused)") for x in again)
