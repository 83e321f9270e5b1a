"""SQAKD vs plain QAT and QAT + each feature-distillation baseline on the bundled digits.

    python experiments/feature_kd_digits.py --out=docs/feature_kd_digits [--seeds=3] [--epochs=12]
        [--teacher-epochs=12] [--init-epochs=3] [--methods=at,nst,sp,rkd,crd,fitnet,cc,vid,ft,fsp]
        [--workdirs=...] [--quick]

Writes OUT.md (table, paired tests, the command, wall time, a reading), OUT.csv (one row per
method: mean/std over seeds), OUT_runs.csv (one row per run and seed) and OUT.png (the plot).

What runs (ResNet-20, 16x16 digits, interval quantizer W2A2, preset `sqakd_cifar`, STE; the
machinery of experiments/reproduce_digits.py):

- per seed s: one FP teacher (cross-entropy, `--teacher-epochs`), loaded through
  `config.teacher_checkpoint` by every student run of that seed.
- per (seed, method) one run with the same four-position phase order
  `teacher, calibrate, <init slot>, <student>`. A phase's seed (its calibration batch, its data
  order) comes from the run seed and its position, so every method of a seed starts from the same
  calibration (position 1) and its student phase (position 3) reads the same data order.
  The init slot (position 2):
  - one-phase methods (`sqakd`, `qat`, recipes.FEATURE_BASELINES): `no_init`, the teacher
    checkpoint read a second time (no training, no data read), a placeholder that keeps the
    student at position 3;
  - `ft` (recipes.TWO_PHASE_BASELINES): `ft_paraphraser`, the released init phase: the
    paraphraser trained on the FP teacher's feats[-2] (MSE, no labels; SGD lr 0.01, momentum 0.9,
    weight decay 1e-4, constant lr, recipes.paraphraser_phase);
  - `fsp`: `fsp_init`, configs/digits_feature_kd.py:fsp_init_phase: the released init phase, all
    but the classifier trained on the FSP losses alone (gamma 0, alpha 0, beta 1,
    freeze='classifier'; the weights with SGD at the student's learning rate, momentum 0.9, the
    student's weight decay 1e-4, constant lr, recipes.fsp_init_phase), from the calibration. One
    deviation: the quantizer parameters train with the student's quantizer optimizer (Adam 1e-4,
    cosine) instead of that SGD, which turns the W2A2 interval parameters to NaN within 3 epochs
    on digits.
  Both init phases read the training split in the data order of position 2 (the same for FT and
  FSP, unlike the student's) for `--init-epochs` epochs: default min(3, --epochs) on digits,
  where the released code runs 30 (against 240 student epochs on CIFAR); --quick: 1.
- student phases (`--epochs` each, the demo's student optimizer): `sqakd` (KL_T(student,
  teacher), T = 4, alpha 1, no labels), `qat` (cross-entropy) and, per one-phase feature
  baseline, gamma * CE + beta * L_feature with gamma 1, alpha 0 and the released beta
  (qkd_jax.run.recipes.FEATURE_BASELINES; CRD with nce_k = 1024 as in
  configs/digits_feature_kd.py); `ft`: CE + 200 * the factor loss through the frozen paraphraser
  (recipes.ft_phase); `fsp`: plain CE from the init phase's student (the released main phase's
  FSP term is 0).

The paired test of SQAKD vs each method is the two-sided paired t-test over seeds on the per-seed
differences (experiments/paired_tests.py explains why). The outputs are rewritten after every
finished run, so an interrupted grid leaves a report that names the runs still missing; rerunning
the same command reads finished runs back and resumes interrupted ones from their checkpoints;
rerunning with more `--methods` reads the finished runs back and runs only the new methods.

`--quick` (the smoke setting): 1 seed, 1 epoch per phase, outputs under workdirs/feature_kd_quick/.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import logging
import math
import pathlib
import shlex
import statistics
import sys
import time
from typing import Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import parallel  # noqa: E402
from experiments import reproduce_digits as rd  # noqa: E402
from experiments.paired_tests import ALPHA, holm, mean_pm_std as _pm, mean_std as _mean_std, paired_t  # noqa: E402
from qkd_jax.run import recipes  # noqa: E402

# One-phase baselines: token -> (criterion, beta). A criterion added to recipes in another mapping
# of the same shape joins here with one entry (`**recipes.OTHER_MAPPING`).
ONE_PHASE = {**recipes.FEATURE_BASELINES}
# Baselines with the released init phase before the student phase (`init_phase` builds each).
TWO_PHASE = tuple(recipes.TWO_PHASE_BASELINES)
BASELINES = tuple(ONE_PHASE) + TWO_PHASE
ALL_METHODS = ("sqakd", "qat") + BASELINES
_NAMES = {"fitnet": "FitNet"}
LABEL = {"sqakd": "SQAKD (KL only, no labels)", "qat": "plain QAT (CE)",
         **{t: f"QAT + {_NAMES.get(t, t.upper())} (β = {b:g})" for t, (_, b) in ONE_PHASE.items()},
         "ft": f"QAT + FT (β = {recipes.FT_BASELINE[1]:g}, paraphraser first)",
         "fsp": "FSP init, then QAT (CE)"}
INIT_PHASE = {"ft": "ft_paraphraser", "fsp": "fsp_init"}  # the init slot's phase per two-phase method
NO_INIT = "no_init"  # the one-phase methods' init slot: the teacher checkpoint read again
BITS = 2


@dataclasses.dataclass(frozen=True)
class Options:
    """What to run and where to write it (duck-typed for reproduce_digits.build_config)."""

    out: pathlib.Path
    workdirs: pathlib.Path
    seeds: int = 3
    epochs: int = 12
    teacher_epochs: int = 12
    init_epochs: int = 3
    methods: tuple[str, ...] = BASELINES
    quick: bool = False
    command: str = ""
    report_only: bool = False

    @property
    def budget_dir(self) -> pathlib.Path:
        return self.workdirs / f"t{self.teacher_epochs}_e{self.epochs}"

    @property
    def arms(self) -> tuple[str, ...]:
        return ("sqakd", "qat") + self.methods


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output prefix (default docs/feature_kd_digits)")
    p.add_argument("--workdirs", default=None, help="run folders (default workdirs/feature_kd)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick 1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per student phase (default 12; --quick 1)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="FP teacher epochs (default 12; --quick 1)")
    p.add_argument("--init-epochs", type=int, default=None,
                   help="epochs of FT's / FSP's init phase (default min(3, --epochs))")
    p.add_argument("--methods", default=",".join(BASELINES), help="feature baselines, comma-separated, or 'none' (SQAKD vs QAT only)")
    p.add_argument("--quick", action="store_true", help="smoke setting (see the module docstring)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite OUT.md, OUT.csv and OUT.png from OUT_runs.csv (and OUT_meta.json); "
                        "pass the options of the command that ran the grid")
    a = p.parse_args(argv)
    text = "" if a.methods.strip().lower() == "none" else a.methods
    methods = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in methods if t not in BASELINES]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {list(BASELINES)}")
    q = a.quick
    base = ROOT / "workdirs" / ("feature_kd_quick" if q else "feature_kd")
    out = a.out or str(base / "feature_kd_digits" if q else ROOT / "docs" / "feature_kd_digits")
    n = {k: (v if v is not None else (1 if q else d)) for k, v, d in
         (("seeds", a.seeds, 3), ("epochs", a.epochs, 12), ("teacher_epochs", a.teacher_epochs, 12))}
    n["init_epochs"] = a.init_epochs if a.init_epochs is not None else min(3, n["epochs"])
    for k, v in n.items():
        if v < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    return Options(out=pathlib.Path(out).absolute(), workdirs=pathlib.Path(a.workdirs or base).absolute(),
                   methods=methods, quick=q, report_only=a.report_only,
                   command=" ".join(["python", "experiments/feature_kd_digits.py",
                                     *(shlex.quote(x) for x in argv_list if x != "--report-only")]), **n)


def _digits_config():
    """configs/digits_feature_kd.py as a module: its criterion options and FSP's init recipe."""
    path = ROOT / "configs" / "digits_feature_kd.py"
    spec = importlib.util.spec_from_file_location("qkd_digits_feature_kd_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digits_options() -> dict:
    return _digits_config().DIGITS_OPTIONS


def init_phase(arm: str, opts: Options, student_tmpl) -> tuple[str, object]:
    """(name, phase) of the init slot (position 2) for `arm`: the released init phase of a
    two-phase method, else `no_init` (the loaded teacher again: no training)."""
    if arm == "ft":
        return INIT_PHASE[arm], recipes.paraphraser_phase(epochs=opts.init_epochs, batch_size=student_tmpl.batch_size)
    if arm == "fsp":  # the config's recipe, its digits deviation included (one source of truth)
        return INIT_PHASE[arm], _digits_config().fsp_init_phase(student_tmpl, epochs=opts.init_epochs)
    return NO_INIT, None


def student_phase(arm: str, opts: Options, c):
    """The student phase of `arm` (position 3), from the demo run `c`'s phases."""
    from qkd_jax.run.config_schema import phase

    if arm in ("qat", "sqakd"):
        return c.phases[arm]
    tmpl = c.phases.qat

    def groups():
        return dict(weights=tmpl.weights.copy_and_resolve_references(),
                    quant_params=tmpl.quant_params.copy_and_resolve_references())

    if arm == "ft":
        student = recipes.ft_phase(paraphraser=INIT_PHASE[arm], epochs=opts.epochs, batch_size=tmpl.batch_size,
                                   **groups())
    elif arm == "fsp":
        student = phase("student", objective="task", init_from=INIT_PHASE[arm], epochs=opts.epochs,
                        batch_size=tmpl.batch_size, **groups())
    else:
        student = recipes.feature_phase(arm, epochs=opts.epochs, batch_size=tmpl.batch_size,
                                        options=_digits_options().get(arm), **groups())
    student.eval_every_epochs = max(1, opts.epochs)
    return student


def build_config(seed: int, arm: str, opts: Options):
    """The seed's teacher run ('teacher') or teacher -> calibrate -> init slot -> `arm` (the
    student at position 3 for every method: the same calibration and student data order)."""
    import ml_collections

    if arm == "teacher":
        return rd.build_config(rd.RunSpec("teacher", seed), opts)
    c = rd.build_config(rd.RunSpec("grid", seed, "interval", BITS), opts)
    student = student_phase(arm, opts, c)
    name, init = init_phase(arm, opts, c.phases.qat)
    if init is None:
        init = c.phases.teacher.copy_and_resolve_references()  # loaded from config.teacher_checkpoint
    c.phase_order = f"teacher,calibrate,{name},{arm}"
    c.phases = ml_collections.ConfigDict({"teacher": c.phases.teacher, "calibrate": c.phases.calibrate,
                                          name: init, arm: student})
    return c


def plan(opts: Options) -> list[tuple[int, str]]:
    """(seed, arm) per run, seed by seed (each seed's teacher first), so a cut grid leaves whole seeds."""
    return [(s, a) for s in range(opts.seeds) for a in ("teacher",) + opts.arms]


def execute(seed: int, arm: str, opts: Options) -> dict:
    """Runs (or reads back) one run; returns {'top1', 'loss', 'wall_s', 'reused'} of its last phase."""
    config = build_config(seed, arm, opts)
    wanted = rd._config_dict(config)
    workdir = opts.budget_dir / f"seed{seed}" / arm
    result_file = workdir / "feature_kd_result.json"
    if result_file.exists():
        stored = json.loads(result_file.read_text())
        if stored.get("config") == wanted:
            return {**stored, "reused": True}
    results, wall = rd.train(config, workdir, wanted)
    ev = dict(results[arm].eval)
    record = {"top1": float(ev["top1"]), "loss": float(ev.get("loss", math.nan)), "wall_s": wall, "config": wanted}
    result_file.write_text(json.dumps(record, indent=1))
    return {**record, "reused": False}


# ----------------------------------------------------------------------------- the report


def per_seed(records: dict, arm: str) -> dict[int, float]:
    return {s: r["top1"] for (s, a), r in records.items() if a == arm}


def comparisons(opts: Options, records: dict) -> list[dict]:
    """SQAKD vs each other arm, paired by the seeds both have: per-seed differences and the t-test."""
    sq = per_seed(records, "sqakd")
    out = []
    for arm in opts.arms[1:]:
        other = per_seed(records, arm)
        seeds = sorted(set(sq) & set(other))
        if not seeds:
            continue
        diffs = [sq[s] - other[s] for s in seeds]
        out.append({"arm": arm, "seeds": seeds, "diffs": diffs, "test": paired_t(diffs)})
    for c, p_holm in zip(out, holm([c["test"].p for c in out])):  # over SQAKD's comparisons with every arm
        c["p_holm"] = p_holm
    return out



def _verdict(c: dict) -> str:
    """From the Holm-adjusted p of comparison `c` (family-wise error over all of SQAKD's comparisons)."""
    if math.isnan(c["p_holm"]):
        return "n/a (1 seed)"
    if c["p_holm"] >= ALPHA:
        return "not significant"
    return "SQAKD better" if c["test"].mean > 0 else "SQAKD worse"


def missing(opts: Options, records: dict) -> list[str]:
    return [f"seed{s}/{a}" for s, a in plan(opts) if (s, a) not in records]


CSV_COLUMNS = ("method", "description", "labels", "n_seeds", "mean_top1", "std_top1", "top1_per_seed",
               "diff_sqakd_minus_method", "paired_t_p", "holm_p")


def write_csv(path: pathlib.Path, opts: Options, records: dict, comps: list[dict]) -> None:
    by_arm = {c["arm"]: c for c in comps}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for arm in ("teacher",) + opts.arms:
            vals = per_seed(records, arm)
            if not vals:
                continue
            m, s = _mean_std(list(vals.values()))
            c = by_arm.get(arm)
            w.writerow([arm, "FP teacher" if arm == "teacher" else LABEL[arm],
                        "no" if arm == "sqakd" else "yes", len(vals), f"{m:.2f}",
                        "" if math.isnan(s) else f"{s:.2f}", ";".join(f"{vals[k]:.2f}" for k in sorted(vals)),
                        f"{c['test'].mean:.4f}" if c else "",
                        "" if not c or math.isnan(c["test"].p) else f"{c['test'].p:.4f}",
                        "" if not c or math.isnan(c["p_holm"]) else f"{c['p_holm']:.4f}"])


def write_runs_csv(path: pathlib.Path, records: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("method", "seed", "top1", "loss", "run_wall_s"))
        for (s, a), r in sorted(records.items()):
            w.writerow([a, s, f"{r['top1']:.4f}", f"{r['loss']:.4f}", f"{r['wall_s']:.1f}"])


def provenance(records: dict, wall_s: float) -> list[str]:
    """The header lines on where the numbers come from (a training invocation)."""
    env = rd._environment()
    return [f"- wall time of this invocation: {rd._duration(wall_s)}; summed wall time of all runs: "
            f"{rd._duration(sum(r['wall_s'] for r in records.values()))}",
            f"- machine: {env['machine']}; JAX {env['jax']} on {env['devices']}; date {env['date']}"]


def markdown(opts: Options, records: dict, comps: list[dict], header: Sequence[str]) -> str:
    title = "Feature-distillation baselines vs SQAKD on the bundled digits"
    out = [f"# {title}" + (" (--quick smoke setting: not a result)" if opts.quick else ""), "",
           "Generated by `experiments/feature_kd_digits.py`; regenerate (or resume) with", "", "```",
           opts.command, "```", "",
           *header,
           f"- seeds: {opts.seeds}; FP teacher {opts.teacher_epochs} epochs, each student phase {opts.epochs} "
           f"epochs (the demo uses 12 and 12); ResNet-20, 16x16 digits (1437 train / 360 test), interval "
           f"quantizer W{BITS}A{BITS}, preset `sqakd_cifar`, STE.",
           "- every student of a seed loads that seed's teacher and starts from the same calibration, and its "
           "student phase reads the same data order (phase order teacher, calibrate, init slot, student); "
           "one-phase feature baselines: CE + β · L_feature (γ 1, α 0, the released β).",
           f"- FT: the paraphraser trained on the teacher's feats[-2] for {opts.init_epochs} epoch(s) first "
           f"(released 30), then CE + {recipes.FT_BASELINE[1]:g} · L_factor; FSP: all but the classifier trained "
           f"on the FSP losses alone for {opts.init_epochs} epoch(s) first (released 30; the quantizer "
           "parameters with the student's Adam, not the released init SGD, which diverges here), then CE. Both init "
           "phases read the training data in one order (the same for FT and FSP).",
           "- accuracy: top-1 (%) on the 360 test images after the last epoch (1 image = 0.28 points); "
           "mean ± sample std over seeds.", ""]
    gone = missing(opts, records)
    if gone:
        out += [f"**Partial results: {len(gone)} of {len(plan(opts))} runs are missing** "
                f"({', '.join(gone)}); means and tests use the seeds present.", ""]
    teacher = per_seed(records, "teacher")
    if teacher:
        out += [f"FP teacher: **{_pm(list(teacher.values()))}**.", ""]
    by_arm = {c["arm"]: c for c in comps}
    out += ["| method | labels | top-1 % | per seed | Δ SQAKD − method (per seed) | mean Δ ± SE | p | Holm p "
            "| verdict (Holm) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in opts.arms:
        vals = per_seed(records, arm)
        if not vals:
            out.append(f"| {LABEL[arm]} | {'no' if arm == 'sqakd' else 'yes'} | missing | | | | | | |")
            continue
        seeds = ", ".join(f"{vals[k]:.2f}" for k in sorted(vals))
        c = by_arm.get(arm)
        if c:
            t = c["test"]
            se = "" if math.isnan(t.se) else f" ± {t.se:.2f}"
            p = "" if math.isnan(t.p) else f"{t.p:.3f}"
            p_holm = "" if math.isnan(c["p_holm"]) else f"{c['p_holm']:.3f}"
            cmp_ = (f"{', '.join(f'{d:+.2f}' for d in c['diffs'])} | {t.mean:+.2f}{se} | {p} | {p_holm} | "
                    f"{_verdict(c)}")
        else:
            cmp_ = "— | — | — | — | —"
        out.append(f"| {LABEL[arm]} | {'no' if arm == 'sqakd' else 'yes'} | {_pm(list(vals.values()))} | {seeds} | "
                   f"{cmp_} |")
    out += ["", "Test: two-sided paired t-test over seeds on the per-seed differences (df = seeds − 1; with 3 "
            "seeds p < 0.05 needs |Δ| above about 4.3 standard errors); p is its raw value, Holm p the "
            f"Holm-adjusted value over the {len(comps)} comparisons of SQAKD in this table (family-wise "
            f"error); the verdict is significant when the Holm p < {ALPHA} (experiments/paired_tests.py "
            "explains the choice).", "",
            f"![top-1 per method]({opts.out.name}.png)", "", "## Reading", ""]
    out += reading(opts, records, comps) + [""]
    return "\n".join(out)


def reading(opts: Options, records: dict, comps: list[dict]) -> list[str]:
    """Plain statements derived from the numbers."""
    lines = []
    if opts.quick:
        lines.append("- --quick smoke setting: the numbers only show that the pipeline runs.")
    if not comps:
        return lines + ["- No SQAKD comparison yet (runs missing)."]
    higher = [c for c in comps if c["test"].mean > 0.01]
    lower = [c for c in comps if c["test"].mean < -0.01]
    ties = [c for c in comps if abs(c["test"].mean) <= 0.01]
    lines.append(f"- SQAKD (no labels) has the higher mean than {len(higher)} of the {len(comps)} other methods, "
                 f"the lower mean than {len(lower)}" + (f", the same as {len(ties)}" if ties else "") + ".")
    if lower:
        lines.append("- Where SQAKD does not win (its mean is lower): " + ", ".join(
            f"{LABEL[c['arm']]} ({c['test'].mean:+.2f})" for c in lower) + ".")
    raw = [c for c in comps if not math.isnan(c["test"].p) and c["test"].p < ALPHA]
    sig = [c for c in comps if not math.isnan(c["p_holm"]) and c["p_holm"] < ALPHA]
    if any(not math.isnan(c["test"].p) for c in comps):
        lines.append(f"- Significant with Holm's correction over the {len(comps)} comparisons (adjusted p < {ALPHA}): "
                     + (", ".join(f"{LABEL[c['arm']]}: {_verdict(c)} (Holm p = {c['p_holm']:.3f})" for c in sig)
                        if sig else "none") + ".")
        lines.append(f"- Raw p < {ALPHA} before the correction: "
                     + (", ".join(f"{LABEL[c['arm']]} (p = {c['test'].p:.3f}, Holm p = {c['p_holm']:.3f})"
                                  for c in raw) if raw else "none")
                     + (f"; with {len(comps)} tests about {ALPHA * len(comps):.1f} such p are expected by chance."
                        if raw else "."))
    else:
        lines.append("- One seed: no noise estimate, so no test verdicts.")
    means = {a: _mean_std(list(per_seed(records, a).values()))[0] for a in opts.arms if per_seed(records, a)}
    top = max(means.values())
    tops = [a for a, m in means.items() if abs(m - top) < 1e-9]
    tied = [LABEL[a] for a in tops]
    extra = [a for a in tops if a in TWO_PHASE]
    lines.append(f"- Best mean ({top:.2f}): " + (", ".join(tied) if len(tied) > 1 else tied[0])
                 + (f" (a {len(tied)}-way tie)" if len(tied) > 1 else "")
                 + (f"; {' and '.join(a.upper() for a in extra)} trained {opts.init_epochs} init epoch(s) before its "
                    f"{opts.epochs} student epochs, more training than the one-phase methods get." if extra else "."))
    lines.append(f"- Caveats: {opts.epochs} student epoch(s) on 1437 training images, accuracy after the last "
                 "epoch, betas tuned for CIFAR (not for digits); differences of a point or two are within what "
                 "seeds and the schedule change.")
    return lines


def plot(path: pathlib.Path, opts: Options, records: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    arms = [a for a in opts.arms if per_seed(records, a)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(arms) + 2), 4.2))
    for i, arm in enumerate(arms):
        vals = list(per_seed(records, arm).values())
        m, s = _mean_std(vals)
        ax.bar(i, m, yerr=None if math.isnan(s) else s, capsize=3,
               color="tab:blue" if arm == "sqakd" else "tab:gray" if arm == "qat" else "tab:orange")
        ax.plot([i] * len(vals), vals, "k.", markersize=4)
    teacher = per_seed(records, "teacher")
    if teacher:
        ax.axhline(statistics.fmean(teacher.values()), color="k", linestyle="--", linewidth=1, label="FP teacher")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(arms)), [a.upper() for a in arms])
    ax.set_ylim(0, 100)
    ax.set_ylabel("top-1 % (mean ± std, dots = seeds)")
    ax.set_title(f"Digits ResNet-20 W{BITS}A{BITS}: {opts.seeds} seed(s), {opts.epochs} student epochs"
                 + (" (--quick)" if opts.quick else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _paths(out: pathlib.Path) -> dict[str, pathlib.Path]:
    return {"md": out.with_name(out.name + ".md"), "csv": out.with_name(out.name + ".csv"),
            "runs_csv": out.with_name(out.name + "_runs.csv"), "png": out.with_name(out.name + ".png"),
            "meta": out.with_name(out.name + "_meta.json")}


def _write_report(opts: Options, records: dict, paths: dict[str, pathlib.Path], header: Sequence[str]) -> None:
    comps = comparisons(opts, records)
    write_csv(paths["csv"], opts, records, comps)
    plot(paths["png"], opts, records)
    paths["md"].write_text(markdown(opts, records, comps, header), encoding="utf-8")


def write_outputs(opts: Options, records: dict, wall_s: float) -> dict[str, pathlib.Path]:
    out = opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = _paths(out)
    header = provenance(records, wall_s)
    write_runs_csv(paths["runs_csv"], records)
    paths["meta"].write_text(json.dumps({"command": opts.command, "header": header}, indent=1) + "\n",
                             encoding="utf-8")
    _write_report(opts, records, paths, header)
    return paths


def read_runs_csv(path: pathlib.Path) -> dict[tuple[int, str], dict]:
    """OUT_runs.csv back as the records `execute` returns, keyed (seed, method)."""
    with open(path, newline="", encoding="utf-8") as f:
        return {(int(r["seed"]), r["method"]): {"top1": float(r["top1"]), "loss": float(r["loss"]),
                                                "wall_s": float(r["run_wall_s"])} for r in csv.DictReader(f)}


def report_only(opts: Options, log=print) -> dict[str, pathlib.Path]:
    """Rewrites OUT.md, OUT.csv and OUT.png from OUT_runs.csv (and OUT_meta.json): no training."""
    paths = _paths(opts.out)
    if not paths["runs_csv"].exists():
        raise FileNotFoundError(f"--report-only: {paths['runs_csv']} does not exist (run the grid first)")
    meta = json.loads(paths["meta"].read_text(encoding="utf-8")) if paths["meta"].exists() else {}
    records = read_runs_csv(paths["runs_csv"])
    header = list(meta.get("header", [])) + [
        f"- tables regenerated from `{paths['runs_csv'].name}` without training (`--report-only`), "
        f"{rd._environment()['date']}"]
    _write_report(opts, records, paths, header)
    log("wrote " + ", ".join(str(paths[k]) for k in ("md", "csv", "png")))
    return paths


def reproduce(opts: Options, log=print) -> dict[str, pathlib.Path]:
    """Runs the grid (reusing finished runs), rewriting the outputs after each run."""
    t0 = time.perf_counter()
    records: dict[tuple[int, str], dict] = {}
    specs = plan(opts)
    paths = {}
    for i, (seed, arm) in enumerate(specs, 1):
        rec = execute(seed, arm, opts)
        records[(seed, arm)] = rec
        how = "reused" if rec["reused"] else f"{rec['wall_s']:.0f} s"
        log(f"[{i}/{len(specs)}] seed{seed}/{arm}: top1 {rec['top1']:.2f} ({how})")
        paths = write_outputs(opts, records, time.perf_counter() - t0)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    opts = parse_args(argv)
    parallel.setup_jax(str(ROOT / ".cache" / "jax"))
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        report_only(opts) if opts.report_only else reproduce(opts)
    except rd.ConfigMismatchError as err:
        sys.exit(f"error: {err}")
    except FileNotFoundError as err:  # --report-only without the runs CSV
        if not opts.report_only:
            raise
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
