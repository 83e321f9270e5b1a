"""The workdir is the record of what was trained: a rerun with changed settings is refused
before anything is run or written, `retrain_from` retrains, export checks the record.

One finished run (digits, teacher -> calibrate -> sqakd, `helpers.record_config`, one device)
is made once per module; each test works on its own copy of it.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from qkd_jax.quant.export import ConfigMismatchError
from qkd_jax.run.config_schema import ConfigError
from qkd_jax.run.export_checkpoint import export_checkpoint
from qkd_jax.run.loop import run
from qkd_jax.run.rerun import ConfigChangedError
from qkd_jax.train.checkpoint import CorruptCheckpointError
from tests.e2e.helpers import finalized_steps, mesh, read_meta, read_state, record_config, run_cli

pytestmark = pytest.mark.slow
PHASES = ("teacher", "calibrate", "sqakd")


def _snapshot(workdir: pathlib.Path) -> dict[str, bytes]:
    """Every file of the workdir with its bytes: a refused rerun must leave all of them alone."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def _meta(workdir: pathlib.Path, phase: str) -> dict:
    return read_meta(workdir / phase / str(finalized_steps(workdir / phase)[-1]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("record") / "run"
    results = run(record_config(), workdir, mesh=mesh(1))
    return workdir, results


@pytest.fixture
def workdir(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished[0], copy)
    return copy


def _refused(config, workdir: pathlib.Path) -> str:
    """Runs `config` in `workdir`, expects ConfigChangedError and nothing written; its message."""
    before = _snapshot(workdir)
    with pytest.raises(ConfigChangedError) as err:
        run(config, workdir, mesh=mesh(1))
    assert _snapshot(workdir) == before
    return str(err.value)


def test_every_phase_records_its_settings(finished):
    workdir, _ = finished
    teacher, calibrate, sqakd = (_meta(workdir, p)["record"] for p in PHASES)
    assert teacher["phases.teacher.batch_size"] == 128 and "quant.w_bits" not in teacher
    assert calibrate["quant.w_bits"] == 2 and calibrate["quant.method"] == "interval"
    assert sqakd["phases.sqakd.batch_size"] == 128 and sqakd["phases.sqakd.epochs"] == 1
    assert sqakd["phases.sqakd.objective"] == "sqakd" and sqakd["phases.sqakd.teacher_from"] == "teacher"
    assert sqakd["model.num_classes"] == 10 and sqakd["dataset.image_size"] == 16
    assert not any(k.endswith(("log_every_steps", "checkpoint_every_steps", "eval_batch_size"))
                   for k in sqakd)
    assert all(_meta(workdir, p)["device_count"] == 1 for p in PHASES)  # checked on resume (rerun.py)


def test_changed_batch_size_is_refused_and_config_json_kept(workdir):
    config = record_config()
    config.phases.sqakd.batch_size = 64
    message = _refused(config, workdir)
    assert "phases.sqakd.batch_size: recorded 128, now 64" in message
    assert "--config.retrain_from=sqakd" in message and "new --workdir" in message
    assert len(message.splitlines()) <= 20


def test_interrupted_phase_with_changed_batch_size_is_refused(workdir):
    shutil.rmtree(workdir / "sqakd" / "11")  # the newest checkpoint is now mid-phase (step 10)
    assert _meta(workdir, "sqakd")["completed"] is False
    config = record_config()
    config.phases.sqakd.batch_size = 64
    assert "phases.sqakd.batch_size: recorded 128, now 64" in _refused(config, workdir)


def test_changed_bits_are_refused_naming_them(workdir):
    config = record_config()
    config.quant.w_bits = config.quant.a_bits = 4
    message = _refused(config, workdir)
    assert "quant.w_bits: recorded 2, now 4  (phases calibrate, sqakd)" in message
    assert "quant.a_bits: recorded 2, now 4" in message
    assert "--config.retrain_from=calibrate" in message
    assert "phases.teacher" not in message  # the FP teacher does not depend on the bits


def test_changed_delta_after_calibration_is_refused(workdir):
    config = record_config()
    config.quant.delta, config.quant.estimator = 0.1, "ewgs"
    message = _refused(config, workdir)
    assert "quant.delta: recorded 0.0, now 0.1" in message
    assert "quant.estimator: recorded 'ste', now 'ewgs'" in message


def test_changed_method_is_a_setting_change_not_a_corrupt_checkpoint(workdir):
    config = record_config()
    config.quant.method = "lsq"
    try:
        message = _refused(config, workdir)
    except CorruptCheckpointError as err:  # what a restore attempt with other parameters gives
        pytest.fail(f"restore attempted before the record check: {str(err)[:300]}")
    assert "quant.method: recorded 'interval', now 'lsq'" in message
    assert len(message) < 2000


def test_phase_whose_source_was_deleted_is_refused(workdir):
    shutil.rmtree(workdir / "teacher")
    message = _refused(record_config(), workdir)
    assert "init_from phase 'teacher' has no checkpoint" in message


def test_retrain_from_calibrate_retrains_it_and_later_phases(workdir, finished):
    config = record_config()
    config.quant.delta, config.quant.estimator = 0.1, "ewgs"
    config.retrain_from = "calibrate"
    teacher_before = _snapshot(workdir / "teacher")
    results = run(config, workdir, mesh=mesh(1))
    assert _snapshot(workdir / "teacher") == teacher_before  # read back, not retrained
    deltas = jax.tree.leaves(read_state(workdir / "calibrate" / "0")["quant_delta"])
    assert deltas and all(np.all(np.asarray(d) == np.float32(0.1)) for d in deltas)
    for phase in ("calibrate", "sqakd"):
        record = _meta(workdir, phase)["record"]
        assert record["quant.delta"] == 0.1 and record["quant.estimator"] == "ewgs"
    assert finalized_steps(workdir / "sqakd") == [10, 11]
    assert results["sqakd"].eval != finished[1]["sqakd"].eval  # trained again, from new deltas
    stored = json.loads((workdir / "config.json").read_text())
    assert stored["quant"]["delta"] == 0.1 and stored["retrain_from"] == ""
    # The new settings are now the record: rerunning them (without retrain_from) reads back.
    config.retrain_from = ""
    again = run(config, workdir, mesh=mesh(1))
    assert again["sqakd"].eval == results["sqakd"].eval


def test_unchanged_rerun_reads_everything_back(workdir, finished, capsys):
    config = record_config()
    config.log_every_steps = 3  # cadence is not a setting of the result: no refusal
    capsys.readouterr()
    results = run(config, workdir, mesh=mesh(1))
    out = capsys.readouterr().out
    assert "[calibrate] already calibrated" in out and "[sqakd] already completed at step 11" in out
    assert {p: r.eval for p, r in results.items()} == {p: r.eval for p, r in finished[1].items()}
    # Nothing trained: config.json stays what the training run wrote (log_every_steps 11, not 3).
    assert (workdir / "config.json").read_bytes() == (finished[0] / "config.json").read_bytes()
    assert json.loads((workdir / "config.json").read_text())["log_every_steps"] == 11
    assert "config.json is kept as the run that trained them wrote it" in out


def test_a_subset_of_the_phases_keeps_the_other_rows_of_the_summary(workdir, finished, capsys):
    before = json.loads((workdir / "summary.json").read_text())
    config = record_config()
    config.phase_order = "teacher,calibrate"
    capsys.readouterr()
    run(config, workdir, mesh=mesh(1))
    out = capsys.readouterr().out
    summary = json.loads((workdir / "summary.json").read_text())
    assert list(summary) == list(PHASES)
    assert summary["sqakd"] == {**before["sqakd"], "earlier_run": True}
    assert "earlier_run" not in summary["teacher"] and summary["calibrate"] == before["calibrate"]
    assert "summary.json keeps the rows of sqakd: finished in an earlier run of this workdir" in out


def test_checkpoints_without_record_are_accepted_with_a_warning(workdir, capsys):
    for phase in PHASES:
        for step in finalized_steps(workdir / phase):
            path = workdir / phase / str(step) / "meta" / "metadata"
            meta = json.loads(path.read_text())
            del meta["record"]
            path.write_text(json.dumps(meta))
    config = record_config()
    config.phases.sqakd.batch_size = 64  # nothing recorded to compare with
    run(config, workdir, mesh=mesh(1))
    out = capsys.readouterr().out
    assert out.count("has no settings record") == len(PHASES)
    assert "[sqakd] already completed at step 11" in out


def test_retrain_from_must_name_a_phase(workdir):
    config = record_config()
    config.retrain_from = "qat"
    with pytest.raises(ConfigError, match="retrain_from"):
        run(config, workdir, mesh=mesh(1))


def test_export_refuses_a_config_that_differs_from_the_record(workdir, tmp_path, capsys):
    from qkd_jax.export import main as export_main

    config = record_config()
    config.quant.w_bits = config.quant.a_bits = 4
    with pytest.raises(ConfigMismatchError, match="quant.w_bits: recorded 2, now 4"):
        export_checkpoint(workdir, "sqakd", config=config)
    (tmp_path / "w4a4.json").write_text(config.to_json())
    capsys.readouterr()
    code = export_main([f"--workdir={workdir}", "--phase=sqakd", f"--out={tmp_path / 'x.npz'}",
                        f"--config={tmp_path / 'w4a4.json'}"])
    assert code == 2 and "quant.a_bits: recorded 2, now 4" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("key,value,change", [
    ("estimator", "ewgs", "quant.estimator: recorded 'ste', now 'ewgs'"),
    ("delta", 0.3, "quant.delta: recorded 0.0, now 0.3"),
])
def test_export_refuses_an_estimator_or_delta_the_student_never_trained_with(workdir, tmp_path, capsys, key,
                                                                              value, change):
    from qkd_jax.export import main as export_main

    config = record_config()
    config.quant[key] = value
    with pytest.raises(ConfigMismatchError, match=change):
        export_checkpoint(workdir, "sqakd", config=config)
    (tmp_path / "other.json").write_text(config.to_json())
    capsys.readouterr()
    code = export_main([f"--workdir={workdir}", "--phase=sqakd", f"--out={tmp_path / 'x.npz'}",
                        f"--config={tmp_path / 'other.json'}"])
    assert code == 2 and change in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_cli_prints_the_refusal_as_one_message(workdir):
    before = (workdir / "config.json").read_bytes()
    proc = run_cli("record", workdir, "--config.phases.sqakd.batch_size=64", check=False, timeout=120)
    assert proc.returncode == 1
    assert "qkd_jax: ConfigChangedError:" in proc.stderr and "Traceback" not in proc.stderr
    assert "phases.sqakd.batch_size: recorded 128, now 64" in proc.stderr
    assert (workdir / "config.json").read_bytes() == before
