"""The reproduction grid on the bundled digits: plain QAT vs SQAKD for four quantizers and three
bit widths, EWGS Hessian delta vs STE, and the QKD phases, over several seeds.

    python experiments/reproduce_digits.py --out=docs/reproduction [--seeds=3] [--epochs=12]
        [--teacher-epochs=12] [--jobs=1] [--workdirs=workdirs/reproduce] [--quick]
        [--methods=interval,pact,lsq,dorefa] [--bits=1,2,4] [--ablations=ewgs,qkd]

Writes OUT.md (tables, the command, wall time, a reading of the results), OUT.csv (one row per
setting: mean/std over seeds), OUT_runs.csv (one row per run and seed) and OUT.png (the plot).

What runs (every run is `qkd_jax.run.loop.run(config, workdir)` on a config built from
configs/digits_demo.py: ResNet-20, 16x16 digits, preset 'sqakd_cifar' = stem, BatchNorms and
classifier full precision, every residual-block conv quantized):

- per seed s: one FP teacher (`teacher` phase, cross-entropy, `--teacher-epochs`). Every
  student run of seed s loads it through `config.teacher_checkpoint`, so all runs of a seed
  start from the same teacher; different seeds train different teachers, so the std over seeds
  includes the teacher's variance.
- the grid, per (method, bits, seed): teacher (loaded) -> calibrate -> `qat` (cross-entropy with
  labels) and -> `sqakd` (alpha * KL_T(student, teacher), T = 4, no labels), both from the same
  calibration, `--epochs` each, the demo's student recipe (Adam 1e-3 + coupled L2 1e-4 for the
  weights, Adam 1e-4 for the quantizer parameters, cosine per epoch); STE (delta = 0).
- ablation 'ewgs': interval W2A2 plain QAT with the Hessian-updated EWGS delta
  (`quant.estimator='hessian'`, delta = 0 until the first refresh, refreshed every
  max(1, epochs // 3) epochs on 2 batches of `--hessian-batch-size` 32 images with at most
  `--hessian-probes` 10 Hutchinson probes each, one joint probe over all layers) vs the grid's STE
  run. QAT (cross-entropy) is
  the setting of the EWGS paper, whose delta is defined from the Hessian of the task loss. Both
  runs use the same phase order, hence the same calibration batch and the same data order.
  The probe budget is below the reference's (up to 50 probes on 3 x 256 images): on CPU one
  Hessian-vector product through ResNet-20 costs ~2.5 s per 32 images (second-order convolutions
  are slow there), so the reference budget would take ~15 min per refresh.
- ablation 'qkd': the QKD quantizer (`quant.method='qkd'`) at W2A2, T = 2: self-study ->
  co-study -> tutoring (QKD's 30/100/70 split of an equal student budget B = max(3, epochs),
  e.g. 2/6/4 for 12) vs tutoring alone (B epochs, frozen FP teacher) vs self-study alone
  (B epochs of cross-entropy). Co-studying also trains the teacher, so it costs more compute for
  the same number of student epochs.

Reported accuracy is the top-1 on the 360 test images after the last epoch (one image is
0.28 points). The grid is resumable: each run lives in WORKDIRS/<budget>/seed<s>/<run>/; a
finished run is read back from its `reproduce_result.json`, and an interrupted one resumes its
phases from their checkpoints. A workdir whose stored config differs from the requested one is
an error (delete it or pick another --workdirs) rather than silently mixed results.

`--quick` (the smoke setting): 1 seed, 1 epoch per phase, methods interval and dorefa at W2A2,
both ablations (QKD with the 1/1/1 minimum split; the Hessian run never refreshes its delta in 1
epoch), outputs under workdirs/reproduce_quick/ unless --out / --workdirs are given.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import importlib.util
import json
import logging
import math
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python experiments/reproduce_digits.py` without an installed package
    sys.path.insert(0, str(ROOT))

from experiments import parallel  # noqa: E402

METHODS = ("interval", "pact", "lsq", "dorefa")
BITS = (1, 2, 4)
ABLATIONS = ("ewgs", "qkd")
METHOD_LABEL = {"interval": "EWGS interval", "pact": "PACT", "lsq": "LSQ", "dorefa": "DoReFa", "qkd": "QKD interval"}
QKD_SPLIT = (30, 100, 70)  # QKD's CIFAR schedule (self-study, co-study, tutoring epochs)
QKD_TEMPERATURE = 2.0
ABLATION_BITS = 2

# Variants: (section, variant) -> (label, uses labels)
VARIANT_INFO = {
    ("teacher", "fp"): ("FP teacher", "yes"),
    ("grid", "qat"): ("plain QAT", "yes"),
    ("grid", "sqakd"): ("SQAKD", "no"),
    ("ewgs", "ste"): ("QAT, STE (delta = 0)", "yes"),
    ("ewgs", "hessian"): ("QAT, EWGS Hessian delta", "yes"),
    ("qkd", "qkd"): ("QKD: self-study -> co-study -> tutoring", "yes"),
    ("qkd", "tutoring_only"): ("tutoring alone", "yes"),
    ("qkd", "self_study_only"): ("self-study alone", "yes"),
}


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class Options:
    """What to run and where to write it."""

    out: pathlib.Path
    workdirs: pathlib.Path
    seeds: int = 3
    epochs: int = 12
    teacher_epochs: int = 12
    methods: tuple[str, ...] = METHODS
    bits: tuple[int, ...] = BITS
    ablations: tuple[str, ...] = ABLATIONS
    jobs: int = 1
    quick: bool = False
    command: str = ""
    hessian_batch_size: int = 32
    hessian_probes: int = 10
    report_only: bool = False
    merge_runs: Optional[pathlib.Path] = None

    @property
    def budget_dir(self) -> pathlib.Path:
        """Runs of different epoch budgets never share a workdir."""
        return self.workdirs / f"t{self.teacher_epochs}_e{self.epochs}"

    @property
    def qkd_epochs(self) -> tuple[int, int, int]:
        return qkd_split(max(3, self.epochs))


def qkd_split(budget: int) -> tuple[int, int, int]:
    """QKD's 30/100/70 split of `budget` student epochs, every phase >= 1 epoch, summing to budget."""
    if budget < 3:
        raise ValueError(f"the QKD budget must be >= 3 epochs, got {budget}")
    total = sum(QKD_SPLIT)
    ss = max(1, round(budget * QKD_SPLIT[0] / total))
    cs = max(1, round(budget * QKD_SPLIT[1] / total))
    while ss + cs > budget - 1:  # leave >= 1 epoch of tutoring
        if cs > 1:
            cs -= 1
        else:
            ss -= 1
    return ss, cs, budget - ss - cs


