"""One run per workdir: `WORKDIR/.lock`, created atomically (O_CREAT | O_EXCL) at the start of a
run and removed when it ends, so two runs never write the same checkpoints.

On an object store (gs://, `train/paths.py:is_remote`) there is neither O_EXCL nor rename
through etils.epath: the lock is created if absent, then read back after `SETTLE_S` seconds and
held only if it still holds this run's record. A second run that writes its record later is
caught (the first reads the other record back and stops); two runs whose absence check and
write both fall within that window can both start. The guarantee there is this weaker one
(docs/architecture.md, "Cloud workdirs").

The file holds the holder's host, PID and start time. A second run on the workdir stops at once
with `WorkdirLockedError` naming them. A lock left by a run that died without removing it
(SIGKILL, power loss) is stale when its host is this host and its PID is no longer alive: it is
taken over with a one-line notice. A lock from another host cannot be checked from here: the
message says to delete the file once that run is known to be gone.

Multi-host: only process 0, the one that writes the run's files, takes the lock (the other
processes of the same run would otherwise find it held); see `run/loop.py`.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Optional

from etils import epath

from qkd_jax.train.paths import PathLike, as_path, is_remote

LOCK_NAME = ".lock"
SETTLE_S = 1.0  # remote workdirs: wait before reading the lock back (a concurrent writer shows up)


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: epath.Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "an unknown run (the lock file is empty or unreadable)"
    taken = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(holder.get("time", 0)))
    return f"PID {holder.get('pid')} on host {holder.get('host')!r} since {taken}"


class WorkdirLock:
    """The lock of one workdir: `acquire()` once, `release()` when the run ends (also a context manager)."""

    def __init__(self, workdir: PathLike):
        self.path = as_path(workdir) / LOCK_NAME
        self.remote = is_remote(self.path)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        self.held = False

    def _write_remote(self) -> bool:
        """Writes our record (one object write), waits, and reads it back: True if it is still ours."""
        self.path.write_text(json.dumps(self.record))
        time.sleep(SETTLE_S)
        return _read(self.path) == self.record

    def _create(self) -> bool:
        if self.remote:  # create-if-absent, checked by reading back (no O_EXCL on an object store)
            return not self.path.exists() and self._write_remote()
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record))
        return True

    def _is_stale(self, holder: Optional[dict]) -> bool:
        return (bool(holder) and holder.get("host") == self.record["host"]
                and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]))

    def _take_over(self, holder: dict) -> bool:
        """Moves the stale file aside (atomic rename) and creates ours; if what was moved is not
        the stale lock read before (another run took it over meanwhile), it is put back. On an
        object store the stale record is overwritten and read back (`_write_remote`)."""
        if self.remote:
            return _read(self.path) == holder and self._write_remote()
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(os.fspath(self.path), os.fspath(aside))
        except FileNotFoundError:
            return self._create()
        if _read(aside) != holder:
            try:
                os.link(os.fspath(aside), os.fspath(self.path))  # never overwrites a lock created meanwhile
            except FileExistsError:
                pass
            aside.unlink()
            return False
        aside.unlink()
        return self._create()

    def _create_first(self) -> bool:
        """Creates the workdir and tries `_create`; a workdir the filesystem refuses (a name over
        its length limit, a file in the way) raises WorkdirNotWritableError with one line."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self._create()
        except OSError as err:
            from qkd_jax.run.preflight import WorkdirNotWritableError

            hint = (" (a path component is longer than the filesystem allows, usually 255 bytes)"
                    if err.errno == errno.ENAMETOOLONG else "")
            raise WorkdirNotWritableError(
                f"--workdir={self.path.parent}: cannot create the workdir's lock file {self.path.name} "
                f"({err.strerror or type(err).__name__}){hint}; choose another --workdir.") from None

    def acquire(self) -> None:
        """Takes the lock (creating the workdir); raises WorkdirLockedError when a live run holds it."""
        if not self._create_first():
            holder = _read(self.path)
            if not self._is_stale(holder) or not self._take_over(holder):
                holder = _read(self.path) or holder
                raise WorkdirLockedError(
                    f"{self.path.parent} is in use by {_describe(holder)} (lock file {self.path}); "
                    f"wait for that run to end, or use another --workdir. If that run is gone "
                    f"(e.g. its machine rebooted), delete {self.path}.")
            print(f"qkd_jax: note: took over the stale lock of {_describe(holder)}, which is no "
                  f"longer running ({self.path})", flush=True)
        self.held = True

    def release(self) -> None:
        """Removes the lock file if it is still ours."""
        if self.held and _read(self.path) == self.record:
            self.path.unlink()
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
