"""`enable_x64(on)`: JAX's float64 context manager under every supported JAX (top-level
`jax.enable_x64` in current releases, `jax.experimental.enable_x64` in jax 0.6, the lowest bound)."""

from __future__ import annotations

from typing import Any

import jax


def enable_x64(on: bool = True) -> Any:
    ctx = getattr(jax, "enable_x64", None)
    if ctx is None:  # jax < 0.7
        from jax.experimental import enable_x64 as ctx
    return ctx(on)
