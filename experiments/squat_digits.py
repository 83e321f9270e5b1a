"""SQAKD vs SQuaT on the bundled digits: quantizer methods x bit widths, paired by seed, Holm.

    python experiments/squat_digits.py --out=docs/squat_digits [--seeds=3] [--epochs=12]
        [--teacher-epochs=12] [--methods=interval,pact,lsq,dorefa] [--bits=1,2,4]
        [--mismatch-bits=2] [--workdirs=...] [--jobs=1] [--quick] [--report-only]

Writes OUT.md (table, paired tests, the command, wall time, a reading), OUT.csv (one row per
setting), OUT_runs.csv (one row per run) and OUT.png (the plot).

What runs (ResNet-20, 16x16 digits, preset `sqakd_cifar`; the machinery of
experiments/reproduce_digits.py and experiments/feature_kd_digits.py):

- per seed s: one FP teacher (`--teacher-epochs`), loaded through `config.teacher_checkpoint` by
  every student run of that seed.
- per (seed, method, bits, arm) one run `teacher, calibrate, <arm>`: the phase seed (calibration
  batch, data order) comes from the run seed and the phase's position, so both arms of a setting
  start from the same calibration and read the same data order. Arms (the demo's student recipe,
  `--epochs` epochs): `sqakd` = KL_4(s, sg(t)), `squat` = the same KL + 1.0 * MSE(q_s, sg(q_t)) at
  the input of the last block's conv2 (configs/digits_squat.py, recipes.squat_phase), both label-free,
  both with delta 0 (STE): the delta policy is equal on both arms.
- the released-mismatch row (interval quantizer, W`--mismatch-bits`): `squat_hessian` = SQuaT with
  the EWGS delta from Hessian traces (the release's --use_hessian True; here the demo's joint probe,
  every max(1, epochs // 3) epochs on the phase's KL) against the `sqakd` arm with delta 0 (SQAKD's
  release): labelled as such, it shows the confound of comparing the two releases as published.

Tests: two-sided paired t-test over seeds on the per-seed differences SQuaT - SQAKD
(experiments/paired_tests.py explains why), Holm's correction over every comparison of the table.
Outputs are rewritten after every finished run; a rerun reads finished runs back.

`--quick` (the smoke setting): 1 seed, 1 epoch per phase, methods interval and lsq at W2A2 plus the
mismatch row, outputs under workdirs/squat_digits_quick/.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
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
from experiments.paired_tests import ALPHA, holm, mean_pm_std as _pm, paired_test  # noqa: E402

METHODS = ("interval", "pact", "lsq", "dorefa")
BITS = (1, 2, 4)
ARMS = ("sqakd", "squat")
MISMATCH = "squat_hessian"
METHOD_LABEL = {"interval": "EWGS interval", "pact": "PACT", "lsq": "LSQ", "dorefa": "DoReFa", "qkd": "QKD"}


@dataclasses.dataclass(frozen=True)
class Options:
    """What to run and where to write it (duck-typed for reproduce_digits.build_config)."""

    out: pathlib.Path
    workdirs: pathlib.Path
    seeds: int = 3
    epochs: int = 12
    teacher_epochs: int = 12
    methods: tuple[str, ...] = METHODS
    bits: tuple[int, ...] = BITS
    mismatch_bits: int = 2
    quick: bool = False
    command: str = ""
    report_only: bool = False
    jobs: int = 1

    @property
    def budget_dir(self) -> pathlib.Path:
        return self.workdirs / f"t{self.teacher_epochs}_e{self.epochs}"

    def settings(self) -> list[tuple[str, int, str]]:
        """(method, bits, arm) of every student run of one seed; the mismatch arm last."""
        out = [(m, b, a) for m in self.methods for b in self.bits for a in ARMS]
        if self.mismatch_bits:
            if ("interval", self.mismatch_bits, "sqakd") not in out:
                out.append(("interval", self.mismatch_bits, "sqakd"))
            out.append(("interval", self.mismatch_bits, MISMATCH))
        return out


def _csv_list(text: str, cast, allowed, name: str, p: argparse.ArgumentParser) -> tuple:
    values = tuple(dict.fromkeys(cast(t.strip()) for t in text.split(",") if t.strip()))
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        p.error(f"--{name}: {bad or 'empty'}; choose from {list(allowed)}")
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output prefix (default docs/squat_digits)")
    p.add_argument("--workdirs", default=None, help="run folders (default workdirs/squat_digits)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick 1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per student phase (default 12; --quick 1)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="FP teacher epochs (default 12; --quick 1)")
    p.add_argument("--methods", default=None, help="quantizer methods (default interval,pact,lsq,dorefa)")
    p.add_argument("--bits", default=None, help="bit widths WbAb (default 1,2,4)")
    p.add_argument("--mismatch-bits", type=int, default=2, help="bits of the released-mismatch row (0: none)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke setting (see the module docstring)")
    p.add_argument("--report-only", action="store_true", help="train nothing: rewrite the report from OUT_runs.csv")
    a = p.parse_args(argv)
    q = a.quick
    methods = _csv_list(a.methods or ("interval,lsq" if q else ",".join(METHODS)), str, METHOD_LABEL, "methods", p)
    bits = _csv_list(a.bits or ("2" if q else "1,2,4"), int, range(1, 9), "bits", p)
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    if a.mismatch_bits not in range(0, 9):
        p.error(f"--mismatch-bits must be 0..8, got {a.mismatch_bits}")
    base = ROOT / "workdirs" / ("squat_digits_quick" if q else "squat_digits")
    out = a.out or str(base / "squat_digits" if q else ROOT / "docs" / "squat_digits")
    n = {k: (v if v is not None else (1 if q else d)) for k, v, d in
         (("seeds", a.seeds, 3), ("epochs", a.epochs, 12), ("teacher_epochs", a.teacher_epochs, 12))}
    for k, v in n.items():
        if v < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    return Options(out=pathlib.Path(out).absolute(), workdirs=pathlib.Path(a.workdirs or base).absolute(),
                   methods=methods, bits=bits, mismatch_bits=a.mismatch_bits, quick=q, report_only=a.report_only,
                   jobs=a.jobs,
                   command=" ".join(["python", "experiments/squat_digits.py",
                                     *(shlex.quote(x) for x in argv_list if x != "--report-only")]), **n)


def build_config(seed: int, method: str, bits: int, arm: str, opts: Options):
    """The seed's teacher run (arm 'teacher') or teacher -> calibrate -> arm (position 2 for every arm)."""
    import ml_collections

    from qkd_jax.run import recipes

    if arm == "teacher":
        return rd.build_config(rd.RunSpec("teacher", seed), opts)
    c = rd.build_config(rd.RunSpec("grid", seed, method, bits), opts)
    sqakd = c.phases.sqakd
    if arm == "sqakd":
        student = sqakd
    else:
        student = recipes.squat_phase("squat", epochs=opts.epochs, batch_size=sqakd.batch_size,
                                      weights=sqakd.weights.copy_and_resolve_references(),
                                      quant_params=sqakd.quant_params.copy_and_resolve_references())
        student.eval_every_epochs = max(1, opts.epochs)
    if arm == MISMATCH:
        c.quant.estimator = "hessian"
        c.quant.hessian_every_epochs = max(1, opts.epochs // 3)
        c.quant.hessian_loss = "phase"
    c.phase_order = f"teacher,calibrate,{arm}"
    c.phases = ml_collections.ConfigDict({"teacher": c.phases.teacher, "calibrate": c.phases.calibrate, arm: student})
    return c


Key = tuple[int, str, int, str]  # (seed, method, bits, arm)


def plan(opts: Options) -> list[Key]:
    """Every run, seed by seed (the seed's teacher first), so a cut grid leaves whole seeds."""
    return [k for s in range(opts.seeds) for k in [(s, "fp", 32, "teacher")]
            + [(s, m, b, a) for m, b, a in opts.settings()]]


def execute(key: Key, opts: Options) -> dict:
    """Runs (or reads back) one run; returns {'top1', 'loss', 'wall_s', 'reused'} of its last phase."""
    seed, method, bits, arm = key
    config = build_config(seed, method, bits, arm, opts)
    wanted = rd._config_dict(config)
    name = "teacher" if arm == "teacher" else f"{arm}_{method}_w{bits}a{bits}"
    workdir = opts.budget_dir / f"seed{seed}" / name
    if arm == "teacher":  # the path build_config's students read their teacher from
        workdir = opts.budget_dir / rd.RunSpec("teacher", seed).name
    result_file = workdir / "squat_result.json"
    if result_file.exists():
        stored = json.loads(result_file.read_text())
        if stored.get("config") == wanted:
            return {**stored, "reused": True}
    results, wall = rd.train(config, workdir, wanted)
    last = config.phase_order.split(",")[-1]
    ev = dict(results[last].eval)
    record = {"top1": float(ev["top1"]), "loss": float(ev.get("loss", math.nan)), "wall_s": wall, "config": wanted}
    result_file.write_text(json.dumps(record, indent=1))
    return {**record, "reused": False}


# ----------------------------------------------------------------------------- the report


def per_seed(records: dict, method: str, bits: int, arm: str) -> dict[int, float]:
    return {s: r["top1"] for (s, m, b, a), r in records.items() if (m, b, a) == (method, bits, arm)}


def comparisons(opts: Options, records: dict) -> list[dict]:
    """SQuaT - SQAKD per (method, bits), and the mismatch row (squat_hessian - sqakd), paired by seed;
    Holm over all of them."""
    rows = [(m, b, "squat") for m in opts.methods for b in opts.bits]
    if opts.mismatch_bits:
        rows.append(("interval", opts.mismatch_bits, MISMATCH))
    out = []
    for method, bits, arm in rows:
        base, other = per_seed(records, method, bits, "sqakd"), per_seed(records, method, bits, arm)
        seeds = sorted(set(base) & set(other))
        if not seeds:
            continue
        diffs = [other[s] - base[s] for s in seeds]
        out.append({"method": method, "bits": bits, "arm": arm, "seeds": seeds, "diffs": diffs,
                    "sqakd": [base[s] for s in seeds], "other": [other[s] for s in seeds], "test": paired_test(diffs)})
    for c, p_holm in zip(out, holm([c["test"].p for c in out])):
        c["p_holm"] = p_holm
    return out



def _fmt(p: float) -> str:
    return "" if math.isnan(p) else f"{p:.3f}"


def _fmt4(p: float) -> str:
    return "" if math.isnan(p) else f"{p:.4f}"


def verdict(c: dict) -> str:
    if math.isnan(c["p_holm"]):
        return "n/a (1 seed)"
    if c["p_holm"] >= ALPHA:
        return "not significant"
    return "SQuaT better" if c["test"].mean > 0 else "SQuaT worse"


def _label(c: dict) -> str:
    tag = " — released mismatch: SQuaT Hessian delta vs SQAKD delta 0" if c["arm"] == MISMATCH else ""
    return f"{METHOD_LABEL[c['method']]}{tag}"


CSV_COLUMNS = ("method", "bits", "arm", "n_seeds", "sqakd_mean", "arm_mean", "diff_arm_minus_sqakd", "se",
               "paired_t_p", "holm_p", "verdict")


def write_csv(path: pathlib.Path, comps: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for c in comps:
            t = c["test"]
            w.writerow([c["method"], c["bits"], c["arm"], len(c["seeds"]), f"{statistics.fmean(c['sqakd']):.2f}",
                        f"{statistics.fmean(c['other']):.2f}", f"{t.mean:.4f}", "" if math.isnan(t.se) else f"{t.se:.4f}",
                        _fmt4(t.p), _fmt4(c["p_holm"]), verdict(c)])


RUN_COLUMNS = ("method", "bits", "arm", "seed", "top1", "loss", "run_wall_s")


def write_runs_csv(path: pathlib.Path, records: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(RUN_COLUMNS)
        for (s, m, b, a), r in sorted(records.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3], kv[0][0])):
            w.writerow([m, b, a, s, f"{r['top1']:.4f}", f"{r['loss']:.4f}", f"{r['wall_s']:.1f}"])


def read_runs_csv(path: pathlib.Path) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        return {(int(r["seed"]), r["method"], int(r["bits"]), r["arm"]): {
            "top1": float(r["top1"]), "loss": float(r["loss"]), "wall_s": float(r["run_wall_s"])}
            for r in csv.DictReader(f)}


def markdown(opts: Options, records: dict, comps: list[dict], header: Sequence[str]) -> str:
    out = ["# SQAKD vs SQuaT on the bundled digits" + (" (--quick smoke setting: not a result)" if opts.quick else ""),
           "", "Generated by `experiments/squat_digits.py`; regenerate (or resume) with", "", "```", opts.command,
           "```", "", *header,
           f"- seeds: {opts.seeds}; FP teacher {opts.teacher_epochs} epochs, each student phase {opts.epochs} epochs; "
           "ResNet-20, 16x16 digits (1437 train / 360 test), preset `sqakd_cifar`, label-free students.",
           "- per seed both arms load the same teacher, start from the same calibration and read the same data "
           "order; SQAKD = KL_4(s, sg(t)); SQuaT = KL_4 + 1.0 · MSE(q_s, sg(q_t)) at the input of layer3's last "
           "conv2 (docs/method.md, \"SQuaT\"); delta 0 (STE) on both arms except the labelled mismatch row.",
           "- accuracy: top-1 (%) on the 360 test images after the last epoch (1 image = 0.28 points).", ""]
    gone = [f"seed{s}/{a}_{m}_w{b}a{b}" for s, m, b, a in plan(opts) if (s, m, b, a) not in records]
    if gone:
        out += [f"**Partial results: {len(gone)} of {len(plan(opts))} runs are missing** ({', '.join(gone)}).", ""]
    teacher = {s: r["top1"] for (s, m, b, a), r in records.items() if a == "teacher"}
    if teacher:
        out += [f"FP teacher: **{_pm(list(teacher.values()))}**.", ""]
    out += ["| quantizer | bits | SQAKD top-1 % | SQuaT top-1 % | Δ SQuaT − SQAKD (per seed) | mean Δ ± SE | p | Holm p "
            "| verdict (Holm) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in comps:
        t = c["test"]
        se = "" if math.isnan(t.se) else f" ± {t.se:.2f}"
        out.append(f"| {_label(c)} | W{c['bits']}A{c['bits']} | {_pm(c['sqakd'])} | {_pm(c['other'])} | "
                   f"{', '.join(f'{d:+.2f}' for d in c['diffs'])} | {t.mean:+.2f}{se} | {_fmt(t.p)} | "
                   f"{_fmt(c['p_holm'])} | {verdict(c)} |")
    out += ["", "Test: two-sided paired t-test over seeds (df = seeds − 1; where every seed's difference is the "
            f"same, the exact sign-flip p, 0.25 for three seeds: `paired_tests.paired_test`); Holm p over the "
            f"{len(comps)} comparisons of this table; significant when Holm p < {ALPHA} (experiments/paired_tests.py).", "",
            f"![SQuaT minus SQAKD per setting]({opts.out.name}.png)", "", "## Reading", ""]
    out += reading(opts, comps) + [""]
    return "\n".join(out)


def reading(opts: Options, comps: list[dict]) -> list[str]:
    """Plain statements derived from the numbers."""
    lines = ["- --quick smoke setting: the numbers only show that the pipeline runs."] if opts.quick else []
    main = [c for c in comps if c["arm"] != MISMATCH]
    if not main:
        return lines + ["- No comparison yet (runs missing)."]
    up = sum(c["test"].mean > 0 for c in main)
    down = sum(c["test"].mean < 0 for c in main)
    lines.append(f"- Equal delta policy: SQuaT has the higher mean in {up} of {len(main)} settings, the lower in "
                 f"{down}" + (f", the same in {len(main) - up - down}" if len(main) - up - down else "") + ".")
    sig = [c for c in comps if not math.isnan(c["p_holm"]) and c["p_holm"] < ALPHA]
    if any(not math.isnan(c["p_holm"]) for c in comps):
        lines.append(f"- Significant after Holm over {len(comps)} comparisons: " + (", ".join(
            f"{_label(c)} W{c['bits']}A{c['bits']}: {verdict(c)} (Holm p = {c['p_holm']:.3f})" for c in sig)
            if sig else "none") + ".")
    else:
        lines.append("- One seed: no noise estimate, so no test verdicts.")
    for c in comps:
        if c["arm"] == MISMATCH:
            lines.append(f"- Released mismatch (not a like-for-like comparison): SQuaT with the Hessian delta minus "
                         f"SQAKD with delta 0 at W{c['bits']}A{c['bits']}: {c['test'].mean:+.2f} points.")
            if opts.epochs <= max(1, opts.epochs // 3):
                lines.append(f"- With {opts.epochs} student epoch(s) no delta refresh happens (the runner refreshes "
                             "before the first step of epoch k * every, k >= 1), so the mismatch row trained as SQuaT "
                             "with delta 0.")
    return lines


def plot(path: pathlib.Path, comps: list[dict], opts: Options) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(comps) + 2), 4.0))
    for i, c in enumerate(comps):
        t = c["test"]
        ax.bar(i, t.mean, yerr=None if math.isnan(t.se) else t.se, capsize=3,
               color="tab:red" if c["arm"] == MISMATCH else "tab:blue")
        ax.plot([i] * len(c["diffs"]), c["diffs"], "k.", markersize=4)
    ax.axhline(0.0, color="k", linewidth=1)
    ax.set_xticks(range(len(comps)), [f"{c['method']}\nW{c['bits']}A{c['bits']}" + ("\n(mismatch)" if c["arm"] == MISMATCH
                                      else "") for c in comps], fontsize=8)
    ax.set_ylabel("top-1 points: SQuaT − SQAKD (mean ± SE, dots = seeds)")
    ax.set_title(f"Digits ResNet-20, {opts.seeds} seed(s), {opts.epochs} student epochs"
                 + (" (--quick)" if opts.quick else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _paths(out: pathlib.Path) -> dict[str, pathlib.Path]:
    return {k: out.with_name(out.name + s) for k, s in
            (("md", ".md"), ("csv", ".csv"), ("runs_csv", "_runs.csv"), ("png", ".png"), ("meta", "_meta.json"))}


def write_report(opts: Options, records: dict, header: Sequence[str]) -> dict[str, pathlib.Path]:
    paths = _paths(opts.out)
    paths["md"].parent.mkdir(parents=True, exist_ok=True)
    comps = comparisons(opts, records)
    write_csv(paths["csv"], comps)
    plot(paths["png"], comps, opts)
    paths["md"].write_text(markdown(opts, records, comps, header), encoding="utf-8")
    return paths


def report_only(opts: Options, log=print) -> dict[str, pathlib.Path]:
    """Rewrites OUT.md, OUT.csv and OUT.png from OUT_runs.csv (and OUT_meta.json): no training."""
    paths = _paths(opts.out)
    if not paths["runs_csv"].exists():
        raise FileNotFoundError(f"--report-only: {paths['runs_csv']} does not exist (run the grid first)")
    meta = json.loads(paths["meta"].read_text(encoding="utf-8")) if paths["meta"].exists() else {}
    header = list(meta.get("header", [])) + [f"- tables regenerated from `{paths['runs_csv'].name}` without "
                                             f"training (`--report-only`), {rd._environment()['date']}"]
    write_report(opts, read_runs_csv(paths["runs_csv"]), header)
    log("wrote " + ", ".join(str(paths[k]) for k in ("md", "csv", "png")))
    return paths


def reproduce(opts: Options, log=print) -> dict[str, pathlib.Path]:
    """Runs the grid (reusing finished runs; teachers first, then `--jobs` runs at a time), rewriting
    the outputs after each run."""
    t0 = time.perf_counter()
    records: dict = {}
    paths: dict = {}
    specs = plan(opts)
    teachers = [k for k in specs if k[3] == "teacher"]
    students = [k for k in specs if k[3] != "teacher"]

    def done(key: Key, rec: dict) -> None:
        nonlocal paths
        records[key] = rec
        how = "reused" if rec["reused"] else f"{rec['wall_s']:.0f} s"
        log(f"[{len(records)}/{len(specs)}] seed{key[0]}/{key[3]}_{key[1]}_w{key[2]}a{key[2]}: "
            f"top1 {rec['top1']:.2f} ({how})")
        env = rd._environment()
        header = [f"- wall time of this invocation: {rd._duration(time.perf_counter() - t0)}; summed wall time of all "
                  f"runs: {rd._duration(sum(r['wall_s'] for r in records.values()))}",
                  f"- machine: {env['machine']}; JAX {env['jax']} on {env['devices']}; date {env['date']}"]
        paths = _paths(opts.out)
        paths["md"].parent.mkdir(parents=True, exist_ok=True)
        write_runs_csv(paths["runs_csv"], records)
        paths["meta"].write_text(json.dumps({"command": opts.command, "header": header}, indent=1) + "\n",
                                 encoding="utf-8")
        paths = write_report(opts, records, header)

    parallel.run_stages(execute, (teachers, students), opts, opts.jobs, done, str(ROOT / ".cache" / "jax"))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    opts = parse_args(argv)
    parallel.setup_jax(str(ROOT / ".cache" / "jax"))
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        report_only(opts) if opts.report_only else reproduce(opts)
    except rd.ConfigMismatchError as err:
        sys.exit(f"error: {err}")
    except FileNotFoundError as err:
        if not opts.report_only:
            raise
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
