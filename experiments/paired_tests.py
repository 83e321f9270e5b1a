"""Paired tests of SQAKD vs plain QAT on the digits grid, recomputed from the stored per-seed data.

    python experiments/paired_tests.py [docs/reproduction_runs.csv]
    python experiments/paired_tests.py --compare BEFORE_runs.csv AFTER_runs.csv

The second form compares two reports of the same runs made by different code (e.g. before and
after a change of an initialisation), setting by setting, paired by seed.

Prints one row per (method, bits): correct test images per seed in each arm (out of 360), their
sums over seeds, the mean difference in points, and a two-sided paired t-test over seeds.

Why this test. The unit that varies between repetitions is the training run (seed: teacher,
calibration batch, data order); QAT and SQAKD of one seed share all of that, so the per-seed
differences are the paired observations. Per-image predictions are not stored, so an exact
McNemar / sign test over the 360 images cannot be computed (it needs the discordant pairs), and
it would only measure test-set sampling, not the seed-to-seed spread that dominates here. With
3 seeds the t-test has 2 degrees of freedom: a difference must exceed about 4.3 standard errors
for p < 0.05 (the earlier "2 standard errors" bar corresponds to p of about 0.18). A sign test
over 3 seeds can never reach p < 0.05 (3 of 3 gives p = 0.25), so it is not used.

Many settings are tested at once (12 in the grid), so some raw p < 0.05 are expected by chance
alone (0.6 of 12 under the null). Every table reports the raw p and Holm's step-down adjusted p
over the tests of that table (family-wise error at ALPHA, no independence assumption); the
verdicts use the adjusted p.
"""

from __future__ import annotations

import csv
import math
import pathlib
import statistics
import sys
from typing import NamedTuple, Sequence

import numpy as np
from jax.scipy.special import betainc

TEST_IMAGES = 360
ALPHA = 0.05
METHODS = ("interval", "pact", "lsq", "dorefa")
LABEL = {"interval": "EWGS interval", "pact": "PACT", "lsq": "LSQ", "dorefa": "DoReFa"}


class PairedT(NamedTuple):
    mean: float  # mean of the differences
    se: float  # its standard error
    t: float
    p: float  # two-sided; NaN with fewer than 2 pairs


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    x = df / (df + t * t)
    return float(betainc(np.float64(df / 2.0), np.float64(0.5), np.float64(x)))


def paired_t(diffs: Sequence[float]) -> PairedT:
    """Two-sided paired t-test of mean(diffs) = 0 (the t-test on the differences)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return PairedT(mean, math.nan, math.nan, math.nan)
    se = statistics.stdev(diffs) / math.sqrt(n)
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    return PairedT(mean, se, t, t_two_sided_p(t, n - 1))


def paired_test(diffs: Sequence[float]) -> PairedT:
    """`paired_t`, except where every difference is the same (top-1 differences are whole images, so
    they are compared rounded to 1e-6 points): the t statistic is then infinite (or 0/0) and says
    nothing, and the exact two-sided sign-flip permutation p is used instead, 2 / 2^n for n equal
    non-zero differences (0.25 for three seeds one image apart each), 1 for zeros."""
    d = [round(float(x), 6) for x in diffs]
    test = paired_t(d)
    if len(d) >= 2 and len(set(d)) == 1:
        return PairedT(test.mean, 0.0, test.t, 1.0 if d[0] == 0 else min(1.0, 2.0 / 2 ** len(d)))
    return test


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control over the m tests), in input order.

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    Rejecting where the adjusted p < alpha is Holm's procedure at level alpha. NaN p-values (one
    seed) are no test: they stay NaN and do not count in m."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(finite)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(test: PairedT, alpha: float = ALPHA) -> str:
    """'SQAKD better' / 'QAT better' when p < alpha, else 'not significant'."""
    if math.isnan(test.p):
        return "n/a (1 seed)"
    if test.p < alpha:
        return "SQAKD better" if test.mean > 0 else "QAT better"
    return "not significant"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def mean_pm_std(values: Sequence[float]) -> str:
    """'m ± s' with two decimals, or 'm' alone for one value (the experiments' table cells)."""
    m, s = mean_std(values)
    return f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}"


