"""Run metrics: a JSONL file and TensorBoard event files in the workdir, plus console lines.

Only process 0 writes. Every record carries the phase and the step. A resumed phase first drops
its records after the step it resumes from (`drop_after`), so metrics.jsonl holds each step once.
TensorBoard events are flushed with every record, so a killed run leaves them readable.

The workdir is an `etils.epath.Path` (`train/paths.py`). Locally metrics.jsonl is appended to
and rewritten through a temporary file and an atomic rename. An object store (gs://) has
neither append nor rename: there the writer keeps the file's lines and rewrites the whole
object with every record (one object write is atomic on GCS: a reader sees the old or the new
file, never a part), at a cost that grows with the file. TensorBoard events on a bucket need
tensorboardX's own writer for the scheme (gs:// needs `google-cloud-storage`); without it the
run goes on without TensorBoard and says so once.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

from qkd_jax.train.paths import PathLike, as_path, has_module, is_remote


def _to_python(value: Any) -> Any:
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        value = np.asarray(value).item()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    return value


class MetricsWriter:
    """Appends metric records to `workdir/metrics.jsonl` and TensorBoard events under `workdir/tb`."""

    def __init__(self, workdir: PathLike, *, tensorboard: bool = True):
        self.workdir = as_path(workdir)
        self.active = jax.process_index() == 0
        self.remote = is_remote(self.workdir)
        self._tb = None
        self._jsonl = None
        self._lines: list[str] = []  # the file's lines, kept when the file is rewritten per record
        if self.active:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._open_jsonl()
            if tensorboard:
                self._tb = _tensorboard_writer(self.workdir / "tb")

    @property
    def path(self):
        return self.workdir / "metrics.jsonl"

    def _open_jsonl(self) -> None:
        if self.remote:  # no append on an object store: keep the lines, rewrite the object
            text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            self._lines = text.splitlines(keepends=True)
        else:
            self._jsonl = self.path.open("a", encoding="utf-8")

    def _append(self, line: str) -> None:
        if self.remote:
            self._lines.append(line)
            self.path.write_text("".join(self._lines), encoding="utf-8")
        else:
            self._jsonl.write(line)
            self._jsonl.flush()

    def write(self, phase: str, step: int, kind: str, values: Mapping[str, Any]) -> None:
        """Records `values` (scalars) of `kind` ('train', 'eval', ...) at `step` of `phase`."""
        if not self.active:
            return
        clean = {k: _to_python(v) for k, v in values.items()}
        record = {"time": time.time(), "phase": phase, "step": int(step), "kind": kind, **clean}
        self._append(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.add_scalars({f"{phase}/{kind}/{key}": value for key, value in clean.items()
                                  if isinstance(value, (int, float)) and math.isfinite(value)}, int(step))

    def drop_after(self, phase: str, step: int) -> int:
        """Removes `phase`'s records with a step above `step` from metrics.jsonl (-1: all of
        them), i.e. what a killed run wrote after the checkpoint the phase resumes from (or what
        a phase that restarts from scratch wrote before). Returns how many were removed."""
        if not self.active:
            return 0
        path = self.path
        if self._jsonl is not None:
            self._jsonl.close()
        lines = self._lines if self.remote else (
            path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else [])
        kept, dropped = [], 0
        for line in lines:
            try:
                record = json.loads(line)
                stale = record.get("phase") == phase and int(record.get("step", -1)) > step
            except (ValueError, TypeError, AttributeError):
                stale = True  # a line cut short by a kill
            if stale:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped and self.remote:
            self._lines = kept
            path.write_text("".join(kept), encoding="utf-8")  # one object write: atomic
        elif dropped:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(path)  # atomic rename on a local filesystem
        if not self.remote:
            self._jsonl = path.open("a", encoding="utf-8")
        return dropped

    def close(self) -> None:
        if self.active:
            if self._jsonl is not None:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


# The client library tensorboardX's writer needs per bucket scheme, (module, pip package)
# (tensorboardX/record_writer.py).
_TB_CLIENTS = {"gs": ("google.cloud.storage", "google-cloud-storage"), "s3": ("boto3", "boto3")}


def _tensorboard_writer(directory):
    """A synchronous TensorBoard event writer for `directory` (train/tb_events.py), or None, with a
    one-line notice, for a bucket scheme tensorboardX cannot write here (its client library
    missing, or no writer for the scheme): the run goes on with metrics.jsonl only."""
    from qkd_jax.train.tb_events import ScalarEventWriter  # tensorboardX: light, no TensorFlow needed

    text = os.fspath(directory)
    if is_remote(text):
        scheme = text.split("://", 1)[0]
        client = _TB_CLIENTS.get(scheme)
        if client is None or not has_module(client[0]):
            need = f"install {client[1]}" if client else f"tensorboardX has no writer for {scheme}://"
            print(f"qkd_jax: note: no TensorBoard events in {text} ({need}, or set "
                  f"--config.tensorboard=False to silence this); metrics.jsonl is written.", flush=True)
            return None
    return ScalarEventWriter(text)


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
