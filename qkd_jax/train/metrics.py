"""Run metrics: a JSONL file and TensorBoard event files in the workdir, plus console lines.

Only process 0 writes. Every record carries the phase and the step. A resumed phase first drops
its records after the step it resumes from (`drop_after`), so metrics.jsonl holds each step once.
TensorBoard events are flushed with every record, so a killed run leaves them readable.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np


def _to_python(value: Any) -> Any:
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        value = np.asarray(value).item()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    return value


class MetricsWriter:
    """Appends metric records to `workdir/metrics.jsonl` and TensorBoard events under `workdir/tb`."""

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.active = jax.process_index() == 0
        self._tb = None
        if self.active:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter  # light, no TensorFlow needed

                self._tb = SummaryWriter(str(self.workdir / "tb"))

    def write(self, phase: str, step: int, kind: str, values: Mapping[str, Any]) -> None:
        """Records `values` (scalars) of `kind` ('train', 'eval', ...) at `step` of `phase`."""
        if not self.active:
            return
        clean = {k: _to_python(v) for k, v in values.items()}
        record = {"time": time.time(), "phase": phase, "step": int(step), "kind": kind, **clean}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{phase}/{kind}/{key}", value, int(step))
            self._tb.flush()

    def drop_after(self, phase: str, step: int) -> int:
        """Removes `phase`'s records with a step above `step` from metrics.jsonl (-1: all of
        them), i.e. what a killed run wrote after the checkpoint the phase resumes from (or what
        a phase that restarts from scratch wrote before). Returns how many were removed."""
        if not self.active:
            return 0
        path = self.workdir / "metrics.jsonl"
        self._jsonl.close()
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                record = json.loads(line)
                stale = record.get("phase") == phase and int(record.get("step", -1)) > step
            except (ValueError, TypeError, AttributeError):
                stale = True  # a line cut short by a kill
            if stale:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(path)
        self._jsonl = open(path, "a", encoding="utf-8")
        return dropped

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLine:
    """Builds the console line: phase, step, loss terms, images/s and ETA.

    Rate and ETA are measured from `started` (called once the first step, which compiles the
    step function, has finished), so compile time does not inflate the first ETA."""

    def __init__(self, phase: str, total_steps: int, global_batch: int, start_step: int = 0):
        self.phase, self.total, self.batch = phase, total_steps, global_batch
        self._t0, self._s0 = time.perf_counter(), start_step

    def started(self, step: int) -> None:
        """Measure from now, when `step` steps are done (the compiled first step included)."""
        self._t0, self._s0 = time.perf_counter(), step

    def line(self, step: int, values: Mapping[str, Any], lr: Optional[float] = None) -> str:
        terms = " ".join(f"{k}={_to_python(v):.4g}" for k, v in values.items())
        lr_txt = f" lr={lr:.3g}" if lr is not None else ""
        done = step - self._s0
        if done <= 0:  # nothing timed yet (the first step, which compiled)
            return f"[{self.phase}] step {step}/{self.total} {terms}{lr_txt}"
        elapsed = time.perf_counter() - self._t0
        rate = done * self.batch / max(elapsed, 1e-9)
        eta = (self.total - step) * elapsed / done
        return (
            f"[{self.phase}] step {step}/{self.total} {terms}{lr_txt} "
            f"{rate:.0f} img/s ETA {format_duration(eta)}"
        )
