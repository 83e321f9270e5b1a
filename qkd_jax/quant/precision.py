"""The resolved precision of one layer: what a quantized layer needs to run (rules produce it)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPrecision:
    """The resolved precision of one layer (what a quantized layer needs to run).

    `w_bits` / `a_bits` None means that side is full precision; `method == 'none'` means both.
    `a_signed`: the layer's input is signed (declared by the model, `rules.with_signed_inputs`, or
    by a rule): a signed activation grid (LSQ, QKD, PACT, DoReFa); the interval method covers
    negatives with its learnable lower bound either way. Calibration raises when a layer with
    a_signed False sees a negative input. `output_scale`: multiply the output by a learnable
    |output_scale| (EWGS). `pact_alpha`: a constant PACT alpha for calibration (None: from data).
    `full_range`: the released MQBench "32-bit" layer (`qkd_jax.quant.released_methods`): no
    rounding, only the method's transforms; w_bits / a_bits then read 32 (not a grid).
    `estimator`: the layer's gradient estimator (`qkd_jax.quant.estimators`); None: EWGS with the
    layer's 'quant_delta' (0 = STE), as before estimators were pluggable.
    """

    method: str = "none"
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    a_signed: bool = False
    output_scale: bool = False
    pact_alpha: Optional[float] = None
    full_range: bool = False
    estimator: Optional[Any] = None
    rule: Optional[int] = None  # index of the rule that matched, None when no rule did
    pattern: Optional[str] = None

    @property
    def quantized(self) -> bool:
        """True when weights or activations are quantized."""
        return self.method != "none" and (self.w_bits is not None or self.a_bits is not None)


FULL_PRECISION = LayerPrecision()
