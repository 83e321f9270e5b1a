"""Deleting a previous run for a fresh start (`python -m qkd_jax.demo --fresh`, `loop.run(fresh=True)`),
only when the workdir is recognisably a qkd_jax workdir, so a mistyped --workdir never removes
unrelated files.

`run/loop.py` calls `check_fresh` after the config and the run's checks passed (nothing written
yet), then takes the workdir's lock and calls `clear_workdir` with it held: the lock file stays
while everything else is deleted, so no other run can start in the workdir meanwhile. A workdir
that is a symbolic link keeps its link; the run in the directory it points to is deleted.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from etils import epath

from qkd_jax.train.paths import PathLike, as_path, is_remote

# What a run writes at the top of its workdir besides one directory per phase.
RUN_FILES = frozenset({"config.json", "metrics.jsonl", "summary.json", "precision.txt", "tb"})


class NotAWorkdirError(RuntimeError):
    """The directory does not look like a qkd_jax workdir, so it is not deleted."""


def _phase_names(workdir: epath.Path) -> set[str]:
    try:
        config = json.loads((workdir / "config.json").read_text())
        return {n.strip() for n in str(config["phase_order"]).split(",") if n.strip()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NotAWorkdirError(
            f"refusing to delete {workdir}: it has no readable qkd_jax config.json ({type(err).__name__}); "
            f"delete it yourself or choose another --workdir") from None


def check_workdir(workdir: epath.Path) -> None:
    """Raises NotAWorkdirError unless `workdir` holds a config.json written by a run and nothing
    but what a run writes (RUN_FILES, lock files, the phase directories its phase_order names)."""
    phases = _phase_names(workdir)
    foreign = sorted(p.name for p in workdir.iterdir()
                     if p.name not in RUN_FILES and p.name not in phases and not p.name.endswith(".lock")
                     and not p.name.startswith(".lock"))
    if foreign:
        raise NotAWorkdirError(
            f"refusing to delete {workdir}: besides a qkd_jax run it holds {foreign[:5]}; "
            f"move them away or choose another --workdir")


def _entries(workdir: epath.Path, keep: str) -> list[epath.Path]:
    return [p for p in workdir.iterdir() if p.name != keep]


def check_fresh(workdir: PathLike, protected: Iterable[PathLike] = (), keep: str = "") -> None:
    """Raises NotAWorkdirError when `workdir` (missing, empty or holding only `keep` is fine) is a
    file or not a qkd_jax workdir, or when it holds one of `protected` (e.g. the run's
    config.teacher_checkpoint). Reads only."""
    workdir = as_path(workdir)
    if not workdir.exists():
        return
    if not workdir.is_dir():
        raise NotAWorkdirError(f"refusing to delete {workdir}: it is a file, not a workdir")
    inside = [str(p) for p in map(as_path, protected) if str(p).startswith(f"{str(workdir).rstrip('/')}/")]
    if inside:
        raise NotAWorkdirError(
            f"refusing to delete {workdir}: it holds {inside[0]}, which this run reads "
            f"(config.teacher_checkpoint); copy it elsewhere first, or drop --fresh")
    if _entries(workdir, keep):
        check_workdir(workdir)


def _delete(path: epath.Path) -> None:
    if not is_remote(path) and os.path.islink(os.fspath(path)):
        os.unlink(os.fspath(path))  # a link inside the workdir: the link, never what it points to
    elif path.is_dir():
        path.rmtree()
    else:
        path.unlink()


def clear_workdir(workdir: PathLike, keep: str, protected: Iterable[PathLike] = ()) -> list[str]:
    """Deletes everything in `workdir` (local or a bucket prefix) except the entry named `keep`
    (the lock file held meanwhile), after `check_fresh`. Returns the names deleted."""
    workdir = as_path(workdir)
    check_fresh(workdir, protected, keep)
    if not workdir.exists():
        return []
    entries = _entries(workdir, keep)
    for entry in entries:
        _delete(entry)
    return sorted(p.name for p in entries)


def remove_workdir(workdir: PathLike) -> bool:
    """Deletes the qkd_jax workdir `workdir` (local or a bucket prefix) under its lock (a run in
    it: WorkdirLockedError, nothing deleted), then the emptied directory itself; a missing or
    empty one is fine. Returns whether something was deleted."""
    from qkd_jax.run.lock import LOCK_NAME, WorkdirLock

    workdir = as_path(workdir)
    check_fresh(workdir, keep=LOCK_NAME)
    if not workdir.exists():
        return False
    with WorkdirLock(workdir):
        deleted = clear_workdir(workdir, keep=LOCK_NAME)
    if not is_remote(workdir) and not os.path.islink(os.fspath(workdir)):  # a bucket has no directories
        try:
            os.rmdir(os.fspath(workdir))
        except OSError:  # a run created its lock meanwhile: the directory is its now
            pass
    return bool(deleted)
