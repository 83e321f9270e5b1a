"""The README's main job: SQAKD (no labels) vs plain QAT (labels) at W2A2 on the bundled digits.

    python -m qkd_jax.demo [--workdir=workdirs/digits_demo] [--fresh] [--config.key=value ...]

Trains the FP teacher, calibrates a W2A2 student, trains it with SQAKD (KL to the frozen
teacher only) and, from the same calibration, with plain QAT (cross-entropy), then prints the
accuracies side by side. Rerunning reads the finished phases back instead of retraining;
`--fresh` deletes the workdir first, only if it is recognisably a qkd_jax workdir (run/fresh.py).
"""

from __future__ import annotations

import pathlib
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository: qkd_jax/run/demo.py
DEFAULT_CONFIG = ROOT / "configs" / "digits_demo.py"
DEFAULT_WORKDIR = ROOT / "workdirs" / "digits_demo"
_CONFIG = config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Demo config file.", lock_config=True)
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from qkd_jax.train.paths import as_path

    workdir = as_path(_WORKDIR.value)  # local or a bucket URI (gs://bucket/digits_demo)
    if _FRESH.value:
        from qkd_jax.run.fresh import NotAWorkdirError, remove_workdir

        try:
            remove_workdir(workdir)
        except NotAWorkdirError as err:
            sys.stderr.write(f"qkd_jax.demo: {err}\n")
            sys.exit(1)
    from qkd_jax.run.loop import run

    t0 = time.perf_counter()
    results = run(_CONFIG.value, workdir)
    print(f"\nDigits demo ({len(results)} phases, {time.perf_counter() - t0:.0f} s; workdir {workdir}):")
    print(comparison_table(results, _CONFIG.value))


if __name__ == "__main__":
    app.run(main)
