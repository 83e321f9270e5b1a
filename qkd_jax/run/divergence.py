"""Warning about a phase whose loss stays finite but is far beyond what a training phase produces.

A learning rate far too high (Adam at 1e6) can drive the loss to ~1e14 without a NaN: the phase
ends at chance accuracy and nothing stops it. `DivergenceMonitor` sees every logged loss and every
evaluation and warns once per phase, on the first of three rules:

- growth: the loss exceeds GROWTH times the lowest loss logged so far in the phase and
  ABSOLUTE_FACTOR * log(num_classes) (small losses fluctuating by 100x never warn);
- scale: the loss exceeds SCALE_FACTOR times the phase's expected scale, `loss_weight *
  log(num_classes)`. The cross-entropy of a uniform guess is log(num_classes), and a sane KL
  between softened distributions is of the same order, times its weight (alpha * T^2 for
  KL_T); a loss a thousand times above that is no training. This rule needs no earlier, lower
  loss, so it also fires when the first logged loss is already huge (the growth rule cannot);
- chance: an evaluation at chance accuracy (top-1 <= CHANCE_MARGIN * 100 / num_classes %) while
  the last logged loss is above ABSOLUTE_FACTOR times the expected scale: the network is no
  better than guessing and its loss says why.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

GROWTH = 100.0
ABSOLUTE_FACTOR = 10.0
SCALE_FACTOR = 1000.0
CHANCE_MARGIN = 1.5


def loss_weight(objective: str, kwargs: Mapping[str, Any]) -> float:
    """How many log(num_classes) a sane loss of this objective is worth: the cross-entropy's weight
    (gamma, 1 where the objective has a label term, 0 for 'sqakd'), plus alpha * T^2 for a KL_T
    term, plus beta for a feature term; twice that for 'co_study' (student and teacher sides).
    `kwargs`: the objective's arguments (`config_schema.objective_kwargs`)."""
    has_kl = "temperature" in kwargs
    ce = float(kwargs.get("gamma", 0.0 if objective == "sqakd" else 1.0))
    kl = float(kwargs.get("alpha", 1.0)) * float(kwargs["temperature"]) ** 2 if has_kl else 0.0
    weight = abs(ce) + abs(kl) + abs(float(kwargs.get("beta", 0.0)))
    return 2.0 * weight if objective == "co_study" else weight


class DivergenceMonitor:
    """Tracks one phase's logged losses and evaluations; `update` / `evaluated` return the warning
    line the first time a rule fires, None otherwise. `warnings` holds it (restored from the
    checkpoint on resume, so a resumed phase does not warn twice)."""

    def __init__(self, phase: str, num_classes: int, loss_weight: float = 1.0):
        self.phase = phase
        self.num_classes = max(num_classes, 2)
        self.floor = ABSOLUTE_FACTOR * math.log(self.num_classes)
        self.scale = max(loss_weight, 1e-12) * math.log(self.num_classes)
        self.lowest = math.inf
        self.last_loss = math.nan
        self.warnings: list[str] = []

    def _warn(self, what: str) -> str:
        warning = (f"WARNING [{self.phase}] the loss is diverging: {what}; lower "
                   f"config.phases.{self.phase}.weights.learning_rate (or set clip_norm) and rerun with "
                   f"--config.retrain_from={self.phase}")
        self.warnings.append(warning)
        return warning

    def update(self, step: int, loss: float) -> Optional[str]:
        if self.warnings or not math.isfinite(loss):
            return None
        self.last_loss = loss
        if self.lowest < math.inf and loss > GROWTH * self.lowest and loss > self.floor:
            return self._warn(f"{loss:.3g} at step {step}, over {GROWTH:.0f}x its lowest value "
                              f"{self.lowest:.3g} in this phase and over {ABSOLUTE_FACTOR:.0f} "
                              f"log(num_classes) = {self.floor:.3g}")
        if loss > SCALE_FACTOR * self.scale:
            return self._warn(f"{loss:.3g} at step {step}, over {SCALE_FACTOR:.0f}x the phase's expected "
                              f"scale {self.scale:.3g} (its loss weight x log(num_classes))")
        self.lowest = min(self.lowest, loss)
        return None

    def evaluated(self, step: int, top1: float) -> Optional[str]:
        """After an evaluation (top-1 in %): warns at chance accuracy with a loss far above its scale."""
        chance = 100.0 / self.num_classes
        if self.warnings or not top1 <= CHANCE_MARGIN * chance or not self.last_loss > ABSOLUTE_FACTOR * self.scale:
            return None
        return self._warn(f"eval top-1 {top1:.2f}% at step {step} is chance level ({chance:.3g}% for "
                          f"{self.num_classes} classes) and the last logged loss {self.last_loss:.3g} is over "
                          f"{ABSOLUTE_FACTOR:.0f}x the phase's expected scale {self.scale:.3g}")

    def record(self) -> dict[str, float]:
        """The metrics.jsonl 'warning' record's values (lowest_loss only once a loss was below the rules)."""
        out = {"divergence": 1.0, "loss": self.last_loss}
        if math.isfinite(self.lowest):
            out["lowest_loss"] = self.lowest
        return out
