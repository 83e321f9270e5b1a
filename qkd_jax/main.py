"""Command line: python -m qkd_jax.main --config=configs/X.py[:ARG] --workdir=DIR [--config.key=value ...]

Multi-host (TPU pods, SLURM, several processes): set QKD_DISTRIBUTED=1 (or run where
`jax.distributed` detects the cluster) and start the same command on every host.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

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
    from qkd_jax.train.loop import run

    run(_CONFIG.value, _WORKDIR.value)


def run_cli() -> None:
    """Console-script entry point (`qkd-jax`)."""
    app.run(main)


if __name__ == "__main__":
    run_cli()
