"""SIGTERM / SIGINT: stop at the next step boundary with a checkpoint, instead of dying mid-step.

While a run is active (`handle_signals()`), the first SIGTERM or SIGINT only records the request;
the training loop (`run/train_phase.py`) checks `stop_requested()` after each step, saves a
checkpoint through the phase's checkpointer (the same save as a periodic one, so a rerun of the
same command resumes exactly as after any checkpoint) and raises `Interrupted`. A calibrate
phase stops before its single save (it is redone on the rerun). Further signals while stopping
are noted and ignored, so they cannot cut a save short; only SIGKILL stops at once (the
checkpoints on disk stay intact: orbax saves are atomic).

Exit codes (`run/cli.py`): 128 + the signal number, i.e. 143 for SIGTERM and 130 for SIGINT.
Multi-host: every process must receive the signal (SLURM and TPU maintenance events signal them
all), since a checkpoint save involves all processes.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: list[int] = []


class Interrupted(Exception):
    """The run stopped on a signal; the message says where and how to resume."""

    def __init__(self, signum: int, phase: str, step: Optional[int] = None, total: Optional[int] = None):
        self.signum, self.phase, self.step = signum, phase, step
        self.exit_code = 128 + signum
        if step is not None:
            what = f"in phase {phase!r} at step {step}/{total}, checkpoint saved; rerun the same command to resume"
        else:
            what = (f"in phase {phase!r} before it saved anything; rerun the same command to resume "
                    f"(this phase starts again)")
        super().__init__(f"stopped by {signal.Signals(signum).name} {what}")


def _handler(signum: int, frame) -> None:
    if _requested:
        sys.stderr.write(f"qkd_jax: {signal.Signals(signum).name} again: already stopping at the next "
                         f"step boundary (SIGKILL stops at once; the checkpoints on disk stay intact)\n")
        return
    _requested.append(signum)
    sys.stderr.write(f"qkd_jax: {signal.Signals(signum).name} received: stopping after the current "
                     f"step with a checkpoint\n")


def stop_requested() -> Optional[int]:
    """The signal number of a pending stop request, or None."""
    return _requested[0] if _requested else None


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Installs the handlers for the duration of a run (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _requested.clear()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _requested.clear()
