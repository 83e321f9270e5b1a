"""Command line (`qkd-jax`, `python -m qkd_jax.main`).

    python -m qkd_jax.main --config=FILE[:ARG] --workdir=DIR [--config.KEY=VALUE ...]

--config=FILE[:ARG]   an ml_collections config file (configs/*.py); ARG, after a colon, is
                      passed to its get_config(ARG), e.g. --config=configs/cifar10_resnet20.py:sqakd,w2a2
--workdir=DIR         checkpoints, metrics.jsonl, summary.json; rerunning resumes there
--config.KEY=VALUE    overrides one config field, e.g. --config.phases.teacher.epochs=2
                      or --config.retrain_from=sqakd (delete that phase and later ones, retrain)

Multi-host (TPU pods, SLURM, several processes): set QKD_DISTRIBUTED=1 (or run where
`jax.distributed` detects the cluster) and start the same command on every host.
"""

from __future__ import annotations

import os
import sys

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
    from qkd_jax.data import DatasetNotPreparedError
    from qkd_jax.quant.calibration import DeadLayerError
    from qkd_jax.run.config_schema import ConfigError
    from qkd_jax.run.finite import NonFiniteLossError
    from qkd_jax.run.loop import run
    from qkd_jax.run.rerun import ConfigChangedError
    from qkd_jax.train.checkpoint import CorruptCheckpointError

    try:
        run(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, ConfigChangedError, DatasetNotPreparedError, CorruptCheckpointError,
            NonFiniteLossError, DeadLayerError) as err:
        # Problems the user fixes (config, settings changed in a used workdir, data, checkpoints,
        # divergence, calibration): the message, no traceback.
        sys.stderr.write(f"qkd_jax: {type(err).__name__}: {err}\n")
        sys.exit(1)


HELP_ARGS = ("--help", "-help", "-h", "--h", "-?", "--helpshort")


def _print_help() -> None:
    """The usage above and this module's flags, on stdout (absl's --help exits 1 and, run
    through the qkd_jax.main shim, lists no flags)."""
    sys.stdout.write(f"{__doc__.strip()}\n\nflags:\n{flags.FLAGS.module_help(__name__)}\n")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (--help: the usage and flags, exit 0); an override of a config key that does not exist (which config_flags
    reports as a bare KeyError/AttributeError traceback) becomes one line naming the flag."""
    if any(a in HELP_ARGS for a in argv[1:]):
        _print_help()
        sys.exit(0)
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as err:
        missing = str(err.args[0] if err.args else err).split("\n")[0].strip("\"'")
        overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        named = [o for o in overrides if missing in o.split(".")[1:]]
        if not named:
            raise
        sys.stderr.write(f"FATAL Flags parsing error: --{named[0]}: unknown config key "
                         f"'{named[0].split('.', 1)[1]}' (no field {missing!r}); check the spelling "
                         f"against the config file and qkd_jax/run/config_schema.py.\n")
        sys.exit(1)


def run_cli() -> None:
    """Console-script entry point (`qkd-jax`)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_cli()
