"""EfficientNet-B0 in the torchvision layout (any input size).

3x3/2 stem (32) + BN + SiLU; seven stages of MBConv blocks (expand, kernel, stride,
out, repeats) = (1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3)
(6,5,2,192,4) (6,3,1,320,1); each block: 1x1 expand + BN + SiLU (if expand != 1),
depthwise kxk + BN + SiLU, squeeze-excitation (1x1 convs with bias, squeeze width =
block input // 4, SiLU, sigmoid gate), 1x1 project + BN, residual (with optional
stochastic depth) when shapes match; 1x1 head conv (1280) + BN + SiLU; global average
pooling; Dropout; Linear classifier.

Layer names: ``stem``/``stem_bn``; ``stage{s}_{j}`` (s = 1..7, j from 0) with
``expand``/``expand_bn``, ``dw``/``dw_bn``, ``se_reduce``, ``se_expand``,
``project``/``project_bn``; ``head_conv``/``head_bn``; ``classifier``.
Dropout and stochastic depth default to 0 (torchvision: 0.2 and 0.2); with either > 0,
training needs ``rngs={'dropout': key}``.

Distillation features: the stem output, the seven stage outputs, the classifier input
(pooled head, after dropout). The stages end in a linear projection, so the
pre-activation features are the same arrays.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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

#: (expand ratio, kernel, stride, output channels, repeats) of the B0 stages.
EFFICIENTNET_B0_SETTING: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class MBConv(nn.Module):
    """torchvision MBConv with squeeze-excitation."""

    features: int
    kernel_size: int
    strides: int
    expand_ratio: int
    conv: ModuleDef
    norm: ModuleDef
    drop_prob: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        channels = x.shape[-1]
        hidden = channels * self.expand_ratio
        y = x
        if hidden != channels:
            y = nn.silu(self.norm(name="expand_bn")(conv_layer(self.conv, hidden, 1, name="expand")(y)))
        y = conv_layer(self.conv, hidden, self.kernel_size, strides=self.strides, groups=hidden, name="dw")(y)
        y = nn.silu(self.norm(name="dw_bn")(y))
        s = jnp.mean(y, axis=(1, 2), keepdims=True)
        s = nn.silu(conv_layer(self.conv, max(1, channels // 4), 1, use_bias=True, name="se_reduce")(s))
        s = conv_layer(self.conv, hidden, 1, use_bias=True, name="se_expand")(s)
        y = y * nn.sigmoid(s)
        y = self.norm(name="project_bn")(conv_layer(self.conv, self.features, 1, name="project")(y))
        if self.strides != 1 or channels != self.features:
            return y
        if train and self.drop_prob > 0.0:
            keep = 1.0 - self.drop_prob
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1, 1))
            y = jnp.where(mask, y / keep, 0.0)
        return y + x


class EfficientNet(nn.Module):
    """torchvision EfficientNet-B0 (width and depth multipliers 1.0)."""

    num_classes: int
    conv: ModuleDef = nn.Conv
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    axis_name: str | None = None
    dropout_rate: float = 0.0
    stochastic_depth_prob: float = 0.0
    last_channel: int = 1280

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv, dense = compute_layers(self)
        norm = bind_norm(self.norm, train, self.axis_name, self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = nn.silu(norm(name="stem_bn")(conv_layer(conv, 32, 3, strides=2, name="stem")(x)))
        record_feature(self, x)
        total = sum(setting[-1] for setting in EFFICIENTNET_B0_SETTING)
        index = 0
        for s, (t, k, stride, features, repeats) in enumerate(EFFICIENTNET_B0_SETTING, start=1):
            for j in range(repeats):
                block = MBConv(
                    features,
                    k,
                    stride if j == 0 else 1,
                    t,
                    conv,
                    norm,
                    drop_prob=self.stochastic_depth_prob * index / total,
                    name=f"stage{s}_{j}",
                )
                x = block(x, train)
                index += 1
            record_feature(self, x)
        x = conv_layer(conv, self.last_channel, 1, name="head_conv")(x)
        x = nn.silu(norm(name="head_bn")(x))
        x = global_avg_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        record_feature(self, x)
        return float32_logits(dense(self.num_classes, use_bias=True, name="classifier")(x))
