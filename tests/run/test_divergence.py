"""The divergence rules of run/divergence.py on synthetic loss and accuracy sequences."""

from __future__ import annotations

import math

import pytest

from qkd_jax.run.config_schema import objective_kwargs, phase
from qkd_jax.run.divergence import DivergenceMonitor, loss_weight


def _monitor(objective: str, num_classes: int, **phase_kw) -> DivergenceMonitor:
    ph = phase("student", objective=objective, **phase_kw)
    return DivergenceMonitor("p", num_classes, loss_weight(objective, objective_kwargs(objective, ph)))


@pytest.mark.parametrize("objective,kw,expected", [
    ("task", {}, 1.0),
    ("self_study", {}, 1.0),
    ("sqakd", {"alpha": 100.0, "temperature": 4.0}, 1600.0),  # alpha * T^2
    ("tutoring", {"temperature": 2.0}, 5.0),  # CE + T^2 KL
    ("co_study", {"temperature": 2.0}, 10.0),  # both sides
    ("kd", {"gamma": 1.0, "alpha": 0.0, "beta": 1000.0, "feature": "attention"}, 1001.0),
    ("kd", {"gamma": 0.5, "alpha": 2.0, "temperature": 3.0}, 18.5),
])
def test_loss_weight_closed_forms(objective, kw, expected):
    ph = phase("student", objective=objective, **kw)
    assert loss_weight(objective, objective_kwargs(objective, ph)) == pytest.approx(expected)


def test_first_loss_already_huge_warns_at_once():
    """The reported SQAKD run at lr 1e6: the first logged KL is 8.9e13, the lowest ever logged."""
    m = _monitor("sqakd", 10, alpha=1.0, temperature=4.0)  # scale 16 ln 10 = 36.8
    warning = m.update(50, 8.9e13)
    assert warning is not None and "8.9e+13 at step 50" in warning
    assert "over 1000x the phase's expected scale 36.8" in warning
    assert "--config.retrain_from=p" in warning
    assert m.update(100, 3.4e14) is None and m.evaluated(100, 10.0) is None and len(m.warnings) == 1
    assert m.record() == {"divergence": 1.0, "loss": 8.9e13}  # the warning's loss; none lower was logged


def test_chance_accuracy_with_a_large_loss_warns_after_the_eval():
    """Below the scale rule (1000 x) and never growing, but 10 x over scale and at chance."""
    m = _monitor("task", 10)  # scale ln 10 = 2.30
    for step, loss in enumerate([400.0, 300.0, 350.0, 320.0], start=1):
        assert m.update(step, loss) is None
    warning = m.evaluated(4, 11.0)
    assert warning is not None and "eval top-1 11.00% at step 4 is chance level (10% for 10 classes)" in warning
    assert "last logged loss 320" in warning
    assert m.record() == {"divergence": 1.0, "loss": 320.0, "lowest_loss": 300.0}


def test_growth_rule_still_fires():
    m = _monitor("task", 10)  # floor 10 ln 10 = 23.0
    assert m.update(1, 2.3) is None and m.update(2, 0.01) is None
    assert m.update(3, 20.0) is None  # 2000x the lowest, but below the floor
    warning = m.update(4, 23.1)
    assert warning is not None and "over 100x its lowest value 0.01" in warning


@pytest.mark.parametrize("losses,top1", [
    ([2.3, 2.1, 1.5, 0.6, 0.2], [12.0, 60.0, 95.0]),  # CE, 10 classes: at chance only while the loss is sane
    ([2.31, 2.30, 2.30, 2.29], [10.0, 10.0]),  # stuck at chance, but the loss is a uniform guess's
])
def test_healthy_or_merely_slow_runs_do_not_warn(losses, top1):
    m = _monitor("task", 10)
    for step, loss in enumerate(losses, start=1):
        assert m.update(step, loss) is None
        if step <= len(top1):
            assert m.evaluated(step, top1[step - 1]) is None
    assert m.warnings == []


def test_heavily_weighted_distillation_does_not_warn():
    """Tiny-ImageNet SQAKD with alpha 800, T = 4, 200 classes: a loss of 1e4 is its normal scale."""
    m = _monitor("sqakd", 200, alpha=800.0, temperature=4.0)
    assert m.scale == pytest.approx(800 * 16 * math.log(200))
    for step, loss in enumerate([9000.0, 7000.0, 5000.0, 2000.0], start=1):
        assert m.update(step, loss) is None
    assert m.evaluated(4, 0.4) is None  # chance (0.5 %) with a loss below 10 x its scale
    assert m.warnings == []


def test_one_warning_per_phase_and_none_for_non_finite_losses():
    m = _monitor("task", 10)
    assert m.update(1, math.nan) is None and m.update(2, math.inf) is None
    assert m.update(3, 1e9) is not None
    assert m.update(4, 1e12) is None and m.evaluated(4, 10.0) is None and len(m.warnings) == 1
