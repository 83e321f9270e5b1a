"""Precision preset of the released SQAKD Tiny-ImageNet code: MQBench's academic quantizer.

`MQBench/mqbench/custom_quantizer/academic_quantizer.py` (as modified by the SQAKD authors) gives
the first layer (the one reading the network input), the last layer (the one feeding the output)
and the inputs of both a 32-bit quantizer, and every other Conv2d / Linear the configured bits.
A 32-bit quantizer rounds nothing measurable, but the released transforms still act
(docs/method.md section 9): DoReFa's tanh(X) / (max|tanh(X)| + 1e-5) of the weights (PACT and
DoReFa configs) and of the input (DoReFa), PACT's clip of the input at +-6. Here:

    'stem', 'classifier'  released PACT / DoReFa: a `FullRangeRule` (those transforms, no
                          rounding); released LSQ: full precision (its 32-bit grid, step
                          2 mean|x| / sqrt(2^31 - 1), is not reproduced)
    every other layer     the released method at (w_bits, a_bits)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from qkd_jax.quant.precision import LayerPrecision
from qkd_jax.quant.released_methods import FULL_RANGE_METHODS, RELEASED_METHODS
from qkd_jax.quant.rules import Rule, RuleSet, rule_set

#: The bits a full-range layer reports (the released code's `bit = 32`); no grid is built from it.
FULL_RANGE_BITS = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullRangeRule(Rule):
    """A released "32-bit" layer: the method's transforms on weights and input, no rounding.

    Takes a pattern and a method of `FULL_RANGE_METHODS`; no bits, no other option.
    """

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise ValueError(f"FullRangeRule pattern must be a regex string, got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"FullRangeRule pattern {self.pattern!r} is not a valid regex: {err}") from None
        if self.method not in FULL_RANGE_METHODS:
            raise ValueError(f"FullRangeRule {self.pattern!r}: method must be one of {FULL_RANGE_METHODS}, "
                             f"got {self.method!r} (other methods: use Rule(pattern=..., fp=True))")
        extra = {k: getattr(self, k) for k in ("w_bits", "a_bits", "pact_alpha", "output_scale")
                 if getattr(self, k) is not None}
        if extra or self.fp or self.a_signed:
            raise ValueError(f"FullRangeRule {self.pattern!r} takes only a pattern and a method; drop {extra or 'fp/a_signed'}")

    def precision(self, index: int | None = None) -> LayerPrecision:
        return LayerPrecision(method=self.method, w_bits=FULL_RANGE_BITS, a_bits=FULL_RANGE_BITS,
                              full_range=True, rule=index, pattern=self.pattern)


def mqbench_academic(method: str, w_bits: int, a_bits: int, **kw: Any) -> RuleSet:
    """'stem' and 'classifier' as the released 32-bit layers, every other conv / dense at (w_bits, a_bits).

    `method` is a released record ('pact_released', 'lsq_released', 'dorefa_released'; the
    config maps 'pact' / 'lsq' / 'dorefa' to them with quant.variant='released').
    """
    released = tuple(RELEASED_METHODS.values())
    if method not in released:
        raise ValueError(f"preset 'mqbench_academic' reproduces the released MQBench layers and takes a released "
                         f"method {released}, got {method!r}; with a textbook method use e.g. 'first_last_8bit'")

    def edge(pattern: str) -> Rule:
        return FullRangeRule(pattern=pattern, method=method) if method in FULL_RANGE_METHODS else Rule(
            pattern=pattern, fp=True)

    return rule_set(edge("stem"), edge("classifier"), Rule(pattern=".*", method=method, w_bits=w_bits,
                                                            a_bits=a_bits, **kw))
