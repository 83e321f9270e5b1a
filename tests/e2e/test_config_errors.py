"""Bad configs, missing data and missing teachers stop with errors that say what to fix.

Config and missing-data errors are raised by `loop.run` before it creates the workdir (so
before any work); the missing-teacher errors before any training step. The CLI prints these as
one line without a traceback. (A NaN loss: tests/e2e/test_run_outputs.py.)
"""

from __future__ import annotations

import pytest

from qkd_jax.data import DatasetNotPreparedError
from qkd_jax.run import loop
from qkd_jax.run.config_schema import ConfigError
from tests.e2e.helpers import (
    finalized_steps,
    qkd_chain,
    run_cli,
    sqakd_chain,
    teacher_only,
)


def _full_config():
    """A valid config with every phase kind: teacher, calibrate, sqakd and the QKD phases."""
    c = teacher_only()
    sqakd_chain(c)
    qkd_chain(c)
    return c


def _set(path: str, value):
    def mutate(c):
        *parents, leaf = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value

    return mutate


BAD_CONFIGS = [
    ("unknown_top_level_key", _set("learning_rate", 0.1), "unknown config key 'learning_rate'"),
    ("unknown_nested_key", _set("quant.bitz", 3), "unknown config key 'quant.bitz'"),
    ("unknown_phase_key", _set("phases.sqakd.lr", 0.1), "unknown config key 'phases.sqakd.lr'"),
    ("w_bits_9", _set("quant.w_bits", 9), "config.quant.w_bits=9 is invalid: must be an integer in [1, 8]"),
    ("w_bits_0", _set("quant.w_bits", 0), "config.quant.w_bits=0 is invalid"),
    ("unknown_model", _set("model.name", "resnet9000"), "config.model.name='resnet9000' is invalid: unknown model"),
    ("unknown_method", _set("quant.method", "ternary"), "config.quant.method='ternary' is invalid"),
    ("phase_order_names_missing_phase",
     _set("phase_order", "teacher,calibrate,sqakd,self_study,co_study,tutoring,ghost"),
     "phase 'ghost' is not defined in config.phases"),
    ("student_without_init_from", _set("phases.sqakd.init_from", ""),
     "config.phases.sqakd.init_from='' is invalid: a student phase needs the phase it starts from"),
    ("teacher_objective_without_teacher_from", _set("phases.tutoring.teacher_from", ""),
     "config.phases.tutoring.teacher_from='' is invalid: objective 'tutoring' needs a teacher"),
    ("co_study_without_train_teacher", _set("phases.co_study.train_teacher", False),
     "config.phases.co_study.train_teacher=False is invalid"),
]


@pytest.mark.parametrize("mutate,expected", [b[1:] for b in BAD_CONFIGS], ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_fails_before_any_work(mutate, expected, tmp_path):
    config = _full_config()
    loop.validate_config(config)  # the starting point is valid
    mutate(config)
    with pytest.raises(ConfigError) as err:
        loop.run(config, tmp_path / "work")
    assert expected in str(err.value)
    assert not (tmp_path / "work").exists()


def test_cli_unknown_override_names_the_flag(tmp_path):
    proc = run_cli("teacher", tmp_path / "work", "--config.quant.bitz=3", check=False, timeout=120)
    assert proc.returncode == 1
    assert ("FATAL Flags parsing error: --config.quant.bitz: unknown config key 'quant.bitz'"
            in proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "work").exists()


def test_cli_impossible_value_names_the_key(tmp_path):
    proc = run_cli("teacher", tmp_path / "work", "--config.quant.w_bits=9", check=False, timeout=120)
    assert proc.returncode == 1
    assert ("qkd_jax: ConfigError: config.quant.w_bits=9 is invalid: must be an integer in [1, 8]"
            in proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "work").exists()


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    config = teacher_only(batch_size=64)
    config.dataset.name = "cifar10"
    config.dataset.data_dir = str(tmp_path / "empty")
    with pytest.raises(DatasetNotPreparedError) as err:
        loop.run(config, tmp_path / "work")
    message = str(err.value)
    assert "dataset 'cifar10' is not prepared" in message
    assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path / 'empty'}" in message
    assert not (tmp_path / "work").exists()  # checked before the run starts


def test_missing_teacher_checkpoint_dir(tmp_path):
    config = teacher_only()
    config.teacher_checkpoint = str(tmp_path / "no_such_run" / "teacher")
    with pytest.raises(FileNotFoundError) as err:
        loop.run(config, tmp_path / "work")
    assert not isinstance(err.value, DatasetNotPreparedError)
    assert f"config.teacher_checkpoint='{tmp_path}/no_such_run/teacher' does not exist" in str(err.value)
    assert not (tmp_path / "no_such_run").exists()  # not created as a side effect


def test_teacher_checkpoint_dir_without_checkpoint(tmp_path):
    (tmp_path / "empty_teacher").mkdir()
    config = teacher_only()
    config.teacher_checkpoint = str(tmp_path / "empty_teacher")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        loop.run(config, tmp_path / "work")
    assert finalized_steps(tmp_path / "empty_teacher") == []  # nothing trained into it