def _csv_list(text: str, allowed: Sequence[Any], cast=str, name: str = "") -> tuple:
    if text.strip().lower() in ("", "none"):
        return ()
    values = tuple(cast(t.strip()) for t in text.split(",") if t.strip())
    bad = [v for v in values if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"--{name}: unknown value(s) {bad}; choose from {list(allowed)}")
    return tuple(dict.fromkeys(values))


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="output prefix: OUT.md, OUT.csv, OUT_runs.csv, OUT.png (default docs/reproduction; "
                        "--quick: workdirs/reproduce_quick/reproduction)")
    p.add_argument("--workdirs", default=None,
                   help="folder of the run workdirs (default workdirs/reproduce; --quick: workdirs/reproduce_quick)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 3; --quick: 1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per student phase (default 12; --quick: 1)")
    p.add_argument("--teacher-epochs", "--teacher_epochs", type=int, default=None,
                   help="epochs of the FP teacher (default 12; --quick: 1)")
    p.add_argument("--methods", default=None, help="comma-separated, from interval,pact,lsq,dorefa "
                                                   "(default all; --quick: interval,dorefa)")
    p.add_argument("--bits", default=None, help="comma-separated W=A bit widths from 1,2,4 (default all; --quick: 2)")
    p.add_argument("--ablations", default=None, help="comma-separated from ewgs,qkd, or 'none' (default both)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--hessian-batch-size", "--hessian_batch_size", type=int, default=32,
                   help="images per Hessian batch of the EWGS run (2 batches; default 32)")
    p.add_argument("--hessian-probes", "--hessian_probes", type=int, default=10,
                   help="most Hutchinson probes per Hessian batch of the EWGS run (default 10)")
    p.add_argument("--quick", action="store_true", help="smoke setting (see the module docstring)")
    p.add_argument("--report-only", "--report_only", action="store_true",
                   help="train nothing: rewrite OUT.md, OUT.csv and OUT.png from OUT_runs.csv (and OUT_meta.json)")
    p.add_argument("--merge-runs", "--merge_runs", default=None,
                   help="with --report-only: the student rows of this OTHER_runs.csv replace those of OUT_runs.csv "
                        "with the same section, method, bits, variant and seed (a rerun of some rows)")
    a = p.parse_args(argv)
    if a.merge_runs and not a.report_only:
        p.error("--merge-runs needs --report-only")
    q = a.quick
    try:
        methods = _csv_list(a.methods if a.methods is not None else ("interval,dorefa" if q else ",".join(METHODS)),
                            METHODS, name="methods")
        bits = _csv_list(a.bits if a.bits is not None else ("2" if q else "1,2,4"), BITS, int, name="bits")
        ablations = _csv_list(a.ablations if a.ablations is not None else ",".join(ABLATIONS), ABLATIONS,
                              name="ablations")
    except (argparse.ArgumentTypeError, ValueError) as err:
        p.error(str(err))
    default_base = ROOT / "workdirs" / "reproduce_quick" if q else None
    out = a.out or str((default_base / "reproduction") if q else ROOT / "docs" / "reproduction")
    workdirs = a.workdirs or str(default_base if q else ROOT / "workdirs" / "reproduce")
    seeds = a.seeds if a.seeds is not None else (1 if q else 3)
    epochs = a.epochs if a.epochs is not None else (1 if q else 12)
    teacher_epochs = a.teacher_epochs if a.teacher_epochs is not None else (1 if q else 12)
    for name, value in (("seeds", seeds), ("epochs", epochs), ("teacher-epochs", teacher_epochs), ("jobs", a.jobs),
                        ("hessian-batch-size", a.hessian_batch_size), ("hessian-probes", a.hessian_probes)):
        if value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if not methods and not ablations:
        p.error("nothing to run: no methods and no ablations")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    return Options(
        out=pathlib.Path(out).absolute(), workdirs=pathlib.Path(workdirs).absolute(), seeds=seeds,
        epochs=epochs, teacher_epochs=teacher_epochs, methods=methods, bits=bits, ablations=ablations,
        jobs=a.jobs, quick=q, hessian_batch_size=a.hessian_batch_size, hessian_probes=a.hessian_probes,
        command=" ".join(["python", "experiments/reproduce_digits.py", *map(shlex.quote, argv_list)]),
        report_only=a.report_only, merge_runs=pathlib.Path(a.merge_runs).absolute() if a.merge_runs else None,
    )


# ----------------------------------------------------------------------------- the runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One `loop.run` call: a workdir and what its config holds."""

    kind: str  # 'teacher' | 'grid' | 'ewgs' | 'qkd'
    seed: int
    method: str = ""
    bits: int = 0

    @property
    def name(self) -> str:
        if self.kind == "teacher":
            return f"seed{self.seed}/teacher"
        tag = {"grid": "grid", "ewgs": "hessian", "qkd": "qkd"}[self.kind]
        return f"seed{self.seed}/{tag}_{self.method}_w{self.bits}a{self.bits}"


def plan(opts: Options) -> list[RunSpec]:
    """Every run, teachers first, without duplicates."""
    specs: list[RunSpec] = []
    for seed in range(opts.seeds):
        specs.append(RunSpec("teacher", seed))
    for seed in range(opts.seeds):
        for method in opts.methods:
            for bits in opts.bits:
                specs.append(RunSpec("grid", seed, method, bits))
        if "ewgs" in opts.ablations:
            specs.append(RunSpec("grid", seed, "interval", ABLATION_BITS))  # the STE counterpart
            specs.append(RunSpec("ewgs", seed, "interval", ABLATION_BITS))
        if "qkd" in opts.ablations:
            specs.append(RunSpec("qkd", seed, "qkd", ABLATION_BITS))
    return list(dict.fromkeys(specs))


