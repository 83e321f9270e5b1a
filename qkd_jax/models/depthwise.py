"""A depthwise conv written as a sum of shifted elementwise products (drop-in for nn.Conv's
``conv_general_dilated``).

XLA's grouped convolution (``feature_group_count`` = channels) has a slow backward pass (jax-ml/jax
issues 13800, 23713). For a depthwise k x k conv (one filter per channel, no dilation) the same
output is the sum over the k*k taps (i, j) of the padded input's strided slice starting at (i, j)
times that tap's per-channel weight: elementwise products and adds, whose gradients are pads and
slices. `benchmarks/depthwise.py` measures both; `MobileNetV2(depthwise='shifted')` uses it.
Any other conv falls through to ``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_depthwise(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count) -> bool:
    """A 2-D NHWC/HWIO conv with one filter per input channel and no dilation."""
    if lhs.ndim != 4 or feature_group_count != lhs.shape[-1] or rhs.shape[-2:] != (1, lhs.shape[-1]):
        return False
    if any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())):
        return False
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == \
        lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)


def shifted_depthwise(x: jax.Array, w: jax.Array, strides: Sequence[int],
                      padding: Sequence[tuple[int, int]]) -> jax.Array:
    """NHWC depthwise conv, kernel (kh, kw, 1, C), explicit (low, high) padding per spatial axis."""
    (kh, kw), (sh, sw) = w.shape[:2], tuple(strides)
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    n, hp, wp, c = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
            term = tap * w[i, j, 0, :]
            out = term if out is None else out + term
    return out


def depthwise_conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
    lhs_dilation: Optional[Sequence[int]] = None, rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None, **kwargs: Any,
) -> jax.Array:
    """``lax.conv_general_dilated`` with depthwise convs (explicit padding) as `shifted_depthwise`."""
    if (not isinstance(padding, str) and not kwargs
            and _is_depthwise(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)):
        return shifted_depthwise(lhs, rhs, window_strides, padding)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision, **kwargs)
