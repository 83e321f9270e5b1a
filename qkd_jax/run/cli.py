"""Command line (`qkd-jax`, `python -m qkd_jax.main`).

    python -m qkd_jax.main --config=FILE[:ARG] --workdir=DIR [--config.KEY=VALUE ...]

--config=FILE[:ARG]   an ml_collections config file (configs/*.py); ARG, after a colon, is
                      passed to its get_config(ARG), e.g. --config=configs/cifar10_resnet20.py:sqakd,w2a2
--workdir=DIR         checkpoints, metrics.jsonl, summary.json; rerunning resumes there
--config.KEY=VALUE    overrides one config field, e.g. --config.phases.teacher.epochs=2
                      or --config.retrain_from=sqakd (delete that phase and later ones, retrain)

Exit codes: 0 done; 1 an error the user fixes, printed as one line without a traceback (flags,
config, data, checkpoints, a workdir in use, not writable or full); 143 (SIGTERM) or 130
(SIGINT): stopped at a step boundary with a checkpoint, rerun the same command to resume.

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
    from qkd_jax.run.interrupt import Interrupted
    from qkd_jax.run.lock import WorkdirLockedError
    from qkd_jax.run.loop import run
    from qkd_jax.run.preflight import InsufficientDiskSpaceError, TeacherCheckpointError, WorkdirNotWritableError
    from qkd_jax.run.rerun import ConfigChangedError
    from qkd_jax.run.teacher_select import NoBestCheckpointError
    from qkd_jax.train.checkpoint import CorruptCheckpointError, DiskFullError

    try:
        run(_CONFIG.value, _WORKDIR.value)
    except Interrupted as err:  # SIGTERM/SIGINT: checkpoint saved, exit 128 + signal (143, 130)
        sys.stderr.write(f"qkd_jax: {err}\n")
        sys.exit(err.exit_code)
    except (ConfigError, ConfigChangedError, DatasetNotPreparedError, CorruptCheckpointError,
            NonFiniteLossError, DeadLayerError, WorkdirLockedError, TeacherCheckpointError,
            WorkdirNotWritableError, InsufficientDiskSpaceError, DiskFullError, NoBestCheckpointError) as err:
        # Problems the user fixes (config, settings changed in a used workdir, data, checkpoints,
        # divergence, calibration, a workdir in use, unwritable or full): the message, no traceback.
        sys.stderr.write(f"qkd_jax: {type(err).__name__}: {err}\n")
        sys.exit(1)


HELP_ARGS = ("--help", "-help", "-h", "--h", "-?", "--helpshort")


def _print_help() -> None:
    """The usage above and this module's flags, on stdout (absl's --help exits 1 and, run
    through the qkd_jax.main shim, lists no flags)."""
    sys.stdout.write(f"{__doc__.strip()}\n\nflags:\n{flags.FLAGS.module_help(__name__)}\n")


def _config_spec(argv: list[str]) -> str:
    """The value of --config on the command line ('' when absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _config_file_error(spec: str, message: str) -> str:
    """One line for a config file that cannot be loaded (config_flags reports a traceback)."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        return f"--config={spec}: no config file {path!r} (paths are relative to the current directory)"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if line.split(":")[0].endswith(("Error", "Exception"))),
                 lines[-1] if lines else "")
    if variant and cause.startswith("TypeError") and "positional argument" in cause:
        return f"--config={spec}: {path} has no variants; drop ':{variant}'"
    return f"--config={spec}: {cause}"


def _key_error_text(err: BaseException) -> str:
    """The text of a (possibly wrapped) KeyError: ml_collections raises AttributeError(KeyError(msg))."""
    while err.args and isinstance(err.args[0], BaseException):
        err = err.args[0]
    return str(err.args[0]) if err.args else str(err)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (--help: the usage and flags, exit 0), with one line (exit 1) for the
    errors config_flags reports as tracebacks: an override of a config key that does not exist (with ml_collections' "Did you
    mean" suggestion) and a config file that is missing or whose get_config(ARG) fails."""
    if any(a in HELP_ARGS for a in argv[1:]):
        _print_help()
        sys.exit(0)
    spec = _config_spec(argv)
    try:
        if spec and not os.path.isfile(spec.partition(":")[0]):  # config_flags fails late, with a traceback
            raise flags.Error("config file")
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as err:
        text = _key_error_text(err)
        missing, _, hint = text.partition("\n")
        missing = missing.strip("\"'")
        overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        named = [o for o in overrides if missing in o.split(".")[1:]]
        if not named:
            raise
        hint = f" {hint.strip()}" if hint.strip() else ""
        message = (f"--{named[0]}: unknown config key '{named[0].split('.', 1)[1]}' (no field {missing!r})."
                   f"{hint} Check the spelling against the config file and qkd_jax/run/config_schema.py.")
    except flags.Error as err:
        message = str(err)
        if spec and ("config file" in message or "get_config" in message or "Traceback" in message):
            message = _config_file_error(spec, message)
        else:
            message = message.splitlines()[0] if message else type(err).__name__
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
    sys.exit(1)


def run_cli() -> None:
    """Console-script entry point (`qkd-jax`)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_cli()
