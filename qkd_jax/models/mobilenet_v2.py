"""MobileNetV2 (width 1.0) in the torchvision layout (any input size).

3x3/2 stem (32) + BN + ReLU6; 17 inverted residual blocks (t, c, n, s) =
(1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1);
1x1 conv to 1280 + BN + ReLU6; global average pooling; Dropout; Linear classifier.

Layer names: ``stem``/``stem_bn``; ``block{k}`` (k = 1..17) with ``expand``/``expand_bn``
(absent when t = 1), ``dw``/``dw_bn``, ``project``/``project_bn``; ``head_conv``/``head_bn``;
``classifier``. Dropout defaults to 0 (torchvision: 0.2); see :mod:`qkd_jax.models.vgg`.

Distillation features: the stem output, the output of each of the seven (t, c, n, s)
groups, the classifier input (pooled head, after dropout). The groups end in a linear
projection, so the pre-activation features are the same arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qkd_jax.models.depthwise import depthwise_conv_general_dilated
from qkd_jax.models.layers import (
    Array,
    BatchNorm,
    ModuleDef,
    bind_norm,
    compute_layers,
    conv_layer,
    float32_logits,
    global_avg_pool,
    record_feature,
)

MOBILENET_V2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1); residual when shapes match."""

    features: int
    strides: int
    expand_ratio: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: Array) -> Array:
        hidden = int(round(x.shape[-1] * self.expand_ratio))
        y = x
        if self.expand_ratio != 1:
            y = conv_layer(self.conv, hidden, 1, name="expand")(y)
            y = nn.relu6(self.norm(name="expand_bn")(y))
        y = conv_layer(self.conv, hidden, 3, strides=self.strides, groups=hidden, name="dw")(y)
        y = nn.relu6(self.norm(name="dw_bn")(y))
        y = conv_layer(self.conv, self.features, 1, name="project")(y)
        y = self.norm(name="project_bn")(y)
        if self.strides == 1 and x.shape[-1] == self.features:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """torchvision MobileNetV2, width multiplier 1.0."""

    num_classes: int
    conv: ModuleDef = nn.Conv
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    axis_name: str | None = None
    dropout_rate: float = 0.0
    last_channel: int = 1280
    # 'grouped': depthwise convs as XLA grouped convs (feature_group_count); 'shifted': as sums of
    # shifted products (`models.depthwise`, same values and gradients, a faster backward on CPU).
    depthwise: str = "grouped"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv, dense = compute_layers(self)
        if self.depthwise not in ("grouped", "shifted"):
            raise ValueError(f"MobileNetV2 depthwise={self.depthwise!r}: use 'grouped' or 'shifted'")
        if self.depthwise == "shifted":
            conv = functools.partial(conv, conv_general_dilated=depthwise_conv_general_dilated)
        norm = bind_norm(self.norm, train, self.axis_name, self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = conv_layer(conv, 32, 3, strides=2, name="stem")(x)
        x = nn.relu6(norm(name="stem_bn")(x))
        record_feature(self, x)
        k = 0
        for t, c, n, s in MOBILENET_V2_SETTING:
            for i in range(n):
                k += 1
                x = InvertedResidual(c, s if i == 0 else 1, t, conv, norm, name=f"block{k}")(x)
            record_feature(self, x)
        x = conv_layer(conv, self.last_channel, 1, name="head_conv")(x)
        x = nn.relu6(norm(name="head_bn")(x))
        x = global_avg_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        record_feature(self, x)
        return float32_logits(dense(self.num_classes, use_bias=True, name="classifier")(x))
