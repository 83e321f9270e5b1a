"""The README's main job: SQAKD (no labels) vs plain QAT (labels) at W2A2 on the bundled digits.

    python -m qkd_jax.demo [--workdir=workdirs/digits_demo] [--fresh] [--config.key=value ...]

Trains the FP teacher, calibrates a W2A2 student, trains it with SQAKD (KL to the frozen
teacher only) and, from the same calibration, with plain QAT (cross-entropy), then prints the
accuracies side by side, and ends with the deployment: the SQAKD student exported to ONNX and
run in onnxruntime on the test split (run/demo_deploy.py; without the onnx extra, one line on how
to install it). Rerunning reads the finished phases back instead of retraining;
`--fresh` trains everything again: once the config is validated, the run's checks passed and the
workdir's lock is taken, it deletes the previous run in the workdir, only if it is recognisably a
qkd_jax workdir (run/fresh.py).

Exit codes as for `python -m qkd_jax.main`: 0 done; 1 an error the user fixes, printed as one
line without a traceback (flags, config, data, checkpoints, a workdir in use, not writable or not
a run's, a JAX_PLATFORMS this machine cannot serve); 143 (SIGTERM) or 130 (SIGINT): stopped with a
checkpoint, rerun the same command to resume.
"""

from __future__ import annotations

import pathlib
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from qkd_jax.run.flag_parsing import flags_parser

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository: qkd_jax/run/demo.py
DEFAULT_CONFIG = ROOT / "configs" / "digits_demo.py"
DEFAULT_WORKDIR = ROOT / "workdirs" / "digits_demo"
# No default value here: config_flags would parse a default file with the command line's overrides
# while this module is imported, where a typo in one is a traceback; run_cli names the file instead.
_CONFIG = config_flags.DEFINE_config_file("config", None, f"Demo config file (default: {DEFAULT_CONFIG}).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", str(DEFAULT_WORKDIR), "Output directory.")
_FRESH = flags.DEFINE_bool("fresh", False, "Delete the workdir first and train everything again.")


def comparison_table(results: dict, config) -> str:
    """FP teacher, SQAKD student and QAT student accuracies side by side."""
    q = config.quant
    rows = [
        ("FP32 teacher (labels)", results["teacher"].eval),
        (f"W{q.w_bits}A{q.a_bits} SQAKD student (no labels)", results["sqakd"].eval),
        (f"W{q.w_bits}A{q.a_bits} plain QAT student (labels)", results["qat"].eval),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'model':{width}s}  top-1 %   eval CE", "-" * (width + 20)]
    for name, ev in rows:
        lines.append(f"{name:{width}s}  {ev['top1']:7.2f}  {ev['loss']:8.4f}")
    return "\n".join(lines)


def _demo(config, workdir: str, fresh: bool) -> None:
    from qkd_jax.run.loop import run
    from qkd_jax.train.paths import as_path

    workdir = as_path(workdir)  # local or a bucket URI (gs://bucket/digits_demo)
    t0 = time.perf_counter()
    results = run(config, workdir, fresh=fresh)
    print(f"\nDigits demo ({len(results)} phases, {time.perf_counter() - t0:.0f} s; workdir {workdir}):")
    print(comparison_table(results, config))
    from qkd_jax.run.demo_deploy import deployment_report

    print("\n" + deployment_report(workdir, config, results))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from qkd_jax.run.cli_errors import run_reporting

    run_reporting("qkd_jax.demo", lambda: _demo(_CONFIG.value, _WORKDIR.value, _FRESH.value))


def with_default_config(argv: list[str]) -> list[str]:
    """`argv` with `--config=DEFAULT_CONFIG` after the program name when it names no --config."""
    if any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        return argv
    return [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]


def run_cli() -> None:
    """`python -m qkd_jax.demo` (qkd_jax/demo.py)."""
    sys.argv = with_default_config(sys.argv)  # config_flags reads the overrides from sys.argv
    app.run(main, flags_parser=flags_parser(__doc__, __name__))


if __name__ == "__main__":
    run_cli()