def correct_counts(path: pathlib.Path) -> dict[tuple[str, int, str], list[int]]:
    """{(method, bits, 'qat'|'sqakd'): correct images per seed, in seed order} of the grid rows."""
    rows: dict[tuple[str, int, str], dict[int, int]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["section"] != "grid":
                continue
            key = (r["method"], int(r["bits"]), r["variant"])
            rows.setdefault(key, {})[int(r["seed"])] = round(float(r["top1"]) * TEST_IMAGES / 100.0)
    return {k: [v[s] for s in sorted(v)] for k, v in rows.items()}


def table(counts: dict[tuple[str, int, str], list[int]]) -> list[str]:
    lines = ["| method | bits | QAT correct / seed | SQAKD correct / seed | sums | Δ points | t | p | Holm p "
             "| verdict (Holm) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for method in METHODS:
        for bits in sorted({b for m, b, _ in counts if m == method}):
            qat, sq = counts[(method, bits, "qat")], counts[(method, bits, "sqakd")]
            rows.append((method, bits, qat, sq, paired_t([100.0 * (s - q) / TEST_IMAGES for s, q in zip(sq, qat)])))
    adjusted = holm([r[4].p for r in rows])
    for (method, bits, qat, sq, test), p_holm in zip(rows, adjusted):
        lines.append(
            f"| {LABEL[method]} | W{bits}A{bits} | {', '.join(map(str, qat))} | {', '.join(map(str, sq))} | "
            f"{sum(qat)} vs {sum(sq)} | {test.mean:+.2f} | {test.t:+.2f} | {test.p:.4f} | {p_holm:.4f} | "
            f"{verdict(test._replace(p=p_holm))} |")
    return lines


def run_counts(path: pathlib.Path) -> dict[tuple[str, str, int, str], dict[int, int]]:
    """{(section, method, bits, variant): {seed: correct images}} of every student row."""
    rows: dict[tuple[str, str, int, str], dict[int, int]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["section"] == "teacher":
                continue
            key = (r["section"], r["method"], int(r["bits"]), r["variant"])
            rows.setdefault(key, {})[int(r["seed"])] = round(float(r["top1"]) * TEST_IMAGES / 100.0)
    return rows


def compare_table(before: dict, after: dict) -> list[str]:
    """Per setting in both reports: correct images per seed (seeds in both), Δ after - before, paired t
    (raw p and Holm's over the settings compared)."""
    lines = ["| setting | before correct / seed | after correct / seed | Δ points | t | p | Holm p | verdict (Holm) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for key in sorted(set(before) & set(after)):
        seeds = sorted(set(before[key]) & set(after[key]))
        b, a = [before[key][s] for s in seeds], [after[key][s] for s in seeds]
        rows.append((key, b, a, paired_t([100.0 * (y - x) / TEST_IMAGES for x, y in zip(b, a)])))
    for (key, b, a, test), p_holm in zip(rows, holm([r[3].p for r in rows])):
        verdict_text = ("n/a (1 seed)" if math.isnan(p_holm) else "not significant" if p_holm >= ALPHA
                        else "after better" if test.mean > 0 else "before better")
        lines.append(f"| {' '.join(map(str, key))} | {', '.join(map(str, b))} | {', '.join(map(str, a))} | "
                     f"{test.mean:+.2f} | {test.t:+.2f} | {test.p:.4f} | {p_holm:.4f} | {verdict_text} |")
    return lines


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1 and argv[1] == "--compare":
        if len(argv) != 4:
            raise SystemExit("usage: paired_tests.py --compare BEFORE_runs.csv AFTER_runs.csv")
        print("\n".join(compare_table(run_counts(pathlib.Path(argv[2])), run_counts(pathlib.Path(argv[3])))))
        print(f"\nTwo-sided paired t-test over the seeds in both (df = seeds - 1); Holm p: Holm's correction over "
              f"the settings in the table; the verdict is significant when the Holm p < {ALPHA}.")
        return
    path = pathlib.Path(argv[1] if len(argv) > 1 else pathlib.Path(__file__).parents[1] / "docs/reproduction_runs.csv")
    print("\n".join(table(correct_counts(path))))
    print(f"\nTwo-sided paired t-test over seeds (df = seeds - 1); Holm p: Holm's correction over the "
          f"settings in the table; the verdict is significant when the Holm p < {ALPHA}; "
          f"correct counts = top-1 x {TEST_IMAGES} / 100.")


if __name__ == "__main__":
    main(sys.argv)
