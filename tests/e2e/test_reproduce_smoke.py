"""experiments/reproduce_digits.py: the grid's plan and configs, and its --quick core end to end.

The end-to-end test trains one seed of the smallest grid (FP teacher, interval W2A2 plain QAT and
SQAKD, one epoch each) on the bundled digits and checks the Markdown, CSV and PNG it writes, then
reruns it to check that finished runs are read back instead of retrained.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "reproduce_digits.py"


@pytest.fixture(scope="module")
def rd():
    spec = importlib.util.spec_from_file_location("reproduce_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_qkd_split_keeps_the_budget(rd):
    assert rd.qkd_split(12) == (2, 6, 4)  # QKD's 30/100/70 of 200 epochs, scaled
    assert rd.qkd_split(3) == (1, 1, 1)
    for budget in range(3, 60):
        split = rd.qkd_split(budget)
        assert sum(split) == budget and min(split) >= 1
    with pytest.raises(ValueError):
        rd.qkd_split(2)


def test_full_plan_and_every_config_validates(rd, tmp_path):
    from qkd_jax.run.loop import validate_config

    opts = rd.parse_args([f"--workdirs={tmp_path}", f"--out={tmp_path / 'r'}"])
    assert (opts.seeds, opts.epochs, opts.teacher_epochs) == (3, 12, 12)
    specs = rd.plan(opts)
    kinds = [s.kind for s in specs]
    # per seed: a teacher, 4 methods x 3 bit widths, the Hessian run (its STE twin is in the grid), QKD
    assert kinds.count("teacher") == 3 and kinds.count("grid") == 36
    assert kinds.count("ewgs") == 3 and kinds.count("qkd") == 3
    assert kinds[:3] == ["teacher"] * 3, "teachers must run before the students that load them"
    assert len({s.name for s in specs}) == len(specs)
    for spec in specs:
        config = rd.build_config(spec, opts)
        validate_config(config)
        for name in config.phase_order.split(","):
            assert config.phases[name].batch_size % 8 == 0
        if spec.kind != "teacher":
            assert config.teacher_checkpoint == str(opts.budget_dir / f"seed{spec.seed}" / "teacher" / "teacher")
            assert config.seed == spec.seed
    qkd = rd.build_config(rd.RunSpec("qkd", 0, "qkd", 2), opts)
    student_epochs = {n: qkd.phases[n].epochs for n in qkd.phase_order.split(",")[2:]}
    assert student_epochs == {"self_study": 2, "co_study": 6, "tutoring": 4, "tutoring_only": 12,
                              "self_study_only": 12}
    hessian = rd.build_config(rd.RunSpec("ewgs", 0, "interval", 2), opts)
    grid = rd.build_config(rd.RunSpec("grid", 0, "interval", 2), opts)
    assert hessian.quant.estimator == "hessian" and grid.quant.estimator == "ste"
    # same position of 'qat' in both runs: same phase seed, so the same data order and calibration
    assert hessian.phase_order.split(",").index("qat") == grid.phase_order.split(",").index("qat")


def test_quick_defaults_stay_out_of_docs(rd):
    opts = rd.parse_args(["--quick"])
    assert (opts.seeds, opts.epochs, opts.teacher_epochs, opts.bits) == (1, 1, 1, (2,))
    assert ROOT / "docs" not in opts.out.parents


@pytest.mark.slow
def test_quick_grid_writes_table_csv_and_plot(rd, tmp_path):
    out = tmp_path / "docs" / "reproduction"
    opts = rd.parse_args(["--quick", "--methods=interval", "--bits=2", "--ablations=none",
                          f"--out={out}", f"--workdirs={tmp_path / 'workdirs'}"])
    log: list[str] = []
    paths = rd.reproduce(opts, log=log.append)

    for key in ("md", "csv", "runs_csv", "png"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["md"].parent == out.parent and paths["md"].name == "reproduction.md"

    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == rd.CSV_COLUMNS
        rows = list(reader)
    keys = {(r["section"], r["method"], r["bits"], r["variant"]) for r in rows}
    assert keys == {("teacher", "fp", "32", "fp"), ("grid", "interval", "2", "qat"),
                    ("grid", "interval", "2", "sqakd")}
    for r in rows:
        assert r["n_seeds"] == "1" and r["std_top1"] == ""  # one seed: no std
        assert 0.0 <= float(r["mean_top1"]) <= 100.0
        assert float(r["min_top1"]) == float(r["max_top1"]) == float(r["mean_top1"])
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["qat"]["labels"] == "yes" and by_variant["sqakd"]["labels"] == "no"

    with open(paths["runs_csv"], newline="") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 3 and all(r["seed"] == "0" for r in runs)
    # Each run's accuracy and loss are the final eval the runner logged in its own metrics.jsonl
    # (a report that mixed up runs, phases or columns would differ here).
    logged = {}
    for run_dir, phases in (("seed0/teacher", ("teacher",)), ("seed0/grid_interval_w2a2", ("qat", "sqakd"))):
        records = [json.loads(x) for x in (opts.budget_dir / run_dir / "metrics.jsonl").read_text().splitlines()]
        for phase in phases:
            logged[phase] = [r for r in records if r["phase"] == phase and r["kind"] == "eval"][-1]
    for r in runs:
        ev = logged["teacher" if r["section"] == "teacher" else r["variant"]]
        assert float(r["top1"]) == pytest.approx(ev["top1"], abs=1e-4), r
        assert float(r["loss"]) == pytest.approx(ev["loss"], rel=1e-4), r
    assert float(by_variant["qat"]["mean_top1"]) == pytest.approx(logged["qat"]["top1"], abs=5e-3)

    md = paths["md"].read_text()
    assert "| method | W/A bits | plain QAT (labels) | SQAKD (no labels) |" in md
    qat, sqakd = float(by_variant["qat"]["mean_top1"]), float(by_variant["sqakd"]["mean_top1"])
    assert f"| EWGS interval | W2A2 | {qat:.2f} | {sqakd:.2f} |" in md
    assert "](reproduction.png)" in md and "wall time" in md and "--quick" in md
    assert "## Reading" in md

    # Resumable: a second invocation reads every finished run back and writes the same table.
    before = paths["csv"].read_text()
    again: list[str] = []
    rd.reproduce(opts, log=again.append)
    run_lines = [line for line in again if line.startswith("[")]
    assert len(run_lines) == 2 and all(line.endswith("(reused)") for line in run_lines), again
    assert paths["csv"].read_text() == before