def _demo_config():
    path = ROOT / "configs" / "digits_demo.py"
    spec = importlib.util.spec_from_file_location("qkd_digits_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def build_config(spec: RunSpec, opts: Options):
    """The run's ml_collections config (configs/digits_demo.py with the spec's changes)."""
    import ml_collections

    from qkd_jax.run.config_schema import phase

    c = _demo_config()
    c.seed = spec.seed
    c.tensorboard = False
    c.keep_checkpoints = 1
    c.log_every_steps = 1000
    teacher = c.phases.teacher
    teacher.epochs = opts.teacher_epochs
    teacher.eval_every_epochs = max(1, opts.teacher_epochs)
    calibrate, student = c.phases.calibrate, c.phases.qat
    if spec.kind == "teacher":
        c.phase_order = "teacher"
        c.phases = ml_collections.ConfigDict({"teacher": teacher})
        return c
    c.teacher_checkpoint = str(opts.budget_dir / RunSpec("teacher", spec.seed).name / "teacher")
    c.quant.method = spec.method
    c.quant.w_bits = spec.bits
    c.quant.a_bits = spec.bits
    c.quant.preset = "sqakd_cifar"
    c.quant.estimator = "ste"
    c.quant.delta = 0.0

    def student_phase(objective: str, epochs: int, *, init_from: str = "calibrate", teacher_from: str = "",
                      **kw):
        return phase("student", objective=objective, init_from=init_from, teacher_from=teacher_from,
                     epochs=epochs, batch_size=student.batch_size, eval_every_epochs=max(1, epochs),
                     weights=student.weights.copy_and_resolve_references(),
                     quant_params=student.quant_params.copy_and_resolve_references(), **kw)

    e = opts.epochs
    if spec.kind == "grid":
        # qat is phase 2 in both this run and the Hessian run: same data order and rng.
        phases = [("qat", student_phase("task", e)),
                  ("sqakd", student_phase("sqakd", e, teacher_from="teacher", alpha=1.0, temperature=4.0))]
    elif spec.kind == "ewgs":
        c.quant.estimator = "hessian"
        c.quant.hessian_every_epochs = max(1, e // 3)
        c.quant.hessian_batches = 2
        c.quant.hessian_batch_size = opts.hessian_batch_size
        c.quant.hessian_max_probes = opts.hessian_probes
        # One joint probe over all layers (docs/method.md section 5), the setting docs/reproduction.md
        # reports; the released per-layer probe costs one Hessian-vector product per layer and probe.
        c.quant.hessian_probe = "joint"
        c.quant.hessian_loss = "phase"  # = the cross-entropy here (plain QAT)
        phases = [("qat", student_phase("task", e))]
    elif spec.kind == "qkd":
        ss, cs, tu = opts.qkd_epochs
        budget = ss + cs + tu
        t = dict(temperature=QKD_TEMPERATURE)
        phases = [
            ("self_study", student_phase("self_study", ss)),
            ("co_study", student_phase("co_study", cs, init_from="self_study", teacher_from="teacher",
                                       train_teacher=True,
                                       teacher_opt=student.weights.copy_and_resolve_references(), **t)),
            ("tutoring", student_phase("tutoring", tu, init_from="co_study", teacher_from="co_study", **t)),
            ("tutoring_only", student_phase("tutoring", budget, teacher_from="teacher", **t)),
            ("self_study_only", student_phase("self_study", budget)),
        ]
    else:
        raise ValueError(spec.kind)
    c.phase_order = ",".join(["teacher", "calibrate"] + [n for n, _ in phases])
    c.phases = ml_collections.ConfigDict({"teacher": teacher, "calibrate": calibrate, **dict(phases)})
    return c


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


@contextlib.contextmanager
def _quiet(log_path: pathlib.Path):
    """Sends the runner's prints and Python logging of one run to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    old_level, old_handlers = root.level, root.handlers[:]
    with open(log_path, "a", encoding="utf-8") as f:
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        # Console handlers (absl's included) would still print to the terminal: only ours while the run is on.
        root.handlers = [handler]
        root.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                f.write(f"\n===== {datetime.datetime.now().isoformat(timespec='seconds')}\n")
                f.flush()
                yield
        finally:
            root.handlers = old_handlers
            root.setLevel(old_level)


class ConfigMismatchError(RuntimeError):
    """A workdir holds runs of a different config."""


def execute(spec: RunSpec, opts: Options) -> dict:
    """Runs (or reads back) one run; returns {'spec', 'phases': {name: eval}, 'wall_s', 'reused', 'deltas'}."""
    config = build_config(spec, opts)
    wanted = _config_dict(config)
    workdir = opts.budget_dir / spec.name
    result_file = workdir / "reproduce_result.json"
    if result_file.exists():
        stored = json.loads(result_file.read_text())
        if stored.get("config") == wanted:
            return {**stored, "reused": True}
    results, wall = train(config, workdir, wanted)
    record = {
        "spec": dataclasses.asdict(spec),
        "phases": {name: dict(res.eval) for name, res in results.items()},
        "wall_s": wall,
        "deltas": _hessian_deltas(workdir) if spec.kind == "ewgs" else [],
        "config": wanted,
    }
    result_file.write_text(json.dumps(record, indent=1))
    return {**record, "reused": False}


def train(config, workdir: pathlib.Path, wanted: dict) -> tuple[dict, float]:
    """`qkd_jax.run.loop.run(config, workdir)` with its output in workdir/run.log, refusing a workdir
    that holds a run of another config (`wanted`: the config as JSON); (results, wall seconds)."""
    old_config = workdir / "config.json"
    if old_config.exists():
        differ = _differences(json.loads(old_config.read_text()), wanted)
        if differ:
            raise ConfigMismatchError(
                f"{workdir} holds a run of a different config (differs at {', '.join(differ[:5])}"
                f"{', ...' if len(differ) > 5 else ''}); delete that folder or choose another --workdirs")
    from qkd_jax.run.loop import run

    t0 = time.perf_counter()
    with _quiet(workdir / "run.log"):
        results = run(config, workdir)
    return results, time.perf_counter() - t0


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "<root>"]


def _hessian_deltas(workdir: pathlib.Path) -> list[dict]:
    """The EWGS delta refreshes recorded in the run's metrics (mean and max over layers)."""
    out = []
    path = workdir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "ewgs_delta":
                out.append({"step": rec["step"], "mean": rec.get("mean"), "max": rec.get("max")})
    return out


def _summary_line(spec: RunSpec, rec: dict) -> str:
    accs = ", ".join(f"{name} {ev['top1']:.1f}" for name, ev in rec["phases"].items()
                     if name not in ("calibrate",) and "top1" in ev)
    how = "reused" if rec["reused"] else f"{rec['wall_s']:.0f} s"
    return f"{spec.name}: {accs} ({how})"


def run_all(opts: Options, specs: Sequence[RunSpec], log=print) -> dict[RunSpec, dict]:
    """Runs the specs (teachers first); `opts.jobs > 1` uses that many worker processes."""
    records: dict[RunSpec, dict] = {}
    teachers = [s for s in specs if s.kind == "teacher"]
    others = [s for s in specs if s.kind != "teacher"]
    n, done = len(specs), 0

    def report(spec, rec):
        nonlocal done
        done += 1
        records[spec] = rec
        log(f"[{done}/{n}] {_summary_line(spec, rec)}")

    parallel.run_stages(execute, (teachers, others), opts, opts.jobs, report, str(ROOT / ".cache" / "jax"))
    return records


# ----------------------------------------------------------------------------- tables


@dataclasses.dataclass
class Row:
    section: str
    method: str
    bits: int
    variant: str
    values: list[float]  # top-1 per seed, in seed order
    seeds: list[int]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (ddof = 1); NaN with one seed."""
        return statistics.stdev(self.values) if self.n > 1 else math.nan

    @property
    def label(self) -> str:
        return VARIANT_INFO[(self.section, self.variant)][0]

    @property
    def labels_used(self) -> str:
        return VARIANT_INFO[(self.section, self.variant)][1]


def collect(opts: Options, records: dict[RunSpec, dict]) -> tuple[list[Row], list[dict]]:
    """Aggregated rows (mean/std over seeds) and one raw dict per (run, phase of interest, seed)."""
    raw: list[dict] = []

    def add(section, method, bits, variant, seed, ev, wall):
        raw.append(dict(section=section, method=method, bits=bits, variant=variant, seed=seed,
                        top1=ev["top1"], top5=ev.get("top5", math.nan), loss=ev.get("loss", math.nan),
                        run_wall_s=wall))

    for spec, rec in sorted(records.items(), key=lambda kv: (kv[0].seed, kv[0].kind, kv[0].method, kv[0].bits)):
        ph, wall = rec["phases"], rec["wall_s"]
        if spec.kind == "teacher":
            add("teacher", "fp", 32, "fp", spec.seed, ph["teacher"], wall)
        elif spec.kind == "grid":
            if spec.method in opts.methods and spec.bits in opts.bits:
                for v in ("qat", "sqakd"):
                    add("grid", spec.method, spec.bits, v, spec.seed, ph[v], wall)
            if "ewgs" in opts.ablations and spec.method == "interval" and spec.bits == ABLATION_BITS:
                add("ewgs", spec.method, spec.bits, "ste", spec.seed, ph["qat"], wall)
        elif spec.kind == "ewgs":
            add("ewgs", spec.method, spec.bits, "hessian", spec.seed, ph["qat"], wall)
        elif spec.kind == "qkd":
            add("qkd", spec.method, spec.bits, "qkd", spec.seed, ph["tutoring"], wall)
            add("qkd", spec.method, spec.bits, "tutoring_only", spec.seed, ph["tutoring_only"], wall)
            add("qkd", spec.method, spec.bits, "self_study_only", spec.seed, ph["self_study_only"], wall)
    return group_rows(raw), raw


def group_rows(raw: Sequence[dict]) -> list[Row]:
    """Per-run dicts (collect's, or OUT_runs.csv's rows) grouped into one Row per setting."""
    section_order = {"teacher": 0, "grid": 1, "ewgs": 2, "qkd": 3}
    variant_order = {v: i for i, (_, v) in enumerate(VARIANT_INFO)}
    method_order = {m: i for i, m in enumerate(METHODS + ("qkd",))}
    groups: dict[tuple, Row] = {}
    for r in sorted(raw, key=lambda r: r["seed"]):
        key = (r["section"], r["method"], r["bits"], r["variant"])
        row = groups.setdefault(key, Row(*key, values=[], seeds=[]))
        row.values.append(r["top1"])
        row.seeds.append(r["seed"])
    return sorted(groups.values(), key=lambda r: (section_order[r.section], method_order.get(r.method, -1),
                                                  r.bits, variant_order[r.variant]))


CSV_COLUMNS = ("section", "method", "bits", "variant", "description", "labels", "n_seeds", "mean_top1",
               "std_top1", "min_top1", "max_top1", "top1_per_seed")
RUNS_COLUMNS = ("section", "method", "bits", "variant", "seed", "top1", "top5", "loss", "run_wall_s")


def _fmt(x: float, nd: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def write_csv(path: pathlib.Path, rows: Sequence[Row]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([r.section, r.method, r.bits, r.variant, r.label, r.labels_used, r.n, _fmt(r.mean),
                        _fmt(r.std), _fmt(min(r.values)), _fmt(max(r.values)),
                        ";".join(f"{v:.2f}" for v in r.values)])


def write_runs_csv(path: pathlib.Path, raw: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=RUNS_COLUMNS)
        w.writeheader()
        for r in raw:
            w.writerow({k: (_fmt(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


def read_runs_csv(path: pathlib.Path) -> list[dict]:
    """OUT_runs.csv back as the per-run dicts `collect` makes (numbers as numbers)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{**r, "bits": int(r["bits"]), "seed": int(r["seed"]),
                 **{k: float(r[k]) if r[k] != "" else math.nan for k in ("top1", "top5", "loss", "run_wall_s")}}
                for r in csv.DictReader(f)]


def _run_key(r: dict) -> tuple:
    return r["section"], r["method"], r["bits"], r["variant"], r["seed"]


def merge_runs(base: Sequence[dict], other: Sequence[dict]) -> tuple[list[dict], list[str], list[dict]]:
    """`base` with its student rows replaced by `other`'s of the same setting and seed.

    Returns (merged rows, the sections replaced, other's teacher rows). Teacher rows are not
    merged (the report's FP teacher stays base's); other's are returned for the note. Raises
    ValueError when `other` holds a student row that `base` lacks (a merge never adds settings)."""
    replacement = {_run_key(r): r for r in other if r["section"] != "teacher"}
    missing = sorted(set(replacement) - {_run_key(r) for r in base})
    if missing:
        raise ValueError(f"--merge-runs: rows not in the report: {missing[:3]}")
    merged = [replacement.get(_run_key(r), r) for r in base]
    sections = sorted({k[0] for k in replacement})
    return merged, sections, [r for r in other if r["section"] == "teacher"]


def meta_path(out: pathlib.Path) -> pathlib.Path:
    return out.with_name(out.name + "_meta.json")


def read_meta(out: pathlib.Path) -> dict:
    """OUT_meta.json: what the tables cannot carry (the training command, machine, wall times,
    the EWGS deltas, notes on merged reruns); {} when absent."""
    path = meta_path(out)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _pm(row: Optional[Row]) -> str:
    if row is None:
        return "-"
    return f"{row.mean:.2f}" if row.n < 2 else f"{row.mean:.2f} ± {row.std:.2f}"


def _find(rows: Sequence[Row], section: str, method: str, bits: int, variant: str) -> Optional[Row]:
    for r in rows:
        if (r.section, r.method, r.bits, r.variant) == (section, method, bits, variant):
            return r
    return None


def _diff(a: Row, b: Row) -> tuple[float, float]:
    """(mean of a - mean of b, its standard error over seeds; NaN with one seed).

    Seeds are paired (same teacher, calibration and data order), so the SE is that of the
    per-seed differences."""
    pairs = [x - y for x, y in zip(a.values, b.values)]
    mean = statistics.fmean(pairs)
    se = statistics.stdev(pairs) / math.sqrt(len(pairs)) if len(pairs) > 1 else math.nan
    return mean, se


TABLE_VERDICT = {"better": "SQAKD better", "worse": "QAT better"}
NOT_SIGNIFICANT = "not significant"


def _verdict(d: float, se: float, n: int) -> str:
    """One two-sided paired t-test over the n seeds at p < 0.05 (a single test: no correction)."""
    from experiments.paired_tests import ALPHA

    p = _p_value(d, se, n)
    if math.isnan(p):
        return "n/a (1 seed)"
    if p >= ALPHA:
        return NOT_SIGNIFICANT
    return "better" if d > 0 else "worse"


def _p_value(d: float, se: float, n: int) -> float:
    """Two-sided paired t-test p over the n seeds (experiments/paired_tests.py); NaN with one seed."""
    from experiments.paired_tests import t_two_sided_p

    if math.isnan(se):
        return math.nan
    t = (0.0 if d == 0 else math.copysign(math.inf, d)) if se == 0 else d / se
    return t_two_sided_p(t, n - 1)


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.4f}"


