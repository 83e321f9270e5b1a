"""Feature-distillation keys of a phase (beta, feature, feature_options): validation, the objective
they build, the phase record, and the baseline configs against the released SQAKD scripts."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from qkd_jax.distill.feature_kd import RKD, Attention
from qkd_jax.run import recipes
from qkd_jax.run.config_schema import (
    ConfigError,
    build_objective,
    phase_names,
    validate,
)
from qkd_jax.run.plan import make_plan
from qkd_jax.run.record import phase_record

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

# Copied by hand from the released CIFAR/scripts/run_cifar10_resnet20_EWGS+KDs.sh (--distill,
# --kd_beta; --kd_gamma 1.0 --kd_alpha 0.0 for each) and run_cifar100_vgg13_EWGS+KDs.sh (same).
RELEASED = {"at": ("attention", 1000.0), "nst": ("nst", 50.0), "sp": ("similarity", 3000.0), "rkd": ("rkd", 1.0),
            "crd": ("crd", 0.8), "fitnet": ("hint", 100.0), "cc": ("correlation", 0.02), "vid": ("vid", 1.0),
            "cktf": ("cktf", 1.0)}
# 'EWGS+CKTF' (--distill crdst) of the same scripts also passes --kd_theta 0.8 --nce_k 4096.
RELEASED_OPTIONS = {"cktf": {"theta": 0.8, "nce_k": 4096}}


def _load(name: str, arg: str = ""):
    spec = importlib.util.spec_from_file_location(f"_fcfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg or name != "digits_demo" else module.get_config()


def _feature_config(**student):
    """The digits demo with its sqakd phase turned into kd + a feature criterion."""
    c = _load("digits_demo")
    ph = c.phases.sqakd
    ph.objective, ph.gamma, ph.alpha, ph.beta, ph.feature = "kd", 1.0, 0.0, 25.0, "rkd"
    for key, value in student.items():
        if key == "feature_options":
            for k, v in value.items():
                ph.feature_options[k] = v
        else:
            ph[key] = value
    return c


def test_feature_keys_build_the_criterion_with_its_options():
    c = _feature_config(feature_options={"w_d": 3.0})
    validate(c)
    objective = build_objective(c.phases.sqakd)
    assert objective.feature == RKD(w_d=3.0, w_a=50.0) and objective.beta == 25.0
    assert objective.needs_teacher and objective.needs_labels


@pytest.mark.parametrize("changes, key, message", [
    ({"feature": "bogus"}, "phases.sqakd.feature", "unknown feature criterion; known: .*'attention'"),
    ({"beta": 0.0}, "phases.sqakd.beta", "needs a non-zero beta"),
    ({"feature": ""}, "phases.sqakd.beta", "weighs a feature loss but feature is ''"),
    ({"objective": "sqakd"}, "phases.sqakd.feature", "objective 'sqakd' takes no feature term; use objective='kd'"),
    ({"feature_options": {"p": 2.0}}, "phases.sqakd", r"unknown option\(s\) \['p'\]; it accepts"),
    ({"feature": "factor"}, "phases.sqakd.aux_from", "needs aux_from naming an earlier 'paraphraser' phase"),
    ({"aux_from": "teacher"}, "phases.sqakd.aux_from", "only a student phase with feature='factor' takes it"),
])
def test_bad_feature_settings_fail_in_one_line_naming_the_key(changes, key, message):
    with pytest.raises(ConfigError, match=f"config.{key}.*{message}") as err:
        validate(_feature_config(**changes))
    assert "\n" not in str(err.value)


def test_options_without_a_criterion_fail():
    c = _feature_config(beta=0.0, feature="", feature_options={"w_d": 1.0})
    with pytest.raises(ConfigError, match="feature_options.*given without a feature criterion"):
        validate(c)


def test_record_holds_the_feature_term_only_when_set(tmp_path):
    c = _feature_config(feature_options={"w_a": 7.0})
    record = phase_record(c, make_plan(c, tmp_path, "sqakd", steps_per_epoch=3))
    assert record["phases.sqakd.beta"] == 25.0 and record["phases.sqakd.feature"] == "rkd"
    assert record["phases.sqakd.feature_options"] == {"w_a": 7.0}
    plain = _load("digits_demo")
    plain.phases.sqakd.objective = "kd"
    assert not any("beta" in k or "feature" in k
                   for k in phase_record(plain, make_plan(plain, tmp_path, "sqakd", steps_per_epoch=3)))


def test_recipe_table_is_the_released_scripts():
    assert recipes.FEATURE_BASELINES == RELEASED
    assert recipes.FEATURE_OPTIONS == RELEASED_OPTIONS


@pytest.mark.parametrize("name, arg", [("cifar10_resnet20", "cktf,w2a2"), ("cifar100_vgg13", "cktf,w1a1")])
def test_cktf_token_builds_the_released_crdst(name, arg):
    c = _load(name, arg)
    validate(c)
    ph = c.phases.student
    assert ph.feature_options.to_dict() == RELEASED_OPTIONS["cktf"]
    objective = build_objective(ph)
    crit = objective.feature
    assert (objective.beta, crit.beta, crit.theta, crit.nce_k, crit.st_method, crit.pool) == (
        1.0, 1.0, 0.8, 4096, "Last", "auto")
    ph.beta = 2.0  # the runner hands the phase's beta to the criterion: the total stays beta L_crd + theta L_st
    assert build_objective(ph).feature.beta == 2.0
    ph.feature_options.beta = 3.0
    with pytest.raises(ConfigError, match="feature_options.beta"):
        validate(c)


@pytest.mark.parametrize("name, arg, bits, epochs", [("cifar10_resnet20", "w2a2", 2, 1200),
                                                       ("cifar100_vgg13", "w1a1", 1, 720)])
@pytest.mark.parametrize("token", sorted(RELEASED))
def test_cifar_baselines_follow_the_released_scripts(name, arg, bits, epochs, token):
    c = _load(name, f"{token},{arg}")
    validate(c)
    qat = _load(name, f"qat,{arg}")
    assert c.phase_order == "teacher,calibrate,student"
    ph = c.phases.student
    criterion, beta = RELEASED[token]
    assert (ph.objective, ph.gamma, ph.alpha, ph.beta, ph.feature) == ("kd", 1.0, 0.0, beta, criterion)
    assert (ph.teacher_from, ph.init_from, ph.epochs) == ("teacher", "calibrate", epochs)
    assert (c.quant.w_bits, c.quant.a_bits, c.quant.method) == (bits, bits, "interval")
    # The student's optimizers are the EWGS recipe of the file (the scripts change only the loss).
    assert ph.weights.to_dict() == qat.phases.student.weights.to_dict()
    assert ph.quant_params.to_dict() == qat.phases.student.quant_params.to_dict()


def test_digits_baselines_config():
    c = _load("digits_feature_kd")
    validate(c)
    assert c.phase_order == "teacher,calibrate," + ",".join(RELEASED)
    at = build_objective(c.phases.at)
    assert at.feature == Attention() and at.beta == 1000.0
    assert c.phases.sp.weights.to_dict() == _load("digits_demo").phases.sqakd.weights.to_dict()
    assert _load("digits_feature_kd", "rkd").phase_order == "teacher,calibrate,rkd"
    # CKTF on 16x16 digits: the scripts' theta, digits-sized nce_k, global pooling of the 4x4 last stage.
    assert c.phases.cktf.feature_options.to_dict() == {"theta": 0.8, "nce_k": 1024, "pool": "global"}
    with pytest.raises(ValueError, match="invalid config ARG 'xx'"):
        _load("digits_feature_kd", "xx")


def test_auxiliary_params_train_like_the_weights_group(tmp_path):
    """The auxiliary optimizer is the phase's weights group: over three steps it moves a
    parameter exactly as the model's optimizer moves a weight (not a quantizer parameter)."""
    import jax.numpy as jnp
    import numpy as np

    from qkd_jax.run.states import aux_optimizer
    from qkd_jax.train.optim import build_optimizer

    c = _feature_config()
    c.phases.sqakd.weights.learning_rate = 0.01  # far from the quant group's 1e-4
    plan = make_plan(c, tmp_path, "sqakd", steps_per_epoch=3)
    aux_tx = aux_optimizer(plan, 6)
    model_tx = build_optimizer(plan.weights, plan.quant_params, steps_per_epoch=3, total_steps=6)
    start = jnp.asarray([1.0, -2.0, 0.5])
    aux, model = {"w": start}, {"conv": {"kernel": start}}
    aux_state, model_state = aux_tx.init(aux), model_tx.init(model)
    for g in ([0.1, -0.2, 0.3], [0.4, 0.0, -0.1], [-0.3, 0.2, 0.2]):
        g = jnp.asarray(g)
        du, aux_state = aux_tx.update({"w": g}, aux_state, aux)
        dm, model_state = model_tx.update({"conv": {"kernel": g}}, model_state, model)
        aux = {"w": aux["w"] + du["w"]}
        model = {"conv": {"kernel": model["conv"]["kernel"] + dm["conv"]["kernel"]}}
        np.testing.assert_array_equal(aux["w"], model["conv"]["kernel"])
    # Adam's first step moves each coordinate by about the learning rate (not the quant group's 1e-4).
    assert np.all(np.abs(np.asarray(aux["w"] - start)) > 5e-3)


