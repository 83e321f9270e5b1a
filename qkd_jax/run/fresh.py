"""Deleting a workdir for a fresh start (`python -m qkd_jax.demo --fresh`), only when it is
recognisably a qkd_jax workdir, so a mistyped --workdir never removes unrelated files."""

from __future__ import annotations

import json

from etils import epath

from qkd_jax.train.paths import PathLike, as_path

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


def remove_workdir(workdir: PathLike) -> bool:
    """Deletes `workdir` (local or a bucket prefix) after `check_workdir`; an empty or missing
    directory is fine. Returns whether something was deleted."""
    workdir = as_path(workdir)
    if not workdir.exists():
        return False
    if not workdir.is_dir():
        raise NotAWorkdirError(f"refusing to delete {workdir}: it is a file, not a workdir")
    if any(workdir.iterdir()):
        check_workdir(workdir)
    workdir.rmtree()
    return True
