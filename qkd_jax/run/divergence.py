"""Warning about a phase whose loss stays finite but grows by orders of magnitude.

A learning rate far too high (Adam at 1e6) can drive the loss to ~1e14 without a NaN: the phase
ends at chance accuracy and nothing stops it. `DivergenceMonitor` sees every logged loss and
warns once per phase when the loss exceeds both GROWTH times the lowest loss logged so far in
the phase and ABSOLUTE_FACTOR * log(num_classes) (the cross-entropy of a uniform guess is
log(num_classes); a classification or distillation loss far above it means the network is
worse than guessing, so small losses fluctuating by 100x never warn).
"""

from __future__ import annotations

import math
from typing import Optional

GROWTH = 100.0
ABSOLUTE_FACTOR = 10.0


class DivergenceMonitor:
    """Tracks one phase's logged losses; `update` returns the warning line the first time the
    loss has diverged, None otherwise. `warnings` holds it (restored from the checkpoint on
    resume, so a resumed phase does not warn twice)."""

    def __init__(self, phase: str, num_classes: int):
        self.phase = phase
        self.floor = ABSOLUTE_FACTOR * math.log(max(num_classes, 2))
        self.lowest = math.inf
        self.warnings: list[str] = []

    def update(self, step: int, loss: float) -> Optional[str]:
        if self.warnings or not math.isfinite(loss):
            return None
        if self.lowest < math.inf and loss > GROWTH * self.lowest and loss > self.floor:
            warning = (
                f"WARNING [{self.phase}] the loss is diverging: {loss:.3g} at step {step}, over "
                f"{GROWTH:.0f}x its lowest value {self.lowest:.3g} in this phase and over "
                f"{ABSOLUTE_FACTOR:.0f} log(num_classes) = {self.floor:.3g}; lower "
                f"config.phases.{self.phase}.weights.learning_rate (or set clip_norm) and rerun with "
                f"--config.retrain_from={self.phase}")
            self.warnings.append(warning)
            return warning
        self.lowest = min(self.lowest, loss)
        return None