def test_digits_ft_token_adds_the_paraphraser_phase_with_the_released_settings():
    c = _load("digits_feature_kd", "ft")
    validate(c)
    assert list(phase_names(c)) == ["teacher", "calibrate", "ft_paraphraser", "ft"]
    para, ft = c.phases.ft_paraphraser, c.phases.ft
    assert para.kind == "paraphraser" and para.teacher_from == "teacher"
    # released utils_distill.init: SGD lr 0.01 (CIFAR ResNets), momentum 0.9, weight decay 1e-4, constant lr
    w = para.weights
    assert (w.optimizer, w.learning_rate, w.momentum, w.weight_decay, w.schedule) == ("sgd", 0.01, 0.9, 1e-4,
                                                                                   "constant")
    assert (ft.feature, ft.beta, ft.gamma, ft.alpha, ft.aux_from) == ("factor", 200.0, 1.0, 0.0, "ft_paraphraser")


@pytest.mark.parametrize("changes, message", [
    ({"teacher_from": ""}, "phases.ft_paraphraser.teacher_from.*needs a 'teacher' phase"),
    ({"init_from": "calibrate"}, "phases.ft_paraphraser.*takes no init_from/train_teacher/feature"),
])
def test_bad_paraphraser_phase_fails(changes, message):
    c = _load("digits_feature_kd", "ft")
    for key, value in changes.items():
        c.phases.ft_paraphraser[key] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)


