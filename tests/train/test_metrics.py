"""The console progress line (qkd_jax/train/metrics.py:ProgressLine) on a fake clock."""

from __future__ import annotations

import time

from qkd_jax.train.metrics import ProgressLine


def test_first_eta_excludes_compile_time(monkeypatch):
    """100 s of compiling in the first step, then 10 steps in 1 s. The ETA for the 10 steps left
    is 1 s (0:01), not 101 s * 10 / 11 (1:31); 10 steps of 8 images in 1 s are 80 img/s."""
    clock = iter([0.0, 100.0, 101.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    progress = ProgressLine("p", total_steps=21, global_batch=8)
    progress.started(1)
    line = progress.line(11, {"loss": 1.0})
    assert line.endswith("80 img/s ETA 0:01"), line
