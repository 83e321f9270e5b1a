"""The calibrate phase hands the student the teacher's weights AND BatchNorm statistics.

The student's batch statistics and shared weights must equal the teacher's bit for bit. At
W8A8 the calibrated student computes nearly what its teacher computes, so right after
calibration (no training) its accuracy stays near the teacher's (the short-trained teacher's
running statistics lag, which makes its accuracy sensitive to small perturbations: hence the
loose bound); at W2A2 it loses accuracy (the quantizers are really on).
"""

import jax
import ml_collections
import numpy as np
import pytest

from qkd_jax.run.config_schema import phase
from qkd_jax.run.loop import run
from tests.e2e.helpers import mesh, teacher_only


@pytest.mark.slow
def test_w8a8_calibration_keeps_teacher_accuracy(tmp_path):
    config = teacher_only(epochs=2, batch_size=64, log_every_steps=50, checkpoint_every_steps=50)
    config.phases = ml_collections.ConfigDict(
        {"teacher": config.phases.teacher, "calibrate": phase("calibrate", init_from="teacher", batch_size=128)}
    )
    config.phase_order = "teacher,calibrate"
    config.quant.w_bits = config.quant.a_bits = 8
    results = run(config, tmp_path / "w8", mesh=mesh())
    teacher, calibrated = results["teacher"].eval["top1"], results["calibrate"].eval["top1"]
    assert teacher > 50.0  # two short epochs: well above chance (10%)
    t_vars, s_vars = results["teacher"].student, results["calibrate"].student
    for a, b in zip(jax.tree.leaves(t_vars["batch_stats"]), jax.tree.leaves(s_vars["batch_stats"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(t_vars["params"]["layer1_0"]["conv1"]["kernel"]),
                                  np.asarray(s_vars["params"]["layer1_0"]["conv1"]["kernel"]))
    assert abs(calibrated - teacher) <= 15.0, (teacher, calibrated)

    config.quant.w_bits = config.quant.a_bits = 2
    config.teacher_checkpoint = str(tmp_path / "w8" / "teacher")
    low = run(config, tmp_path / "w2", mesh=mesh())["calibrate"].eval["top1"]
    assert low < calibrated
