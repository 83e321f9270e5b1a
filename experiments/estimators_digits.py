"""Every built-in gradient estimator x quantizer method x bit width on the bundled digits, SQAKD objective,
paired tests against the STE (Holm), and the estimator diagnostics' descent check.

    python experiments/estimators_digits.py --out=docs/estimators [--seeds=3] [--epochs=4]
        [--teacher-epochs=12] [--methods=interval,lsq,pact,dorefa] [--bits=1,2,4]
        [--estimators=ste,ewgs,dsq,approxsign,reste,stochastic,noise] [--workdirs=workdirs/estimators]
        [--jobs=1] [--quick]

Writes OUT.md (the table, the paired tests, the descent check, the command and wall time),
OUT_runs.csv (one row per run) and OUT.png (mean top-1 per estimator, one panel per method).

Per seed s: one FP teacher (experiments/reproduce_digits.py's teacher run, read back through
`config.teacher_checkpoint` by every student of the seed). Per (seed, method, bits, estimator): teacher
(loaded) -> calibrate -> `sqakd` (alpha KL_T, T = 4, no labels), the demo's student recipe. The
calibration does not depend on the estimator (hard forward, same phase positions and seed), so every
estimator of a seed starts from the same calibrated student and sees the same data order: the per-seed
differences to the STE are paired. 'ewgs' runs with delta 0.2 (fixed), the others with their defaults.
Diagnostics: for each (seed, method, bits), `qkd_jax.quant.diagnostics` on the final STE student and one
training batch of 256 images: the share of (layer, step size) pairs where each estimator's normalised
gradient step on one layer lowers the true quantized loss (step sizes 1e-3, 1e-2, 1e-1).

Each finished run leaves `estimator_result.json` (its config and top-1) and each cell `descent.json`, so
a rerun reads finished work back without training; `--jobs=N` trains N students at a time in worker
processes that share the persistent compilation cache (`.cache/jax`).

`--quick` (the test's smoke setting): 1 seed, 1 epoch (teacher 1), interval and LSQ at W2A2, estimators
ste, dsq and noise; outputs under workdirs/estimators_quick/ unless --out / --workdirs are given.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import statistics
import sys
import time
from typing import Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import paired_tests as pt  # noqa: E402
from experiments import parallel  # noqa: E402
from experiments import reproduce_digits as rd  # noqa: E402

METHODS = ("interval", "lsq", "pact", "dorefa")
BITS = (1, 2, 4)
ESTIMATORS = ("ste", "ewgs", "dsq", "approxsign", "reste", "stochastic", "noise")
OPTIONS = {"ewgs": "delta=0.2"}
STEP_SIZES = (1e-3, 1e-2, 1e-1)
RUN_COLUMNS = ("method", "bits", "estimator", "seed", "top1", "descent", "wall_s")


@dataclasses.dataclass(frozen=True)
class Options:
    out: pathlib.Path
    workdirs: pathlib.Path
    seeds: int = 3
    epochs: int = 4
    teacher_epochs: int = 12
    methods: tuple[str, ...] = METHODS
    bits: tuple[int, ...] = BITS
    estimators: tuple[str, ...] = ESTIMATORS
    command: str = ""
    jobs: int = 1

    @property
    def reproduce(self) -> rd.Options:
        """The reproduction script's options for the teacher runs (same budget folder layout)."""
        return rd.Options(out=self.out, workdirs=self.workdirs, seeds=self.seeds, epochs=self.epochs,
                          teacher_epochs=self.teacher_epochs)


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--workdirs", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--methods", default=None)
    p.add_argument("--bits", default=None)
    p.add_argument("--estimators", default=None)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes (default 1)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    q = a.quick
    base = ROOT / "workdirs" / ("estimators_quick" if q else "estimators")
    return Options(
        out=pathlib.Path(a.out) if a.out else (base / "estimators" if q else ROOT / "docs" / "estimators"),
        workdirs=pathlib.Path(a.workdirs) if a.workdirs else base,
        seeds=a.seeds or (1 if q else 3),
        epochs=a.epochs or (1 if q else 4),
        teacher_epochs=a.teacher_epochs or (1 if q else 12),
        methods=rd._csv_list(a.methods, METHODS, name="--methods") if a.methods else (("interval", "lsq") if q else METHODS),
        bits=rd._csv_list(a.bits, BITS, int, "--bits") if a.bits else ((2,) if q else BITS),
        estimators=(rd._csv_list(a.estimators, ESTIMATORS, name="--estimators") if a.estimators
                    else (("ste", "dsq", "noise") if q else ESTIMATORS)),
        jobs=a.jobs,
        command="python experiments/estimators_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )


def build_config(opts: Options, seed: int, method: str, bits: int, estimator: str):
    """configs/digits_demo.py: teacher (loaded) -> calibrate -> sqakd with `estimator`."""
    import ml_collections

    c = rd._demo_config()
    c.seed, c.tensorboard, c.keep_checkpoints, c.log_every_steps = seed, False, 1, 1000
    c.teacher_checkpoint = str(opts.reproduce.budget_dir / rd.RunSpec("teacher", seed).name / "teacher")
    c.quant.method, c.quant.w_bits, c.quant.a_bits, c.quant.preset = method, bits, bits, "sqakd_cifar"
    c.quant.estimator, c.quant.estimator_options = estimator, OPTIONS.get(estimator, "")
    teacher = c.phases.teacher
    teacher.epochs, teacher.eval_every_epochs = opts.teacher_epochs, max(1, opts.teacher_epochs)
    sqakd = c.phases.sqakd
    sqakd.epochs, sqakd.eval_every_epochs = opts.epochs, max(1, opts.epochs)
    c.phase_order = "teacher,calibrate,sqakd"
    c.phases = ml_collections.ConfigDict({"teacher": teacher, "calibrate": c.phases.calibrate, "sqakd": sqakd})
    return c


def descent_shares(config, student: dict, estimators: Sequence[str]) -> dict[str, float]:
    """The diagnostics' descent share per estimator on the final student and the first 256 training images."""
    import jax
    import jax.numpy as jnp

    import numpy as np

    from qkd_jax.data.digits import digits_source
    from qkd_jax.data.info import dataset_info
    from qkd_jax.quant import estimators as qe
    from qkd_jax.quant.diagnostics import estimator_diagnostics, with_estimator
    from qkd_jax.quant.layers import quantized_layers
    from qkd_jax.run import build
    from qkd_jax.models.registry import get_model

    rules = build.student_rules(config)
    info, source = dataset_info("qkd_digits"), digits_source("train")
    records = [source[i] for i in range(256)]
    images = (np.stack([r["image"] for r in records]).astype(np.float32) / 255.0 - np.float32(info.mean)) / np.float32(info.std)
    labels = np.asarray([r["label"] for r in records], np.int32)

    def model_for(est):
        conv, dense = quantized_layers(with_estimator(rules, est) if est is not None else rules)
        return get_model(config.model.name, build.num_classes(config), conv=conv, dense=dense)

    ests = {n: qe.make(n, dict(rd_options(n))) for n in estimators}
    variables = {k: v for k, v in student.items()}
    report = estimator_diagnostics(model_for, rules, variables, jnp.asarray(images), jnp.asarray(labels), ests,
                                   step_sizes=STEP_SIZES)
    jax.clear_caches()
    return report["descent"]


def rd_options(name: str) -> dict:
    from qkd_jax.run.estimator_config import parse_options

    return parse_options(OPTIONS.get(name, ""))


Key = tuple[int, str, int, str]  # (seed, method, bits, estimator)


def _cell_dir(opts: Options, seed: int, method: str, bits: int) -> pathlib.Path:
    return opts.workdirs / f"seed{seed}" / f"{method}_w{bits}a{bits}"


def _teacher(seed: int, opts: Options) -> dict:
    return rd.execute(rd.RunSpec("teacher", seed), opts.reproduce)


def execute(key: Key, opts: Options) -> dict:
    """Runs (or reads back from its `estimator_result.json`) one student; the diagnosed estimator's run
    also computes (or reads back) its cell's descent shares. Returns {'top1', 'wall_s', 'reused'}."""
    import json

    seed, method, bits, est = key
    config = build_config(opts, seed, method, bits, est)
    wanted = rd._config_dict(config)
    workdir = _cell_dir(opts, seed, method, bits) / est
    result_file = workdir / "estimator_result.json"
    stored = json.loads(result_file.read_text()) if result_file.exists() else {}
    student = None
    if stored.get("config") != wanted:
        results, wall = rd.train(config, workdir, wanted)
        student = results["sqakd"].student
        stored = {"top1": float(results["sqakd"].eval["top1"]), "wall_s": wall, "config": wanted}
        result_file.write_text(json.dumps(stored, indent=1))
        reused = False
    else:
        reused = True
    if est == _diagnosed(opts):
        descent_file = _cell_dir(opts, seed, method, bits) / "descent.json"
        want = {"estimators": list(opts.estimators), "step_sizes": list(STEP_SIZES), "student": wanted}
        cached = json.loads(descent_file.read_text()) if descent_file.exists() else {}
        if cached.get("of") != want:
            if student is None:  # a finished run: its checkpoint is read back, nothing trains
                from qkd_jax.run.loop import run

                with rd._quiet(workdir / "run.log"):
                    student = run(config, workdir)["sqakd"].student
            shares = descent_shares(config, student, opts.estimators)
            descent_file.write_text(json.dumps({"of": want, "descent": shares}, indent=1))
    return {"top1": stored["top1"], "wall_s": stored["wall_s"], "reused": reused}


def _diagnosed(opts: Options) -> str:
    """The estimator whose final student the descent check runs on: the STE, else the first one."""
    return "ste" if "ste" in opts.estimators else opts.estimators[0]


def run_grid(opts: Options, log=print) -> list[dict]:
    """Every run (teachers first, then `opts.jobs` students at a time), reusing finished ones; one row per
    run in grid order, each with its cell's descent share."""
    import json

    keys = [(s, m, b, e) for s in range(opts.seeds) for m in opts.methods for b in opts.bits for e in opts.estimators]
    records: dict = {}

    def done(key: Key, rec: dict) -> None:
        records[key] = rec
        seed, method, bits, est = key
        how = "reused" if rec["reused"] else f"{rec['wall_s']:.0f} s"
        log(f"[{len(records)}/{len(keys)}] seed {seed} {method} W{bits}A{bits} {est}: top-1 {rec['top1']:.2f}% ({how})")

    for seed in range(opts.seeds):  # before any student: every student of a seed loads its teacher
        _teacher(seed, opts)
    parallel.run_stages(execute, [keys], opts, opts.jobs, done, str(ROOT / ".cache" / "jax"))
    rows = []
    for key in keys:
        seed, method, bits, est = key
        shares = json.loads((_cell_dir(opts, seed, method, bits) / "descent.json").read_text())["descent"]
        rows.append({"method": method, "bits": bits, "estimator": est, "seed": seed, "top1": records[key]["top1"],
                     "descent": round(shares[est], 4), "wall_s": round(records[key]["wall_s"], 1)})
    return rows


def comparisons(rows: Sequence[dict]) -> list[dict]:
    """Paired t-tests (estimator - STE, by seed) per (method, bits, estimator), Holm over all of them."""
    top1 = {(r["method"], int(r["bits"]), r["estimator"], int(r["seed"])): float(r["top1"]) for r in rows}
    cells = sorted({(m, b, e) for m, b, e, _ in top1 if e != "ste"})
    out = []
    for m, b, e in cells:
        seeds = sorted(s for mm, bb, ee, s in top1 if (mm, bb, ee) == (m, b, e) and (m, b, "ste", s) in top1)
        diffs = [top1[(m, b, e, s)] - top1[(m, b, "ste", s)] for s in seeds]
        test = pt.paired_test(diffs)
        out.append({"method": m, "bits": b, "estimator": e, "n": len(diffs), "mean": test.mean, "p": test.p})
    adjusted = pt.holm([c["p"] for c in out]) if out else []
    for c, p_adj in zip(out, adjusted):
        c["p_holm"] = p_adj
        c["verdict"] = ("n < 2: no test" if c["n"] < 2 else
                        ("significant" if p_adj < pt.ALPHA else "not significant") + f" (Holm, alpha {pt.ALPHA})")
    return out


def reading(comps: Sequence[dict], opts: Options) -> list[str]:
    """What the paired tests say, counted from the table: per estimator the cells where its mean is
    above / below / equal to the STE's, its mean difference over cells, and the Holm verdicts."""
    if not comps:
        return []
    tested = [c for c in comps if c["n"] >= 2]
    better = [c for c in tested if c["p_holm"] < pt.ALPHA and c["mean"] > 0]
    worse = [c for c in tested if c["p_holm"] < pt.ALPHA and c["mean"] < 0]
    out = ["## Reading", "",
           f"- {len(comps)} comparisons against the STE, {len(tested)} with at least 2 seeds; after Holm's "
           f"correction {len(better)} significantly better and {len(worse)} significantly worse than the STE"
           + ("".join(f"; {c['estimator']} {c['method']} W{c['bits']}A{c['bits']} {c['mean']:+.2f} points "
                      f"(Holm p {c['p_holm']:.3g})" for c in better + worse)) + "."]
    for e in [e for e in opts.estimators if e != "ste"]:
        mine = [c for c in comps if c["estimator"] == e]
        if mine:
            up, down = sum(c["mean"] > 0 for c in mine), sum(c["mean"] < 0 for c in mine)
            out.append(f"- {e}: mean difference to the STE {statistics.mean(c['mean'] for c in mine):+.2f} points "
                       f"over {len(mine)} cells; above the STE in {up}, below in {down}, equal in "
                       f"{len(mine) - up - down}.")
    return out


def write_report(opts: Options, rows: Sequence[dict], wall_s: float) -> None:
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{opts.out}_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    groups: dict[tuple, list[float]] = {}
    descent: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], int(r["bits"]), r["estimator"]), []).append(float(r["top1"]))
        if r["descent"] != "":
            descent.setdefault(r["estimator"], []).append(float(r["descent"]))
    env = rd._environment()
    summed = sum(float(r["wall_s"]) for r in rows)
    comps = comparisons(rows)
    lines = ["# Gradient estimators on the digits (SQAKD, ResNet-20)", "",
             f"Command: `{opts.command}`; {opts.seeds} seed(s), {opts.epochs} student epoch(s), teacher "
             f"{opts.teacher_epochs} epoch(s). Wall time of the invocation that wrote this report "
             f"{rd._duration(wall_s)}; summed wall time of the student runs {rd._duration(summed)} (with "
             f"`--jobs`, runs overlap). Machine: {env['machine']}; JAX {env['jax']} on {env['devices']}; "
             f"{env['date']}. Top-1 on the 360 test images (one image = 0.28 points), mean ± std over seeds.", "",
             *reading(comps, opts), "",
             "| method | W/A | estimator | top-1 % |", "| --- | --- | --- | --- |"]
    for (m, b, e), vals in sorted(groups.items()):
        sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
        lines.append(f"| {m} | {b}/{b} | {e} | {statistics.mean(vals):.2f}{sd} |")
    lines += ["", "## Paired tests against the STE", "",
              "Per-seed differences (estimator − STE, same teacher, calibration and data order), two-sided "
              "paired t-test (where all differences are equal, the exact sign-flip p, 0.25 for three seeds: "
              "`paired_tests.paired_test`), Holm's correction over every row of this table.", "",
              "| method | W/A | estimator | n | mean diff (points) | p | p (Holm) | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in comps:
        p = "-" if c["n"] < 2 else f"{c['p']:.3g}"
        ph = "-" if c["n"] < 2 else f"{c['p_holm']:.3g}"
        lines.append(f"| {c['method']} | {c['bits']}/{c['bits']} | {c['estimator']} | {c['n']} | "
                     f"{c['mean']:+.2f} | {p} | {ph} | {c['verdict']} |")
    lines += ["", "## Descent check", "",
              "Share of (layer, step size) pairs where the estimator's normalised gradient step on one layer's "
              f"kernel (step sizes {', '.join(map(str, STEP_SIZES))}) lowers the hard-quantized cross-entropy of "
              "the final STE student on 256 training images (`qkd_jax.quant.diagnostics`), mean over the "
              "(seed, method, bits) cells.", "", "| estimator | descent share |", "| --- | --- |"]
    for e in opts.estimators:
        if e in descent:
            lines.append(f"| {e} | {statistics.mean(descent[e]):.3f} |")
    lines += ["", f"![top-1 per estimator]({opts.out.name}.png)", ""]
    pathlib.Path(f"{opts.out}.md").write_text("\n".join(lines))
    _plot(opts, groups)


def _plot(opts: Options, groups: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(opts.methods), figsize=(4 * len(opts.methods), 3.5), squeeze=False)
    for ax, m in zip(axes[0], opts.methods):
        for i, b in enumerate(opts.bits):
            means = [statistics.mean(groups.get((m, b, e), [float("nan")])) for e in opts.estimators]
            ax.bar([j + i / (len(opts.bits) + 1) for j in range(len(opts.estimators))], means,
                   width=1 / (len(opts.bits) + 1), label=f"W{b}A{b}")
        ax.set_xticks(range(len(opts.estimators)), opts.estimators, rotation=45, fontsize=8)
        ax.set_title(m)
        ax.set_ylabel("top-1 %")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{opts.out}.png", dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    opts = parse_args(argv)
    parallel.setup_jax(str(ROOT / ".cache" / "jax"))
    t0 = time.perf_counter()
    rows = run_grid(opts)
    write_report(opts, rows, time.perf_counter() - t0)
    print(f"wrote {opts.out}.md, {opts.out}_runs.csv, {opts.out}.png")


if __name__ == "__main__":
    main()
