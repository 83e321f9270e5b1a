"""What the run command lines (`python -m qkd_jax.main`, `python -m qkd_jax.demo`) print when a run
cannot start or stops: for a problem the user fixes, one line `PROG: ErrorType: message` without a
traceback and exit 1; for a run stopped by SIGTERM/SIGINT, one line and exit 128 + signal.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class BackendUnavailableError(RuntimeError):
    """JAX cannot start the backend JAX_PLATFORMS asks for (e.g. gpu on a machine without one)."""


def check_backend() -> None:
    """Starts JAX's backend now, so a JAX_PLATFORMS this machine cannot serve stops the command with
    one line instead of a traceback from the first array the run creates."""
    import jax

    try:
        jax.devices()
    except (RuntimeError, AssertionError) as err:  # jax asserts for 'cuda' without its plugin
        platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else f"{type(err).__name__} in jax.devices()"
        raise BackendUnavailableError(
            f"JAX_PLATFORMS={platforms!r}: JAX cannot start that backend on this machine ({first}); unset "
            f"JAX_PLATFORMS (or set it to 'cpu') to run on what is available, or install the "
            f"accelerator's JAX build (e.g. pip install 'jax[cuda12]')") from None


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors the user fixes (config, settings changed in a used workdir, data, checkpoints,
    divergence, calibration, a workdir in use, unwritable, full or not a run's, the backend)."""
    from qkd_jax.data import DatasetNotPreparedError
    from qkd_jax.quant.calibration import DeadLayerError
    from qkd_jax.run.config_schema import ConfigError
    from qkd_jax.run.finite import NonFiniteLossError
    from qkd_jax.run.fresh import NotAWorkdirError
    from qkd_jax.run.lock import WorkdirLockedError
    from qkd_jax.run.preflight import InsufficientDiskSpaceError, TeacherCheckpointError, WorkdirNotWritableError
    from qkd_jax.run.rerun import ConfigChangedError
    from qkd_jax.run.teacher_select import NoBestCheckpointError
    from qkd_jax.train.checkpoint import CorruptCheckpointError, DiskFullError

    return (ConfigError, ConfigChangedError, DatasetNotPreparedError, CorruptCheckpointError, NonFiniteLossError,
            DeadLayerError, WorkdirLockedError, TeacherCheckpointError, WorkdirNotWritableError,
            InsufficientDiskSpaceError, DiskFullError, NotAWorkdirError, BackendUnavailableError,
            NoBestCheckpointError)


def run_reporting(prog: str, command: Callable[[], T]) -> T:
    """`command()`; a user error is printed as `PROG: ErrorType: message` (exit 1), a stop by
    SIGTERM/SIGINT as `PROG: message` (exit 143 / 130: a checkpoint was saved, rerun to resume)."""
    from qkd_jax.run.interrupt import Interrupted

    errors = user_errors()
    try:
        check_backend()
        return command()
    except Interrupted as err:
        sys.stderr.write(f"{prog}: {err}\n")
        sys.exit(err.exit_code)
    except errors as err:
        sys.stderr.write(f"{prog}: {type(err).__name__}: {err}\n")
        sys.exit(1)