@dataclasses.dataclass(frozen=True)
class Comparison:
    """SQAKD vs plain QAT at one (method, bits): Δ, its SE, the raw and the Holm-adjusted p."""

    method: str
    bits: int
    d: float
    se: float
    p: float
    p_holm: float
    qat: Row
    sqakd: Row

    @property
    def verdict(self) -> str:
        """From the Holm-adjusted p (family-wise error over the grid's settings)."""
        from experiments.paired_tests import ALPHA

        if math.isnan(self.p_holm):
            return "n/a (1 seed)"
        if self.p_holm >= ALPHA:
            return NOT_SIGNIFICANT
        return "better" if self.d > 0 else "worse"


def grid_comparisons(opts: Options, rows: Sequence[Row]) -> list[Comparison]:
    """Every (method, bits) of the grid with both arms, Holm's correction over all of them."""
    from experiments.paired_tests import holm

    found = []
    for method in opts.methods:
        for bits in opts.bits:
            qat, sq = _find(rows, "grid", method, bits, "qat"), _find(rows, "grid", method, bits, "sqakd")
            if qat and sq:
                d, se = _diff(sq, qat)
                found.append((method, bits, d, se, _p_value(d, se, sq.n), qat, sq))
    adjusted = holm([f[4] for f in found])
    return [Comparison(m, b, d, se, p, ph, q, sq) for (m, b, d, se, p, q, sq), ph in zip(found, adjusted)]