def test_digits_fsp_token_adds_the_init_phase_with_the_classifier_frozen():
    c = _load("digits_feature_kd", "fsp")
    validate(c)
    assert list(phase_names(c)) == ["teacher", "calibrate", "fsp_init", "fsp"]
    init, main = c.phases.fsp_init, c.phases.fsp
    assert (init.objective, init.gamma, init.alpha, init.beta, init.feature, init.freeze) == (
        "kd", 0.0, 0.0, 1.0, "fsp", "classifier")
    assert (init.weights.optimizer, init.weights.learning_rate, init.weights.schedule) == ("sgd", 1e-3, "constant")
    # Digits deviation (what experiments/feature_kd_digits.py ran): the quantizer parameters keep the
    # student's Adam; the released init SGD drives them to NaN on digits.
    assert init.quant_params.to_dict() == main.quant_params.to_dict()
    assert (init.quant_params.optimizer, init.quant_params.learning_rate) == ("adam", 1e-4)
    assert (main.objective, main.init_from, main.feature) == ("task", "fsp_init", "")
    plan = make_plan(c, pathlib.Path("/tmp/unused"), "fsp_init", steps_per_epoch=3)
    assert plan.freeze == ("classifier",)
    assert phase_record(c, plan)["phases.fsp_init.freeze"] == "classifier"


def test_freeze_on_a_non_student_phase_fails():
    c = _load("digits_feature_kd", "fsp")
    c.phases.calibrate.freeze = "classifier"
    with pytest.raises(ConfigError, match="phases.calibrate.freeze.*on a student phase only"):
        validate(c)


@pytest.mark.parametrize("name, lr, wd, ft_lr", [("cifar10_resnet20", 1e-3, 1e-4, 0.01),
                                                  ("cifar100_vgg13", 5e-4, 5e-4, 5e-4)])
def test_cifar_ft_and_fsp_tokens_follow_the_released_init(name, lr, wd, ft_lr):
    """Released init: SGD, momentum 0.9, args.weight_decay, 30 epochs; lr 0.01 for FT on CIFAR
    ResNets, else args.lr_m (the student's weight lr)."""
    ft = _load(name, "ft,w2a2")
    validate(ft)
    assert list(phase_names(ft)) == ["teacher", "calibrate", "paraphraser", "student"]
    w = ft.phases.paraphraser.weights
    assert (w.optimizer, w.learning_rate, w.momentum, w.weight_decay, ft.phases.paraphraser.epochs) == (
        "sgd", ft_lr, 0.9, wd, 30)
    assert (ft.phases.student.feature, ft.phases.student.beta, ft.phases.student.aux_from) == (
        "factor", 200.0, "paraphraser")
    fsp = _load(name, "fsp,w2a2")
    validate(fsp)
    assert list(phase_names(fsp)) == ["teacher", "calibrate", "fsp_init", "student"]
    init = fsp.phases.fsp_init
    assert (init.weights.learning_rate, init.weights.weight_decay, init.epochs, init.freeze) == (lr, wd, 30,
                                                                                                "classifier")
    assert (fsp.phases.student.objective, fsp.phases.student.init_from) == ("task", "fsp_init")


def test_the_digits_experiment_runs_the_configs_fsp_init_phase():
    """experiments/feature_kd_digits.py reads FSP's init recipe from configs/digits_feature_kd.py."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "feature_kd_digits.py"
    spec = importlib.util.spec_from_file_location("_feature_kd_digits_for_config_test", path)
    fk = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fk  # its dataclasses look their module up
    spec.loader.exec_module(fk)
    opts = fk.parse_args(["--methods=fsp", "--epochs=12", "--init-epochs=3", "--workdirs=/tmp/unused"])
    ran = fk.build_config(0, "fsp", opts).phases.fsp_init
    assert ran.to_dict() == _load("digits_feature_kd", "fsp").phases.fsp_init.to_dict()
