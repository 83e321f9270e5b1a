"""Resuming a phase on another device count (run/rerun.py:check_resume_devices): LSQ students are
refused, other phases resume with a notice, equal or unrecorded counts pass silently."""

from __future__ import annotations

import types

import pytest

from qkd_jax.run.config_schema import base_config
from qkd_jax.run.rerun import ConfigChangedError, check_resume_devices


def _config(method: str):
    c = base_config()
    c.quant.method = method
    return c


def _plan(kind: str = "student", name: str = "sqakd"):
    return types.SimpleNamespace(name=name, kind=kind)


def test_lsq_student_on_another_device_count_is_refused_naming_both_counts():
    with pytest.raises(ConfigChangedError) as err:
        check_resume_devices(_config("lsq"), _plan(), {"step": 30, "device_count": 8}, 4)
    message = str(err.value)
    assert "\n" not in message
    assert "phases.sqakd: its checkpoint at step 30 was trained on 8 device(s), this run has 4" in message
    assert "Resume on 8 device(s), or add --config.retrain_from=sqakd" in message


@pytest.mark.parametrize("method,kind", [("interval", "student"), ("pact", "student"), ("lsq", "teacher")])
def test_other_phases_resume_with_a_notice(method, kind, capsys):
    check_resume_devices(_config(method), _plan(kind), {"step": 30, "device_count": 8}, 4)
    assert "notice: phases.sqakd: its checkpoint at step 30 was trained on 8 device(s), this run has 4" in \
        capsys.readouterr().out


@pytest.mark.parametrize("meta", [{"step": 30, "device_count": 4}, {"step": 30}])
def test_same_or_unrecorded_count_passes_silently(meta, capsys):
    check_resume_devices(_config("lsq"), _plan(), meta, 4)
    assert capsys.readouterr().out == ""