def _delta_summary(records: dict[RunSpec, dict]) -> str:
    """'epoch e: mean m, max x' per Hessian refresh, averaged over the seeds' EWGS runs."""
    by_step: dict[int, list[dict]] = {}
    for spec, rec in records.items():
        if spec.kind == "ewgs":
            for d in rec.get("deltas", []):
                by_step.setdefault(d["step"], []).append(d)
    if not by_step:
        return ""
    parts = [f"step {step}: mean {statistics.fmean(d['mean'] for d in ds):.3g}, "
             f"max {statistics.fmean(d['max'] for d in ds):.3g}" for step, ds in sorted(by_step.items())]
    return "; ".join(parts)


def provenance(opts: Options, wall_s: float, compute_s: float, env: dict) -> list[str]:
    """The header lines on where the numbers come from (a training invocation)."""
    return [f"- wall time of this invocation: {_duration(wall_s)}; summed wall time of all runs (including "
            f"runs finished by earlier invocations and read back): {_duration(compute_s)}",
            f"- machine: {env['machine']}; JAX {env['jax']} on {env['devices']}",
            f"- date: {env['date']}"]


def markdown(opts: Options, rows: Sequence[Row], header: Sequence[str], deltas: str = "",
             command: str = "") -> str:
    """OUT.md. `header`: the provenance lines; `command`: the training command (default opts.command)."""
    title = "Reproduction on the bundled digits" + (" (--quick smoke setting: not a result)" if opts.quick else "")
    out = [f"# {title}", ""]
    out += [
        "Generated by `experiments/reproduce_digits.py`; regenerate with",
        "",
        "```",
        command or opts.command or "python experiments/reproduce_digits.py --out=docs/reproduction",
        "```",
        "",
        *header,
        f"- seeds: {opts.seeds} (0..{opts.seeds - 1}); FP teacher {opts.teacher_epochs} epochs, "
        f"each student phase {opts.epochs} epochs; ResNet-20, 16x16 digits (1437 train / 360 test), "
        f"preset `sqakd_cifar` (stem, BatchNorms and classifier full precision).",
        "- accuracy: top-1 (%) on the 360 test images after the last epoch (1 image = 0.28 points); "
        "mean ± sample std over seeds.",
        "- one FP teacher per seed, loaded through `config.teacher_checkpoint` by every student run of that "
        "seed; QAT and SQAKD of a (method, bits, seed) start from the same calibration.",
        "",
    ]
    teacher = _find(rows, "teacher", "fp", 32, "fp")
    if teacher:
        out += ["## FP teacher", "", f"FP32 ResNet-20 teacher (cross-entropy): **{_pm(teacher)}** "
                f"(per seed: {', '.join(f'{v:.2f}' for v in teacher.values)})", ""]
    comparisons = grid_comparisons(opts, rows)
    if comparisons:
        out += ["## Plain QAT (labels) vs SQAKD (no labels)", "",
                "| method | W/A bits | plain QAT (labels) | SQAKD (no labels) | Δ SQAKD − QAT | SQAKD > QAT (seeds) "
                "| p | Holm p | verdict (Holm) |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in comparisons:
            se_txt = "" if math.isnan(c.se) else f" ± {c.se:.2f}"
            wins = sum(s > q for s, q in zip(c.sqakd.values, c.qat.values))
            out.append(f"| {METHOD_LABEL[c.method]} | W{c.bits}A{c.bits} | {_pm(c.qat)} | {_pm(c.sqakd)} | "
                       f"{c.d:+.2f}{se_txt} | {wins}/{c.sqakd.n} | {_p(c.p)} | {_p(c.p_holm)} | "
                       f"{TABLE_VERDICT.get(c.verdict, c.verdict)} |")
        out += ["", "Δ is the mean of the per-seed differences ± its standard error; p is the two-sided paired "
                "t-test over seeds (with 3 seeds p < 0.05 needs |Δ| above about 4.3 standard errors), Holm p "
                f"its Holm-adjusted value over the {len(comparisons)} settings of this table (family-wise error); "
                "the verdict is significant when the Holm p < 0.05. `python experiments/paired_tests.py` "
                "recomputes both from the correct-image counts.", ""]
    ewgs = (_find(rows, "ewgs", "interval", ABLATION_BITS, "ste"), _find(rows, "ewgs", "interval", ABLATION_BITS, "hessian"))
    if all(ewgs):
        d, se = _diff(ewgs[1], ewgs[0])
        se_txt = "" if math.isnan(se) else f" ± {se:.2f}"
        out += [f"## EWGS: Hessian-updated delta vs STE (interval W{ABLATION_BITS}A{ABLATION_BITS}, plain QAT)", "",
                "| estimator | top-1 % |", "| --- | --- |",
                f"| STE (delta = 0) | {_pm(ewgs[0])} |",
                f"| EWGS, delta from the Hessian trace (refreshed every {max(1, opts.epochs // 3)} epochs on 2 x "
                f"{opts.hessian_batch_size} images, <= {opts.hessian_probes} probes each, one joint probe over all "
                f"layers; 0 before) | {_pm(ewgs[1])} |",
                "", f"Δ Hessian − STE: {d:+.2f}{se_txt} points ({_verdict(d, se, ewgs[0].n)}).", ""]
        out += [f"EWGS delta over the layers at each refresh (averaged over seeds): {deltas}." if deltas else
                "The Hessian run never refreshed its delta (too few epochs): it equals the STE run.", ""]
    qkd_rows = [_find(rows, "qkd", "qkd", ABLATION_BITS, v) for v in ("qkd", "tutoring_only", "self_study_only")]
    if all(qkd_rows):
        ss, cs, tu = opts.qkd_epochs
        b = ss + cs + tu
        out += [f"## QKD phases (QKD quantizer, W{ABLATION_BITS}A{ABLATION_BITS}, T = 2; {b} student epochs each)", "",
                "| schedule | student epochs | top-1 % |", "| --- | --- | --- |",
                f"| self-study -> co-study -> tutoring | {ss} + {cs} + {tu} | {_pm(qkd_rows[0])} |",
                f"| tutoring alone (frozen FP teacher) | {b} | {_pm(qkd_rows[1])} |",
                f"| self-study alone (cross-entropy) | {b} | {_pm(qkd_rows[2])} |",
                "", "Co-studying also trains the teacher (its forward and backward pass), so the three-phase "
                "schedule uses more compute for the same student epochs.", ""]
    out += ["## Plot", "", f"![accuracy per method and bit width]({opts.out.name}.png)", "",
            "Bars: mean top-1 over seeds, error bars one sample std; dashed line: FP teacher mean.", ""]
    out += ["## Reading", ""] + reading(opts, rows, comparisons, ewgs, qkd_rows, deltas) + [""]
    return "\n".join(out)


def reading(opts, rows, comparisons, ewgs, qkd_rows, deltas: str = "") -> list[str]:
    """Plain statements derived from the numbers (no claims the numbers do not carry)."""
    lines = []
    if opts.quick:
        lines.append(f"- This is the --quick smoke setting ({opts.epochs} student epoch(s) per phase, {opts.seeds} "
                     f"seed(s)): the numbers only show that the pipeline runs; they say nothing about the methods.")

    def names(cs):
        return ", ".join(f"{METHOD_LABEL[c.method]} W{c.bits}A{c.bits} ({c.d:+.2f})" for c in cs)

    if comparisons:
        # Equal correct-image sums: one image in the sum over n seeds moves the mean Δ by 100 / (360 n)
        # points (>= 0.09 for n <= 3), far above this bound and above the CSV's 4-decimal rounding.
        tie = 0.01
        higher = [c for c in comparisons if c.d > tie]
        ties = [c for c in comparisons if abs(c.d) <= tie]
        better = [c for c in comparisons if c.verdict == "better"]
        worse = [c for c in comparisons if c.verdict == "worse"]
        noise = [c for c in comparisons if c.verdict == NOT_SIGNIFICANT]
        raw = [c for c in comparisons if not math.isnan(c.p) and c.p < 0.05]
        text = (f"- SQAKD, which never reads a label, has the higher mean in {len(higher)} of "
                f"{len(comparisons)} settings")
        if ties:
            tied = ", ".join(f"{METHOD_LABEL[c.method]} W{c.bits}A{c.bits}" for c in ties)
            text += f", and the same number of correct test images over the seeds in {len(ties)} ({tied})"
        if opts.seeds > 1:
            text += (f"; by a two-sided paired t-test over seeds with Holm's correction over the "
                     f"{len(comparisons)} settings (adjusted p < 0.05) it is better in {len(better)}, "
                     f"worse in {len(worse)}, and not significantly different in {len(noise)}")
        else:
            text += " (one seed: no noise estimate, so no verdicts)"
        lines.append(text + ".")
        if opts.seeds > 1:
            lines.append("- Raw p < 0.05 before the correction: "
                         + (", ".join(f"{METHOD_LABEL[c.method]} W{c.bits}A{c.bits} (p = {c.p:.4f}, Holm "
                                      f"{c.p_holm:.4f})" for c in raw) if raw else "none") + ".")

        lower = [c for c in comparisons if c.d < -tie]
        if better:
            lines.append(f"- SQAKD better than plain QAT (Holm-adjusted p < 0.05): {names(better)}.")
        if worse:
            lines.append(f"- SQAKD worse than plain QAT (Holm-adjusted p < 0.05): {names(worse)}.")
        if lower:
            lines.append(f"- SQAKD's mean is lower than plain QAT's at: {names(lower)}.")
        if noise:
            lines.append(f"- Not significant (no winner shown): {names(noise)}.")
        for bits in opts.bits:
            ds = [c.d for c in comparisons if c.bits == bits]
            if ds:
                lines.append(f"- W{bits}A{bits}: mean Δ SQAKD − QAT over methods {statistics.fmean(ds):+.2f} points.")
        for method in opts.methods:
            ds = [c.d for c in comparisons if c.method == method]
            if ds:
                lines.append(f"- {METHOD_LABEL[method]}: mean Δ over bit widths {statistics.fmean(ds):+.2f} points.")
        teacher = _find(rows, "teacher", "fp", 32, "fp")
        if teacher:
            best = max(comparisons, key=lambda c: max(c.qat.mean, c.sqakd.mean))
            top = max(best.qat.mean, best.sqakd.mean)
            lines.append(f"- The FP teacher reaches {teacher.mean:.2f}; the best quantized student "
                         f"({METHOD_LABEL[best.method]} W{best.bits}A{best.bits}) {top:.2f}.")
    if all(ewgs):
        d, se = _diff(ewgs[1], ewgs[0])
        lines.append(f"- EWGS Hessian delta vs STE (interval W{ABLATION_BITS}A{ABLATION_BITS} QAT): {d:+.2f} points "
                     f"({_verdict(d, se, ewgs[0].n)})"
                     + (f"; the deltas it chose ({deltas}) scale the gradient by at most 1 ± max delta / "
                        f"{2 * (2 ** ABLATION_BITS - 1)}, so a small effect is expected." if deltas else "."))
    if all(qkd_rows):
        order = sorted(qkd_rows, key=lambda r: -r.mean)
        lines.append("- QKD schedules, best first: " + "; ".join(f"{r.label} {r.mean:.2f}" for r in order) + ".")
    lines.append("- Caveats: a 1437-image training set, short schedules and the accuracy after the last epoch; "
                 "the digits are a smoke-scale stand-in for CIFAR, not the papers' benchmarks, so differences "
                 "of a point or two are within what seeds and the schedule change.")
    return lines


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def plot(path: pathlib.Path, opts: Options, rows: Sequence[Row]) -> None:
    """Bars per method and bit width (QAT vs SQAKD, error bars = std), plus the ablation panels."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("grid", m) for m in opts.methods]
    if all(_find(rows, "ewgs", "interval", ABLATION_BITS, v) for v in ("ste", "hessian")):
        panels.append(("ewgs", "interval"))
    if all(_find(rows, "qkd", "qkd", ABLATION_BITS, v) for v in ("qkd", "tutoring_only", "self_study_only")):
        panels.append(("qkd", "qkd"))
    ncols = min(3, max(1, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.6 * ncols, 8.0), 3.8 * nrows + 0.8), squeeze=False)
    teacher = _find(rows, "teacher", "fp", 32, "fp")

    def bar(ax, x, row, color, label):
        if row is None:
            return
        err = None if row.n < 2 else row.std
        ax.bar(x, row.mean, width=0.38, yerr=err, capsize=3, color=color, label=label)

    for ax, (section, method) in zip(axes.flat, panels):
        if section == "grid":
            xs = np.arange(len(opts.bits))
            for i, bits in enumerate(opts.bits):
                bar(ax, xs[i] - 0.2, _find(rows, "grid", method, bits, "qat"), "tab:gray",
                    "plain QAT (labels)" if i == 0 else None)
                bar(ax, xs[i] + 0.2, _find(rows, "grid", method, bits, "sqakd"), "tab:blue",
                    "SQAKD (no labels)" if i == 0 else None)
            ax.set_xticks(xs, [f"W{b}A{b}" for b in opts.bits])
            ax.set_title(METHOD_LABEL[method])
        else:
            variants = ("ste", "hessian") if section == "ewgs" else ("qkd", "tutoring_only", "self_study_only")
            ticks = {"ste": "STE", "hessian": "Hessian δ", "qkd": "SS→CS→TU", "tutoring_only": "TU only",
                     "self_study_only": "SS only"}
            colors = ("tab:gray", "tab:orange", "tab:green")
            for i, v in enumerate(variants):
                bar(ax, i, _find(rows, section, method, ABLATION_BITS, v), colors[i], None)
            ax.set_xticks(range(len(variants)), [ticks[v] for v in variants])
            ax.set_title(f"EWGS delta, interval W{ABLATION_BITS}A{ABLATION_BITS} QAT" if section == "ewgs"
                         else f"QKD phases, W{ABLATION_BITS}A{ABLATION_BITS}")
        if teacher is not None:
            ax.axhline(teacher.mean, color="k", linestyle="--", linewidth=1,
                       label="FP teacher" if (section, method) == panels[0] else None)
        ax.set_ylim(0, 100)
        ax.set_ylabel("top-1 %")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(f"Digits, ResNet-20: {opts.seeds} seed(s), {opts.epochs} student epochs"
                 + (" (--quick smoke setting)" if opts.quick else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _environment() -> dict:
    import jax

    devices = jax.devices()
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "jax": jax.__version__,
        "devices": f"{len(devices)} x {devices[0].device_kind}" if devices else "no device",
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def _paths(out: pathlib.Path) -> dict[str, pathlib.Path]:
    return {"md": out.with_name(out.name + ".md"), "csv": out.with_name(out.name + ".csv"),
            "runs_csv": out.with_name(out.name + "_runs.csv"), "png": out.with_name(out.name + ".png"),
            "meta": meta_path(out)}


def _write_report(opts: Options, rows: Sequence[Row], paths: dict[str, pathlib.Path], header: Sequence[str],
                  deltas: str, command: str = "") -> None:
    """OUT.csv, OUT.png and OUT.md from the grouped rows."""
    write_csv(paths["csv"], rows)
    plot(paths["png"], opts, rows)
    paths["md"].write_text(markdown(opts, rows, header, deltas, command), encoding="utf-8")


def write_outputs(opts: Options, records: dict[RunSpec, dict], wall_s: float) -> dict[str, pathlib.Path]:
    rows, raw = collect(opts, records)
    compute_s = sum(rec["wall_s"] for rec in records.values())
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    paths = _paths(opts.out)
    env = _environment()
    deltas = _delta_summary(records)
    write_runs_csv(paths["runs_csv"], raw)
    header = provenance(opts, wall_s, compute_s, env)
    paths["meta"].write_text(json.dumps({"command": opts.command, "header": header, "deltas": deltas, "notes": []},
                                        indent=1) + "\n", encoding="utf-8")
    _write_report(opts, rows, paths, header, deltas)
    return paths


def report_only(opts: Options, log=print) -> dict[str, pathlib.Path]:
    """Rewrites OUT.md, OUT.csv and OUT.png from OUT_runs.csv and OUT_meta.json: no training.

    With `opts.merge_runs`, that file's student rows first replace the matching rows of
    OUT_runs.csv (which is rewritten), and OUT_meta.json gains a note naming the rerun."""
    paths = _paths(opts.out)
    if not paths["runs_csv"].exists():
        raise FileNotFoundError(f"--report-only: {paths['runs_csv']} does not exist (run the grid first)")
    meta = read_meta(opts.out)
    meta.setdefault("notes", [])
    raw = read_runs_csv(paths["runs_csv"])
    if opts.merge_runs is not None:
        other = opts.merge_runs
        raw, sections, teachers = merge_runs(raw, read_runs_csv(other))
        other_meta = read_meta(other.with_name(other.name[:-len("_runs.csv")]))
        teacher_txt = ", ".join(f"{r['top1']:.2f}" for r in sorted(teachers, key=lambda r: r["seed"]))
        note = (f"- rows of section(s) {', '.join(sections)} rerun with newer code"
                + (f" (`{other_meta['command']}`; {'; '.join(h.lstrip('- ') for h in other_meta.get('header', []))})"
                   if other_meta.get("command") else "")
                + (f"; those runs trained their own FP teachers (top-1 per seed: {teacher_txt}), the FP teacher "
                   f"row above is the original runs'" if teachers else "") + ".")
        meta["notes"].append(note)
        write_runs_csv(paths["runs_csv"], raw)
        paths["meta"].write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    rows = group_rows(raw)
    env = _environment()
    header = list(meta.get("header", [])) + list(meta["notes"]) + [
        f"- tables regenerated from `{paths['runs_csv'].name}` without training (`--report-only`), {env['date']}"]
    _write_report(opts, rows, paths, header, meta.get("deltas", ""), meta.get("command", ""))
    log("wrote " + ", ".join(str(paths[k]) for k in ("md", "csv", "png")))
    return paths


def reproduce(opts: Options, log=print) -> dict[str, pathlib.Path]:
    """Runs the grid (reusing finished runs) and writes the outputs; returns their paths."""
    t0 = time.perf_counter()
    specs = plan(opts)
    log(f"{len(specs)} runs under {opts.budget_dir} (logs: <run>/run.log)")
    records = run_all(opts, specs, log=log)
    paths = write_outputs(opts, records, time.perf_counter() - t0)
    log(f"wall time {_duration(time.perf_counter() - t0)}; wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    opts = parse_args(argv)
    parallel.setup_jax(str(ROOT / ".cache" / "jax"))
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        report_only(opts) if opts.report_only else reproduce(opts)
    except ConfigMismatchError as err:
        sys.exit(f"error: {err}")
    except (FileNotFoundError, ValueError) as err:  # --report-only: a missing or mismatched CSV
        if not opts.report_only:
            raise
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
