"""config.teacher_select='best': the teacher phase keeps its best-epoch checkpoint and hands it on.

The released SQAKD/QKD scripts load the teacher from `best_checkpoint.pth` / `model_best.pth.tar`,
the epoch of highest test top-1. With 'best' the teacher phase writes the evaluated epoch of
highest eval top-1 (the earliest on ties, as `run/report.py`'s best epoch) to `<phase>/best/`,
the only checkpoint there, and its result (what calibrate, student and paraphraser phases read)
is that epoch's network. With 'last' nothing changes: the final epoch, no `best/` directory.
The eval split is the test split, so 'best' selects on test data (docs/method.md).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from etils import epath

from qkd_jax.train.checkpoint import PhaseCheckpointer

BEST_DIR = "best"


class NoBestCheckpointError(FileNotFoundError):
    """teacher_select='best' but the teacher phase kept no best-epoch checkpoint."""


def best_directory(phase_directory: epath.Path) -> epath.Path:
    return phase_directory / BEST_DIR


def is_new_best(history: Sequence[Mapping[str, Any]], top1: float) -> bool:
    """True when `top1` beats every evaluated epoch in `history` (strictly: ties keep the earlier)."""
    return all(float(top1) > float(h["top1"]) for h in history)


def best_record(history: Sequence[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
    """The history entry of highest top-1, the earliest on ties; None for an empty history."""
    best = None
    for h in history:
        if best is None or is_new_best([best], h["top1"]):
            best = h
    return best


def open_best(phase_directory: epath.Path, *, read_only: bool) -> PhaseCheckpointer:
    """The best-epoch checkpointer (two kept at most while `save_only` replaces the old one)."""
    return PhaseCheckpointer(best_directory(phase_directory), max_to_keep=2, read_only=read_only)


def check_has_best(phase_directory: epath.Path, key: str) -> None:
    """Raises NoBestCheckpointError (one line: the problem and the fix) when there is no best checkpoint."""
    directory = best_directory(phase_directory)
    if not (directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())):
        raise NoBestCheckpointError(
            f"config.teacher_select='best' but {key} keeps no best-epoch checkpoint ({directory} is "
            f"missing: that teacher ran with teacher_select='last' or was imported); retrain it with "
            f"--config.teacher_select=best, or use --config.teacher_select=last.")
