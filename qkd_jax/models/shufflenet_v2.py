"""ShuffleNetV2 x0.5 / x1.0 in the torchvision layout (any input size).

3x3/2 stem (24) + BN + ReLU + 3x3/2 max pool; stages 2-4 with 4, 8, 4 units (the first
of each strided, with two branches; the others split the channels in half); channel
shuffle with 2 groups after each unit; 1x1 conv5 (1024) + BN + ReLU; global average
pooling; Linear classifier.

Layer names: ``stem``/``stem_bn``; ``stage{s}_{j}`` (s = 2..4, j from 0) with
``branch1_dw``, ``branch1_pw`` (strided units only), ``branch2_pw1``, ``branch2_dw``,
``branch2_pw2`` and a ``_bn`` after each; ``conv5``/``conv5_bn``; ``classifier``.

Distillation features: the stem output (after its ReLU, before the max pool), the outputs
of stages 2-4, the classifier input (pooled ``conv5``). A unit ends in a channel shuffle
of a pass-through half and a ReLU branch, not in one ReLU, so the pre-activation features
are the same arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
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
    max_pool,
    record_feature,
)

SHUFFLENET_V2_WIDTHS: dict[str, tuple[int, ...]] = {
    "x0_5": (24, 48, 96, 192, 1024),
    "x1_0": (24, 116, 232, 464, 1024),
}


def channel_shuffle(x: Array, groups: int) -> Array:
    """torch ``view(n, g, c/g, h, w).transpose(1, 2)`` shuffle, on NHWC."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, w, groups, c // groups)
    return jnp.swapaxes(x, 3, 4).reshape(n, h, w, c)


class ShuffleUnit(nn.Module):
    """torchvision ShuffleNetV2 InvertedResidual."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    def _branch2(self, x: Array) -> Array:
        half = self.features // 2
        y = conv_layer(self.conv, half, 1, name="branch2_pw1")(x)
        y = nn.relu(self.norm(name="branch2_pw1_bn")(y))
        y = conv_layer(self.conv, half, 3, strides=self.strides, groups=half, name="branch2_dw")(y)
        y = self.norm(name="branch2_dw_bn")(y)
        y = conv_layer(self.conv, half, 1, name="branch2_pw2")(y)
        return nn.relu(self.norm(name="branch2_pw2_bn")(y))

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.strides == 1:
            x1, x2 = jnp.split(x, 2, axis=-1)
            out = jnp.concatenate([x1, self._branch2(x2)], axis=-1)
        else:
            channels = x.shape[-1]
            y = conv_layer(self.conv, channels, 3, strides=self.strides, groups=channels, name="branch1_dw")(x)
            y = self.norm(name="branch1_dw_bn")(y)
            y = conv_layer(self.conv, self.features // 2, 1, name="branch1_pw")(y)
            y = nn.relu(self.norm(name="branch1_pw_bn")(y))
            out = jnp.concatenate([y, self._branch2(x)], axis=-1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision ShuffleNetV2; ``widths`` = (stem, stage2, stage3, stage4, conv5) channels."""

    num_classes: int
    widths: Sequence[int] = SHUFFLENET_V2_WIDTHS["x1_0"]
    repeats: Sequence[int] = (4, 8, 4)
    conv: ModuleDef = nn.Conv
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv, dense = compute_layers(self)
        norm = bind_norm(self.norm, train, self.axis_name, self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = conv_layer(conv, self.widths[0], 3, strides=2, name="stem")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        record_feature(self, x)
        x = max_pool(x, 3, 2, padding=1)
        for s, (features, repeats) in enumerate(zip(self.widths[1:4], self.repeats), start=2):
            for j in range(repeats):
                x = ShuffleUnit(features, 2 if j == 0 else 1, conv, norm, name=f"stage{s}_{j}")(x)
            record_feature(self, x)
        x = conv_layer(conv, self.widths[4], 1, name="conv5")(x)
        x = nn.relu(norm(name="conv5_bn")(x))
        x = global_avg_pool(x)
        record_feature(self, x)
        return float32_logits(dense(self.num_classes, use_bias=True, name="classifier")(x))
