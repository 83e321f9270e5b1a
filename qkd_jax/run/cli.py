"""Command line (`qkd-jax`, `python -m qkd_jax.main`).

    python -m qkd_jax.main --config=FILE[:ARG] --workdir=DIR [--config.KEY=VALUE ...]

--config=FILE[:ARG]   an ml_collections config file (configs/*.py); ARG, after a colon, is
                      passed to its get_config(ARG), e.g. --config=configs/cifar10_resnet20.py:sqakd,w2a2
--workdir=DIR         checkpoints, metrics.jsonl, summary.json; rerunning resumes there
--config.KEY=VALUE    overrides one config field, e.g. --config.phases.teacher.epochs=2
                      or --config.retrain_from=sqakd (delete that phase and later ones, retrain)

Exit codes: 0 done; 1 an error the user fixes, printed as one line without a traceback (flags,
config, data, checkpoints, a workdir in use, not writable or full, a JAX_PLATFORMS this machine
cannot serve: run/cli_errors.py); 143 (SIGTERM) or 130 (SIGINT): stopped at a step boundary
with a checkpoint, rerun the same command to resume.

Multi-host (TPU pods, SLURM, several processes): set QKD_DISTRIBUTED=1 (or run where
`jax.distributed` detects the cluster) and start the same command on every host.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from qkd_jax.run.flag_parsing import flags_parser

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if os.environ.get("QKD_DISTRIBUTED") == "1":
        from qkd_jax.train.distributed import initialize_distributed

        initialize_distributed()
    from qkd_jax.run.cli_errors import run_reporting
    from qkd_jax.run.loop import run

    run_reporting("qkd_jax", lambda: run(_CONFIG.value, _WORKDIR.value))


def run_cli() -> None:
    """Console-script entry point (`qkd-jax`)."""
    app.run(main, flags_parser=flags_parser(__doc__, __name__))


if __name__ == "__main__":
    run_cli()
