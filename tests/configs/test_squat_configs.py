"""The 'squat' / 'squat_ce' config tokens against the released SQuaT scripts, the tap the runner
fills in from the model registry, and the digits side-by-side config."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from qkd_jax.distill.squat_feature import SQuaT
from qkd_jax.models.registry import squat_tap
from qkd_jax.run.config_schema import build_objective, validate
from qkd_jax.run.plan import make_plan

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

# Copied by hand from lcdbsa522/SQuaT CIFAR/ResNet/scripts/run_cifar10_resnet20_squat.sh,
# run_cifar100_resnet32_squat.sh and ImageNet/scripts/run_squat.sh: epochs, batch, lr_m, lr_q,
# weight decay (train_quant_distill.py default 1e-4 unless passed), Hessian refresh interval.
RELEASED = {
    "cifar10_resnet20": dict(epochs=1200, batch=256, lr_m=1e-3, lr_q=1e-5, wd=1e-4, every=10, model="resnet20"),
    "cifar100_resnet32": dict(epochs=720, batch=64, lr_m=5e-4, lr_q=5e-6, wd=5e-4, every=10, model="resnet32"),
    "imagenet_resnet18": dict(epochs=100, batch=128, lr_m=1e-2, lr_q=1e-5, wd=1e-4, every=1, model="resnet18"),
}


def _load(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(f"_sqcfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name", sorted(RELEASED))
@pytest.mark.parametrize("token,gamma", [("squat", 0.0), ("squat_ce", 1.0)])
def test_squat_token_is_the_released_recipe(name, token, gamma, tmp_path):
    r = RELEASED[name]
    c = _load(name, f"{token},w2a2")
    validate(c)
    assert c.phase_order == "teacher,calibrate,student" and c.quant.method == "interval"
    ph = c.phases.student
    assert (ph.objective, ph.alpha, ph.temperature, ph.beta, ph.gamma) == ("squat", 1.0, 4.0, 1.0, gamma)
    assert ph.feature == "squat" and dict(ph.feature_options) == {"distance": "mse", "tap": ""}
    assert (ph.epochs, ph.batch_size, ph.init_from, ph.teacher_from) == (r["epochs"], r["batch"], "calibrate", "teacher")
    assert ph.weights.learning_rate == r["lr_m"] and ph.weights.weight_decay == r["wd"]
    assert ph.quant_params.learning_rate == r["lr_q"] and ph.quant_params.optimizer == "adam"
    assert ph.weights.schedule.startswith("cosine") and ph.quant_params.schedule.startswith("cosine")
    assert (c.quant.estimator, c.quant.hessian_every_epochs, c.quant.hessian_loss) == ("hessian", r["every"], "phase")
    objective = make_plan(c, tmp_path, "student", steps_per_epoch=3).objective
    assert objective.name == "squat" and objective.needs_labels == bool(gamma)
    assert objective.feature == SQuaT(tap=squat_tap(r["model"]), distance="mse")


def test_an_explicit_tap_and_distance_are_kept(tmp_path):
    c = _load("cifar10_resnet20", "squat,w1a1")
    c.phases.student.feature_options.tap = r"layer2_\d+/conv2"
    c.phases.student.feature_options.distance = "l1"
    validate(c)
    assert make_plan(c, tmp_path, "student", steps_per_epoch=3).objective.feature == SQuaT(
        tap=r"layer2_\d+/conv2", distance="l1")
    c.phases.student.feature_options.distance = "cosine"
    with pytest.raises(ValueError, match="squat distance 'cosine' is unknown"):
        build_objective(c.phases.student)


@pytest.mark.parametrize("method", ["interval", "pact", "lsq", "dorefa", "qkd"])
def test_digits_config_puts_sqakd_and_squat_on_one_calibration(method, tmp_path):
    c = _load("digits_squat", f"squat,{method},w1a1")
    validate(c)
    assert c.phase_order == "teacher,calibrate,sqakd,squat"
    assert (c.quant.method, c.quant.w_bits, c.quant.a_bits, c.quant.estimator) == (method, 1, 1, "ste")
    sqakd, squat = c.phases.sqakd, c.phases.squat
    assert sqakd.objective == "sqakd" and squat.objective == "squat" and squat.gamma == 0.0
    for key in ("init_from", "teacher_from", "epochs", "batch_size", "weights", "quant_params"):
        assert squat[key] == sqakd[key], key
    assert make_plan(c, tmp_path, "squat", steps_per_epoch=3).objective.feature.tap == squat_tap("resnet20")


def test_digits_config_options_and_errors():
    c = _load("digits_squat", "l1,squat_ce,w4a4")
    assert c.phases.squat.feature_options.distance == "l1" and c.phases.squat.gamma == 1.0
    assert c.quant.method == "interval"
    with pytest.raises(ValueError, match="unknown token 'vgg'"):
        _load("digits_squat", "squat,vgg,w2a2")


def test_tap_and_distance_override_from_the_command_line(tmp_path):
    from absl import flags
    from ml_collections import config_flags

    argv = ["prog", f"--config={CONFIGS / 'cifar10_resnet20.py'}:squat,w2a2",
            r"--config.phases.student.feature_options.tap=layer3_0/conv1",
            "--config.phases.student.feature_options.distance=l1"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    objective = make_plan(fv.config, tmp_path, "student", steps_per_epoch=3).objective
    assert objective.feature == SQuaT(tap="layer3_0/conv1", distance="l1")
