"""Argument checks shared by the quantizers.

Checks run only on static values (Python numbers, NumPy arrays). Traced values cannot be
inspected inside `jit`; for those the quantizers document the valid range instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MIN_BITS = 1
MAX_BITS = 8


def check_bits(bits: Any, name: str = "bits") -> int:
    """Returns `bits` as an int, or raises ValueError when it is not an integer in [1, 8]."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(
            f"{name} must be a Python int between {MIN_BITS} and {MAX_BITS}, got {bits!r} "
            f"({type(bits).__name__}); bit widths are static, pass e.g. {name}=4."
        )
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(
            f"{name}={bits} is impossible: qkd_jax supports {MIN_BITS} to {MAX_BITS} bits; "
            f"pick a value in that range."
        )
    return int(bits)


def is_static(value: Any) -> bool:
    """True for values whose numbers can be read now (not jax tracers or device arrays)."""
    return isinstance(value, (int, float, np.ndarray, np.number)) and not isinstance(value, bool)


def check_positive(value: Any, name: str) -> None:
    """Raises ValueError when a static `value` has an element <= 0 (or NaN)."""
    if is_static(value):
        arr = np.asarray(value, dtype=np.float64)
        if not np.all(arr > 0):
            raise ValueError(
                f"{name} must be > 0 everywhere, got {value!r}; quantizer steps and intervals "
                f"are positive widths (initialise them with qkd_jax's calibration)."
            )


def check_interval(lower: Any, upper: Any) -> None:
    """Raises ValueError when static `lower`/`upper` do not satisfy upper > lower."""
    if is_static(lower) and is_static(upper):
        if not np.all(np.asarray(upper, np.float64) > np.asarray(lower, np.float64)):
            raise ValueError(
                f"interval quantizer needs upper > lower, got lower={lower!r}, upper={upper!r}."
            )
