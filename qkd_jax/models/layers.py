"""Building blocks shared by the model zoo: factory types, torch-style padding and pooling.

Every model creates its convolutions and linear layers only through the injected
``conv`` / ``dense`` factories (``nn.Conv`` / ``nn.Dense`` for the FP teacher, the
quantized drop-ins for the student); :func:`conv_layer` is the one place that turns
torch-style arguments (square kernel, symmetric integer padding) into that call.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

ModuleDef = Any
Array = jnp.ndarray

#: Collection of the distillation features (see :mod:`qkd_jax.models.features`).
FEATURES = "features"
#: Collection of the per-block outputs of each stage (CKTF; see :mod:`qkd_jax.models.features`).
BLOCKS = "block_outputs"

#: BatchNorm factory with the torch defaults (torch momentum 0.1 == flax momentum 0.9, eps 1e-5).
BatchNorm: ModuleDef = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def conv_layer(
    factory: ModuleDef,
    features: int,
    kernel_size: int,
    *,
    name: str,
    strides: int = 1,
    padding: int | None = None,
    use_bias: bool = False,
    groups: int = 1,
) -> nn.Module:
    """A square conv made by ``factory`` with torch-style symmetric padding ((k-1)//2 by default)."""
    pad = (kernel_size - 1) // 2 if padding is None else padding
    return factory(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        feature_group_count=groups,
        name=name,
    )


def compute_layers(module: nn.Module) -> tuple[ModuleDef, ModuleDef]:
    """The model's conv / dense factories computing in ``module.dtype`` (the model's compute dtype:
    activations, matmuls and convolutions); their parameters stay float32 (``param_dtype``)."""
    return (functools.partial(module.conv, dtype=module.dtype),
            functools.partial(module.dense, dtype=module.dtype))


def at_least_float32(x: Array) -> Array:
    """``x`` promoted to at least float32: bfloat16 becomes float32, float64 stays float64."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def float32_logits(logits: Array) -> Array:
    """The model's output in (at least) float32, whatever its compute dtype: every loss, softmax
    and metric reads float32 logits (bfloat16 keeps 8 significant bits, too few for a
    log-softmax); a float64 model keeps float64."""
    return at_least_float32(logits)


def bind_norm(norm: ModuleDef, train: bool, axis_name: str | None, dtype: Any) -> ModuleDef:
    """The BatchNorm factory for one forward pass: batch statistics (synced over ``axis_name``) in training."""
    return functools.partial(norm, use_running_average=not train, axis_name=axis_name, dtype=dtype)


def _pool_pads(size: int, window: int, stride: int, padding: int, ceil_mode: bool) -> tuple[int, int]:
    """(low, high) padding that reproduces torch's output size, including ``ceil_mode``."""
    span = size + 2 * padding - window
    if not ceil_mode:
        return padding, padding
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + padding:  # torch: the last window must start inside the input
        out -= 1
    return padding, padding + max(0, (out - 1) * stride + window - (size + 2 * padding))


def max_pool(x: Array, window: int, stride: int, padding: int = 0, ceil_mode: bool = False) -> Array:
    """torch.nn.MaxPool2d on NHWC input (padding with -inf, optional ceil_mode)."""
    pads = tuple(_pool_pads(x.shape[a], window, stride, padding, ceil_mode) for a in (1, 2))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def _adaptive_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging matrix of torch's adaptive average pooling along one axis."""
    mat = np.zeros((out, size), np.float64)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        mat[i, start:end] = 1.0 / (end - start)
    return mat


def adaptive_avg_pool(x: Array, output_size: tuple[int, int]) -> Array:
    """torch.nn.AdaptiveAvgPool2d on NHWC input (identity when the size already matches)."""
    if x.shape[1:3] == tuple(output_size):
        return x
    rows = jnp.asarray(_adaptive_matrix(x.shape[1], output_size[0]), x.dtype)
    cols = jnp.asarray(_adaptive_matrix(x.shape[2], output_size[1]), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, x)


def global_avg_pool(x: Array) -> Array:
    """Mean over the spatial axes: (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))


def recording_features(module: nn.Module) -> bool:
    """True when apply named FEATURES as mutable (not at init, not with mutable=True), so that
    parameters and the compiled forward are unchanged unless features are requested."""
    if module.is_initializing() or not module.is_mutable_collection(FEATURES):
        return False
    return module.scope is not None and module.scope.mutable is not True


def record_feature(module: nn.Module, value: Array, preact: Array | None = None) -> None:
    """Append ``value`` and its pre-activation (``value`` itself by default) to FEATURES, in call order.
    The features are recorded in float32 (the feature losses compute in float32)."""
    if recording_features(module):
        module.sow(FEATURES, "post", at_least_float32(value))
        module.sow(FEATURES, "preact", at_least_float32(value if preact is None else preact))


def record_blocks(module: nn.Module, blocks: list[Array], pool: str) -> None:
    """Append one stage's block outputs (in block order) to BLOCKS under ``pool``, the pooling the
    released CKTF applies to this model family ('avg8': ResNet ``AvgPool2d(8)``, 'global': VGG
    ``AdaptiveAvgPool2d(1)``). Recorded only when BLOCKS is named mutable (as FEATURES)."""
    if not module.is_initializing() and module.is_mutable_collection(BLOCKS) and \
            module.scope is not None and module.scope.mutable is not True:
        module.sow(BLOCKS, pool, tuple(at_least_float32(b) for b in blocks))
