"""experiments/paired_tests.py: its t-test p-values against closed forms, and the stored data."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pt():
    spec = importlib.util.spec_from_file_location("paired_tests", ROOT / "experiments" / "paired_tests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("t", [0.0, 0.5, 2.0, 4.303, 15.5])
def test_p_value_matches_closed_forms(pt, t):
    # df = 1: Cauchy, p = 1 - 2 atan|t| / pi; df = 2: p = 1 - |t| / sqrt(2 + t^2).
    assert math.isclose(pt.t_two_sided_p(t, 1), 1 - 2 * math.atan(abs(t)) / math.pi, rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(pt.t_two_sided_p(t, 2), 1 - abs(t) / math.sqrt(2 + t * t), rel_tol=1e-5, abs_tol=1e-7)


def test_paired_t_by_hand(pt):
    # diffs 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3).
    r = pt.paired_t([1.0, 2.0, 3.0])
    assert math.isclose(r.t, 2 * math.sqrt(3)) and math.isclose(r.se, 1 / math.sqrt(3))
    assert pt.verdict(pt.paired_t([0.0, 0.0, 0.0])) == "not significant"


def test_stored_grid_counts(pt):
    counts = pt.correct_counts(ROOT / "docs" / "reproduction_runs.csv")
    assert sum(counts[("pact", 2, "qat")]) == sum(counts[("pact", 2, "sqakd")]) == 1063
    assert all(len(v) == 3 and all(0 <= c <= 360 for c in v) for v in counts.values())
