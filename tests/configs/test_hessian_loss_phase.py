"""quant.hessian_loss='phase' with a phase that has no logit term (FSP's init phase: the feature
term alone) is refused at validation: the probe sees the logit terms only, so it would probe a
zero loss and leave the EWGS delta at 0."""

from __future__ import annotations

import importlib.util
import pathlib

import jax.numpy as jnp
import pytest

from qkd_jax.run.config_schema import ConfigError, build_objective, validate

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "digits_feature_kd.py"


def _config(arg: str):
    spec = importlib.util.spec_from_file_location("_digits_feature_kd_hessian", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _hessian(config, loss: str):
    config.quant.estimator = "hessian"
    config.quant.hessian_loss = loss
    return config


def test_the_fsp_init_objective_has_no_logit_term():
    """The premise: what the probe calls is identically zero for fsp_init."""
    objective = build_objective(_config("fsp").phases.fsp_init)
    assert objective.terms == () and objective.feature is not None
    value, _ = objective(jnp.ones((2, 10)), jnp.zeros((2, 10)), jnp.array([1, 2]))
    assert float(value) == 0.0


def test_phase_loss_on_a_feature_only_phase_is_refused():
    with pytest.raises(ConfigError, match=r"quant\.hessian_loss='phase'.*phase 'fsp_init' has no logit term.*"
                                          r"use quant\.hessian_loss='ce'"):
        validate(_hessian(_config("fsp"), "phase"))


@pytest.mark.parametrize("arg,loss", [("fsp", "ce"), ("at", "phase"), ("ft", "phase")])
def test_phases_with_a_logit_term_or_the_ce_probe_pass(arg, loss):
    validate(_hessian(_config(arg), loss))


def test_without_the_hessian_estimator_nothing_is_probed():
    config = _config("fsp")
    config.quant.hessian_loss = "phase"  # estimator 'ste': no probe, nothing to refuse
    validate(config)
