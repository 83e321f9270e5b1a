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


def test_equal_differences_take_the_sign_flip_p(pt):
    # three seeds one image (100/360 points) apart each, with float noise: the t statistic would be
    # huge; the exact sign-flip p is 2 / 2^3. All zeros: 1. Otherwise the t-test's p.
    one = 100 / 360
    assert pt.paired_test([one, one + 1e-13, one - 1e-13]).p == 0.25
    assert pt.paired_test([0.0, 0.0, 0.0, 0.0]).p == 1.0
    assert pt.paired_test([-one] * 2).p == 0.5
    assert math.isclose(pt.paired_test([1.0, 2.0, 3.0]).p, 1 - 2 * math.sqrt(3) / math.sqrt(2 + 12), rel_tol=1e-5)


def test_compare_pairs_by_seed(pt, tmp_path):
    """Before/after comparison: seeds paired, a seed in only one report dropped, t by hand."""
    head = "section,method,bits,variant,seed,top1,top5,loss,run_wall_s\n"
    row = "qkd,qkd,2,qkd,{seed},{top1},100,0.1,1\n"
    teacher = "teacher,fp,32,fp,0,99,100,0.1,1\n"
    # correct images 324/333/342 before (90/92.5/95 %) and 327/339/351 after: +3, +6, +9 images
    before = [(0, 90.0), (1, 92.5), (2, 95.0), (3, 50.0)]
    after = [(0, 327 / 3.6), (1, 339 / 3.6), (2, 351 / 3.6)]
    for name, rows in (("b.csv", before), ("a.csv", after)):
        (tmp_path / name).write_text(head + teacher + "".join(row.format(seed=s, top1=t) for s, t in rows))
    lines = pt.compare_table(pt.run_counts(tmp_path / "b.csv"), pt.run_counts(tmp_path / "a.csv"))
    assert len(lines) == 3  # header, rule, one setting (the teacher row is not a setting)
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["qkd qkd 2 qkd", "324, 333, 342", "327, 339, 351"]
    # diffs in points: 3/3.6, 6/3.6, 9/3.6 -> mean 6/3.6, sd 3/3.6, t = 2 sqrt(3)
    assert math.isclose(float(cells[3]), 6 / 3.6, abs_tol=5e-3)
    assert math.isclose(float(cells[4]), 2 * math.sqrt(3), abs_tol=5e-3)
    assert cells[5] == cells[6] == "0.0742"  # p with 2 degrees of freedom; one test: Holm changes nothing
    assert cells[7] == "not significant"


def test_holm_by_hand(pt):
    """p = 0.01, 0.04, 0.03, 0.005 (m = 4). Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 gives
    0.02, 0.03, 0.06, 0.04; the running maximum makes the last 0.06. Holm at 0.05 rejects the two
    smallest only (0.005 < 0.05/4, 0.01 < 0.05/3, 0.03 > 0.05/2)."""
    adjusted = pt.holm([0.01, 0.04, 0.03, 0.005])
    for got, want in zip(adjusted, [0.03, 0.06, 0.06, 0.02]):
        assert math.isclose(got, want, rel_tol=1e-12)
    assert [p < 0.05 for p in adjusted] == [True, False, False, True]


def test_holm_caps_at_one_and_skips_untested(pt):
    adjusted = pt.holm([0.5, math.nan, 0.6])  # m = 2: 2 x 0.5 = 1.0, then max(1.0, 0.6)
    assert adjusted[0] == adjusted[2] == 1.0 and math.isnan(adjusted[1])
    assert pt.holm([]) == [] and pt.holm([0.2]) == [0.2]


def test_holm_on_the_stored_grid(pt):
    """The grid's smallest raw p (PACT W1A1, t = 15.5 on 2 df) is multiplied by the 12 settings."""
    rows = [line.split(" | ") for line in pt.table(pt.correct_counts(ROOT / "docs" / "reproduction_runs.csv"))[2:]]
    assert len(rows) == 12
    raw = {(r[0].lstrip("| "), r[1]): (float(r[7]), float(r[8])) for r in rows}
    p, p_holm = raw[("PACT", "W1A1")]
    assert p == min(v[0] for v in raw.values())
    assert math.isclose(p_holm, 12 * p, abs_tol=13 * 5e-5)  # both printed to 4 decimals
    assert all(h >= r for r, h in raw.values())
